"""Builders of small dataset files for the tests of pimjax.data, and the optional real data.

Real data is found only through $PIMJAX_DATA_DIR (read when this module is imported, before
the tests' fixtures clear it); tests that need it skip with the reason when it is absent.
"""

import gzip
import io
import os
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pimjax.data.registry import IDX_FILES

REAL_DATA = Path(os.environ["PIMJAX_DATA_DIR"]) if os.environ.get("PIMJAX_DATA_DIR") else None
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def real_data(rel: str) -> Path:
    """`$PIMJAX_DATA_DIR/rel`, or skip the test saying what is missing."""
    if REAL_DATA is None:
        pytest.skip(f"needs real data: set PIMJAX_DATA_DIR to a folder holding {rel}")
    path = REAL_DATA / rel
    if not path.exists():
        pytest.skip(f"needs real data: {path} is absent")
    return path


def clear_env(monkeypatch) -> None:
    """Tests see no user data folder or cache folder."""
    monkeypatch.delenv("PIMJAX_DATA_DIR", raising=False)
    monkeypatch.delenv("PIMJAX_CACHE_DIR", raising=False)


def idx_bytes(arr: np.ndarray, magic: int) -> bytes:
    return struct.pack(f">I{arr.ndim}I", magic, *arr.shape) + arr.astype(np.uint8).tobytes()


def write_idx(path: Path, arr: np.ndarray, magic: int) -> None:
    raw = idx_bytes(arr, magic)
    path.write_bytes(gzip.compress(raw, compresslevel=1) if path.suffix == ".gz" else raw)


def write_idx_split(folder: Path, split: str, images: np.ndarray, labels: np.ndarray,
                    gz: bool = True) -> None:
    """The two IDX files of `split` (images [N,28,28], labels [N]) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    stem_i, stem_l = IDX_FILES[split]
    ext = ".gz" if gz else ""
    write_idx(folder / (stem_i + ext), images, 2051)
    write_idx(folder / (stem_l + ext), labels, 2049)


def make_idx_dir(folder: Path, n_train=7, n_test=5, seed=0, gz=True) -> dict:
    """An MNIST-like folder of uniform noise; returns {split: (images [N,28,28], labels [N])}."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx_split(folder, split, images, labels, gz)
        out[split] = (images, labels)
    return out


def cifar_records(n: int, label_bytes: int, seed: int):
    """(raw bytes, images NHWC, label columns [N, label_bytes]) of n CIFAR records."""
    rng = np.random.default_rng(seed)
    chw = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    hi = 100 if label_bytes == 2 else 10
    labels = rng.integers(0, [20, hi][-label_bytes:], (n, label_bytes), dtype=np.uint8)
    raw = np.concatenate([labels, chw.reshape(n, -1)], axis=1).tobytes()
    return raw, chw.transpose(0, 2, 3, 1), labels


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def make_cifar10_tar(path: Path, per_batch=2, n_test=3):
    """A cifar-10-binary.tar.gz; returns {split: (images, labels)}."""
    members, train = {}, []
    for i in range(1, 6):
        raw, images, labels = cifar_records(per_batch, 1, seed=i)
        members[f"cifar-10-batches-bin/data_batch_{i}.bin"] = raw
        train.append((images, labels[:, 0]))
    raw, images, labels = cifar_records(n_test, 1, seed=9)
    members["cifar-10-batches-bin/test_batch.bin"] = raw
    members["cifar-10-batches-bin/batches.meta.txt"] = b"airplane\n"
    write_tar(path, members)
    return {"train": (np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train])),
            "test": (images, labels[:, 0])}


def png_bytes(arr: np.ndarray, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def tree_images(n_per_class=2, classes=("airplane", "cat", "truck")):
    """{relative path: image} for a `split/<class>/NNNN.png` tree (both splits)."""
    rng = np.random.default_rng(3)
    return {f"{split}/{c}/{i:04d}.png": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            for split in ("train", "test") for c in classes for i in range(n_per_class)}
