"""Find the files of a dataset split: a data folder, the bundled MNIST, or a download.

Search order, first hit wins:

1. `data_dir` (else $PIMJAX_DATA_DIR), then its `<name>/` subfolder (and `cifar10_jpeg/` for
   cifar10). CIFAR-10 prefers the official binary archive over a tree of JPEG/PNG images.
2. Only when no `data_dir` argument is given (an explicit folder means "these files"): the
   copy of MNIST bundled with pimjax, then the official files downloaded earlier into
   `<cache>/downloads/<name>/` (their SHA-256 is checked when they are decoded), then a
   download of them (pimjax.data.download), unless `download=False` or $PIMJAX_OFFLINE is set.
   `download=True` also uses or downloads them when a `data_dir` is given but lacks the files.

Not found: a one-line FileNotFoundError naming each expected file and where to put it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from pimjax.data import download as dl
from pimjax.data.readers import (
    CIFAR_FOLDERS,
    CIFAR_MEMBERS,
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    image_tree_files,
)
from pimjax.data.registry import CIFAR10_CLASSES, IDX_FILES, check_name, check_split, info

BUNDLED_MNIST = Path(__file__).resolve().parent.parent / "datasets" / "mnist"
CIFAR10_JPEG_ARCHIVE = "cifar10_jpeg_q75_images.tar.gz"
TFDS_HINT = 'or `pip install -e ".[tfds]"` and use pimjax.data.load_tfds'


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a split is read from."""

    kind: str  # "idx" | "cifar_binary" | "image_tree"
    paths: tuple[Path, ...]  # idx: (images, labels); otherwise (archive or folder,)
    origin: str = "data_dir"  # "data_dir" | "bundled" | "download"

    def files(self, split: str) -> list[Path]:
        """Every file the split is read from (the cache key checks their sizes and mtimes)."""
        out = []
        for p in self.paths:
            if not p.is_dir():
                out.append(p)
            elif self.kind == "cifar_binary":
                out.extend(sorted(p.glob("*.bin")))
            else:
                out.extend(image_tree_files(p, split))
        return out


def search_roots(name: str, data_dir: str | os.PathLike | None) -> list[Path]:
    """Folders searched for `name`: data_dir (else $PIMJAX_DATA_DIR) and its subfolders."""
    if data_dir is None:
        data_dir = os.environ.get("PIMJAX_DATA_DIR") or None
    if data_dir is None:
        return []
    base = Path(data_dir).expanduser()
    extra = ["cifar10_jpeg"] if name == "cifar10" else []
    return [base] + [base / sub for sub in [name, *extra]]


def find_source(name: str, split: str, data_dir: str | os.PathLike | None = None,
                cache_dir: str | os.PathLike | None = None, download: bool | None = None,
                base_url: str | None = None, progress: bool = True) -> Source:
    """Locate `name`'s `split` (see the module docstring for the search order)."""
    name, split = check_name(name), check_split(split)
    roots = search_roots(name, data_dir)
    found = _find_local(name, split, roots)
    if found is not None:
        return found
    kind = "idx" if name in ("mnist", "fashion_mnist") else "cifar_binary"
    explicit = data_dir is not None
    notes = []
    if not explicit and name == "mnist":
        packaged = tuple(BUNDLED_MNIST / f"{s}.gz" for s in IDX_FILES[split])
        if all(p.is_file() for p in packaged):
            return Source("idx", packaged, "bundled")
        notes.append(f"the copy bundled with pimjax in {BUNDLED_MNIST} is missing (reinstall "
                     "pimjax)")
    if download is True or not explicit:
        # Files downloaded earlier (sizes checked here, SHA-256 when decoded).
        previous = dl.downloaded(name, split, cache_dir)
        if previous is not None:
            return Source(kind, previous, "download")
    if download is True or (download is None and not explicit):
        if not dl.offline():
            return Source(kind, dl.fetch(name, split, cache_dir, base_url, progress), "download")
        notes.append(f"downloads are off: {dl.OFFLINE_ENV} is set")
    elif download is False:
        notes.append("downloads are off: download=False")
    else:
        notes.append("no download since data_dir was given: pass download=True, or no data_dir, "
                     f"to download the official files into {dl.download_dir(name, cache_dir)}")
    raise FileNotFoundError(_missing_message(name, split, roots, explicit, cache_dir, notes))


def _find_local(name: str, split: str, roots: list[Path]) -> Source | None:
    if name in ("mnist", "fashion_mnist"):
        for root in roots:
            found = [next((p for p in (root / f"{s}.gz", root / s) if p.is_file()), None)
                     for s in IDX_FILES[split]]
            if all(found):
                return Source("idx", tuple(found))
        return None
    archive, folder = info(name).files[0].name, CIFAR_FOLDERS[name]
    first = CIFAR_MEMBERS[name, split][0]
    for root in roots:
        if (root / archive).is_file():
            return Source("cifar_binary", (root / archive,))
        for d in (root / folder, root):
            if (d / first).is_file():
                return Source("cifar_binary", (d,))
    if name == "cifar10":
        for root in roots:
            if (root / CIFAR10_JPEG_ARCHIVE).is_file():
                return Source("image_tree", (root / CIFAR10_JPEG_ARCHIVE,))
            if (root / split / CIFAR10_CLASSES[0]).is_dir():
                return Source("image_tree", (root,))
    return None


def _expected_files(name: str, split: str) -> str:
    i = info(name)
    if name in ("mnist", "fashion_mnist"):
        n = i.split_size(split)
        sizes = {f.name: f.size for f in i.files}
        return " and ".join(
            f"{stem}.gz (gzip IDX {kind}, official size {sizes[stem + '.gz']} bytes, magic "
            f"{magic}, {shape} uint8; or uncompressed without .gz)"
            for stem, kind, magic, shape in zip(
                IDX_FILES[split], ("images", "labels"), (IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC),
                (f"{n}x28x28", f"{n}"), strict=True))
    f = i.files[0]
    out = (f"{f.name} (CIFAR binary archive, {f.size} bytes, members {CIFAR_FOLDERS[name]}/"
           f"{', '.join(CIFAR_MEMBERS[name, split])}; or that folder extracted)")
    if name == "cifar10":
        out += (f", or {CIFAR10_JPEG_ARCHIVE} or a folder of {split}/<class>/*.jpg|png (class "
                "folders airplane ... truck),")
    return out


def _missing_message(name: str, split: str, roots: list[Path], explicit: bool, cache_dir,
                     notes: list[str]) -> str:
    i = info(name)
    where = ("looked in: " + ", ".join(str(r) for r in roots) if roots else
             "no data folder given")
    put = roots[1] if roots else dl.download_dir(name, cache_dir)
    also = "" if explicit else ", or set PIMJAX_DATA_DIR to a folder holding them"
    if name == "cifar100":
        notes.append("no copy of CIFAR-100 ships with pimjax")
    return (f"{i.title} '{split}' split not found ({'; '.join([where, *notes])}). Put "
            f"{_expected_files(name, split)} in {put}{also}. Official files: "
            f"{', '.join(f.url for f in i.split_files(split))} (from {i.homepage}), {TFDS_HINT}.")
