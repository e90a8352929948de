"""Download of the official dataset files (with pooch) into the pimjax cache folder.

Each file is streamed to a temporary file next to its destination and renamed only once its
size and SHA-256 match the registry, so an interrupted download is never taken as complete.
`PIMJAX_OFFLINE=1` turns every download off; `PIMJAX_DOWNLOAD_URL` replaces the official
addresses by a mirror laid out `<url>/<dataset>/<file name>` (tests serve one locally).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pimjax.data.cache import cache_root
from pimjax.data.messages import one_line
from pimjax.data.registry import OfficialFile, info

OFFLINE_ENV = "PIMJAX_OFFLINE"
URL_ENV = "PIMJAX_DOWNLOAD_URL"
TIMEOUT_S = 60  # seconds without data before a download is abandoned


def offline() -> bool:
    """True when $PIMJAX_OFFLINE is set to anything but '', '0', 'false' or 'no'."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def download_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the official files of dataset `name` are downloaded: <cache>/downloads/<name>."""
    return cache_root(cache_dir) / "downloads" / info(name).name


def file_url(name: str, file: OfficialFile, base_url: str | None = None) -> str:
    """Address of `file`: `<base_url or $PIMJAX_DOWNLOAD_URL>/<name>/<file>`, else the official."""
    base = base_url or os.environ.get(URL_ENV) or None
    return file.url if base is None else f"{base.rstrip('/')}/{name}/{file.name}"


def downloaded(name: str, split: str, cache_dir=None) -> tuple[Path, ...] | None:
    """Paths of `split`'s official files already in the download folder (sizes checked), or None."""
    paths = tuple(download_dir(name, cache_dir) / f.name for f in info(name).split_files(split))
    sizes = [f.size for f in info(name).split_files(split)]
    ok = all(p.is_file() and p.stat().st_size == s for p, s in zip(paths, sizes, strict=True))
    return paths if ok else None


def fetch(name: str, split: str, cache_dir=None, base_url: str | None = None,
          progress: bool = True) -> tuple[Path, ...]:
    """Download (or reuse, after re-checking its SHA-256) each official file of `split`."""
    files = info(name).split_files(split)
    return fetch_files(files, download_dir(name, cache_dir),
                       [file_url(name, f, base_url) for f in files], progress)


def fetch_files(files: tuple[OfficialFile, ...], dest: Path, urls: list[str],
                progress: bool = True) -> tuple[Path, ...]:
    """Download each file from its url into `dest`, or reuse a copy there whose SHA-256 matches."""
    if offline():
        missing = ", ".join(f"{f.name} ({f.size} bytes, sha256 {f.sha256})" for f in files)
        raise FileNotFoundError(f"downloads are off ({OFFLINE_ENV} is set): put {missing} in "
                                f"{dest}, or unset {OFFLINE_ENV} to download from "
                                f"{', '.join(urls)}")
    return tuple(_fetch_one(f, Path(dest), url, progress)
                 for f, url in zip(files, urls, strict=True))


def _fetch_one(f: OfficialFile, dest: Path, url: str, progress: bool) -> Path:
    import pooch
    import requests

    put = (f"put the official {f.name} ({f.size} bytes, sha256 {f.sha256}) in {dest}, or set "
           f"{URL_ENV} to a mirror holding <dataset>/<file>")
    try:
        path = pooch.retrieve(url, known_hash=f"sha256:{f.sha256}", fname=f.name, path=dest,
                              downloader=_SizeChecked(f, url, progress))
    except requests.exceptions.RequestException as e:
        raise FileNotFoundError(f"could not download {f.name} from {url} "
                                f"({type(e).__name__}: {one_line(e)}): {put}") from e
    except _Truncated as e:
        raise FileNotFoundError(f"{e}: {put}") from e
    except _WrongSize as e:
        raise ValueError(f"{e}: {put}") from e
    except ValueError as e:  # pooch: the SHA-256 does not match
        got = re.search(r"got:? *'?([0-9a-f]{64})", str(e))
        raise ValueError(f"downloaded {f.name} from {url} is not the official file: its sha256 "
                         f"is {got.group(1) if got else 'different'}, expected {f.sha256} "
                         f"(nothing was kept): {put}") from e
    return Path(path)


class _Truncated(Exception):  # noqa: N818  (mapped to FileNotFoundError by _fetch_one)
    pass


class _WrongSize(Exception):  # noqa: N818  (mapped to ValueError by _fetch_one)
    pass


class _SizeChecked:
    """pooch downloader: HTTP(S) with a progress bar, then a check of the file's size."""

    def __init__(self, f: OfficialFile, url: str, progress: bool):
        import pooch

        self.file, self.url = f, url
        self.http = pooch.HTTPDownloader(progressbar=progress, chunk_size=1 << 16,
                                         timeout=TIMEOUT_S)

    def __call__(self, url, output_file, pooch_obj, check_only=False):
        """Download `url` to `output_file` (a temporary file pooch renames when complete)."""
        out = self.http(url, output_file, pooch_obj, check_only=check_only)
        if check_only:
            return out
        size = os.path.getsize(output_file)
        if size < self.file.size:
            raise _Truncated(f"download of {self.file.name} from {self.url} stopped after {size} "
                             f"of {self.file.size} bytes (nothing was kept)")
        if size != self.file.size:
            raise _WrongSize(f"downloaded {self.file.name} from {self.url} has {size} bytes, "
                             f"expected {self.file.size}: not the official file (nothing was "
                             "kept)")
        return out
