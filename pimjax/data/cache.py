"""The pimjax cache folder and its `.npz` cache of decoded dataset splits."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np

CACHE_VERSION = 2  # 2: entries are written only after identify.check_idx accepted the files


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The pimjax cache folder: `cache_dir`, else $PIMJAX_CACHE_DIR, else ~/.cache/pimjax."""
    if cache_dir is None:
        cache_dir = os.environ.get("PIMJAX_CACHE_DIR") or Path.home() / ".cache" / "pimjax"
    return Path(cache_dir).expanduser()


class Cache:
    """`.npz` cache of one decoded split, keyed by source paths, kind, sizes and mtimes."""

    def __init__(self, cache_dir, name: str, split: str, kind: str,
                 paths: tuple[Path, ...], files: list[Path]):
        """Cache for `name`'s `split` read from `paths` (a source of `kind`) made of `files`."""
        self.dir = cache_root(cache_dir)
        where = hashlib.sha256(str([str(p.resolve()) for p in paths]).encode())
        self.prefix = f"{name}-{split}-{where.hexdigest()[:8]}"
        stat = [[str(f), (s := f.stat()).st_size, s.st_mtime_ns] for f in files]
        state = json.dumps([CACHE_VERSION, kind, stat])
        self.state = hashlib.sha256(state.encode()).hexdigest()[:16]

    def path(self, limit: int | None) -> Path:
        """Cache file for the first `limit` examples (None: the whole split)."""
        return self.dir / f"{self.prefix}-{'all' if limit is None else limit}-{self.state}.npz"

    def load(self, limit: int | None):
        """(images, labels, tag) from the cache, or None on a miss or unreadable file."""
        path = self.path(limit)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                images, labels, tag = z["images"], z["labels"], str(z["tag"])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            warnings.warn(f"ignoring unreadable cache file {path}: {e}", stacklevel=3)
            return None
        return images, labels, tag

    def save(self, limit: int | None, images, labels, tag) -> None:
        """Write the arrays atomically (tmp file + os.replace) and drop stale versions."""
        path = self.path(limit)
        tmp = None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=path.name + ".", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                np.savez(f, images=images, labels=labels, tag=np.array(tag))
            os.chmod(tmp, 0o644)  # mkstemp makes it 0600
            os.replace(tmp, path)
            tmp = None
            for old in self.dir.glob(f"{self.prefix}-{'all' if limit is None else limit}-*.npz"):
                if old != path:
                    old.unlink(missing_ok=True)
        except OSError as e:
            warnings.warn(f"could not write dataset cache {path}: {e}", stacklevel=3)
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
