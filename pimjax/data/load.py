"""`load_dataset`: locate a split, check what it holds, decode it once, cache it as `.npz`."""

from __future__ import annotations

import os

import numpy as np

from pimjax.data import identify
from pimjax.data.cache import Cache
from pimjax.data.dataset import Dataset
from pimjax.data.locate import Source, find_source
from pimjax.data.readers import read_cifar_binary, read_idx_pair, read_image_tree
from pimjax.data.registry import CIFAR10_CLASSES, check_name, check_split, info


def load_dataset(name: str, split: str = "train", data_dir: str | os.PathLike | None = None,
                 cache_dir: str | os.PathLike | None = None, limit: int | None = None,
                 download: bool | None = None) -> Dataset:
    """Load a dataset split from local files or a download (decoded once, then cached as .npz).

    Files are looked for in `data_dir` (else $PIMJAX_DATA_DIR) and its `<name>/` subfolder
    (`cifar10_jpeg/` too for cifar10); with no `data_dir` argument MNIST falls back to the copy
    bundled with pimjax, and any dataset to its official files, downloaded into
    `<cache>/downloads/<name>/` unless `download=False` or $PIMJAX_OFFLINE is set (see
    pimjax.data.locate). MNIST and Fashion-MNIST files are identified by content and refused
    when they hold the other dataset (see pimjax.data.identify). CIFAR-10 prefers the official
    binary archive over a JPEG tree. The cache lives in `cache_dir` (else $PIMJAX_CACHE_DIR,
    else ~/.cache/pimjax). `limit` keeps the first `limit` examples.
    """
    name, split = check_name(name), check_split(split)
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 0:
            raise ValueError(f"limit must be a non-negative int or None, got {limit!r}")
        limit = int(limit)
    if download not in (None, True, False):
        raise ValueError(f"download must be True, False or None, got {download!r}")
    source = find_source(name, split, data_dir, cache_dir, download)
    cache = Cache(cache_dir, name, split, source.kind, source.paths, source.files(split))
    arrays = cache.load(None)
    # Only image trees are decoded partially for a `limit`; other formats are cheap to read whole.
    partial = max(limit, 1) if source.kind == "image_tree" and limit is not None else None
    if arrays is None and partial is not None:
        arrays = cache.load(partial)
    if arrays is None:
        arrays = decode(name, source, split, partial)
        cache.save(partial, *arrays)
    images, labels, tag = arrays
    if limit is not None and limit < len(labels):
        images, labels = images[:limit].copy(), labels[:limit].copy()
    if not images.flags.writeable:
        images = images.copy()
    return Dataset(images=images, labels=labels.astype(np.int32, copy=False), name=name,
                   split=split, tag=tag, num_classes=info(name).num_classes)


def decode(name: str, source: Source, split: str, limit: int | None = None):
    """(images, labels, tag) of a located split, after checking the files hold `name`."""
    path = source.paths[0]
    if source.origin == "bundled":
        identify.check_official(name, source.paths, "bundled MNIST file", "reinstall pimjax")
    elif source.origin == "download":
        identify.check_official(name, source.paths, "downloaded file",
                                "delete it and load again to download it again")
    if source.kind == "idx":
        images, labels = read_idx_pair(*source.paths, num_classes=info(name).num_classes)
        if source.origin == "data_dir":
            identify.check_idx(name, split, *source.paths, images)
        return images, labels, name
    if source.kind == "cifar_binary":
        return (*read_cifar_binary(path, split, name=name), name)
    images, labels, _ = read_image_tree(path, split, CIFAR10_CLASSES, "RGB", limit)
    if images.shape[1:] != (32, 32, 3):
        raise ValueError(f"{path}: expected 32x32 RGB images, got {images.shape[1:]}")
    # The shared JPEG copy is lossy; a folder of PNGs (lossless) gets its own tag.
    png_only = path.is_dir() and not any(
        f.suffix.lower() in (".jpg", ".jpeg") for f in source.files(split))
    return images, labels, "cifar10-png" if png_only else "cifar10-jpeg"
