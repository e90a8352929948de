"""Decoders for the on-disk formats: IDX (.gz), CIFAR binary archives, trees of image files.

They need only numpy and Pillow, read one file or folder each, and raise a one-line
ValueError naming the file for anything corrupt, truncated or of the wrong kind.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np

from pimjax.data.messages import one_line
from pimjax.data.registry import check_split, info

IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 2051, 2049

CIFAR_IMAGE_BYTES = 3 * 32 * 32
CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-bin", "cifar100": "cifar-100-binary"}
CIFAR_MEMBERS = {
    ("cifar10", "train"): tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    ("cifar10", "test"): ("test_batch.bin",),
    ("cifar100", "train"): ("train.bin",),
    ("cifar100", "test"): ("test.bin",),
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def read_idx(path: str | os.PathLike, magic: int | None = None) -> np.ndarray:
    """Read a uint8 IDX file (gzip-compressed if its name ends in .gz) into a numpy array."""
    path = Path(path)
    raw = read_maybe_gzip(path)
    if len(raw) < 4:
        raise ValueError(f"{path}: truncated IDX file ({len(raw)} bytes, no header)")
    found = struct.unpack(">I", raw[:4])[0]
    if raw[:3] != b"\x00\x00\x08" or (magic is not None and found != magic):
        want = magic if magic is not None else "2049 (labels) or 2051 (images)"
        raise ValueError(f"{path}: bad IDX magic number {found}, expected {want}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + math.prod(dims)
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "trailing bytes"
        raise ValueError(f"{path}: {what}: {len(raw)} bytes after decompression, expected "
                         f"{expected} for dims {dims}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def read_idx_pair(images_path, labels_path, num_classes: int = 10):
    """Read matching IDX image ([N,H,W]) and label ([N]) files into ([N,H,W,1] uint8, int32)."""
    images = read_idx(images_path, IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC)
    if images.ndim != 3:
        raise ValueError(f"{images_path}: expected 3 IDX dims (N, rows, cols), got {images.shape}")
    if labels.ndim != 1:
        raise ValueError(f"{labels_path}: expected 1 IDX dim (N), got {labels.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{images_path} has {len(images)} images but {labels_path} has "
                         f"{len(labels)} labels")
    if not len(images):
        raise ValueError(f"{images_path} holds 0 images: replace it with a file of the split's "
                         "images")
    check_labels(labels, num_classes, labels_path)
    return images[..., None], labels.astype(np.int32)


def parse_cifar_records(buf: bytes, label_bytes: int, coarse: bool = False, source: str = ""):
    """Decode CIFAR binary records (label byte(s) + 3072 CHW bytes) into (NHWC uint8, int32)."""
    record = label_bytes + CIFAR_IMAGE_BYTES
    if not buf or len(buf) % record:
        raise ValueError(f"{source}: {len(buf)} bytes is not a whole number of {record}-byte "
                         f"CIFAR records ({label_bytes} label byte(s) + {CIFAR_IMAGE_BYTES} "
                         "pixel bytes): truncated or wrong record size")
    rows = np.frombuffer(buf, np.uint8).reshape(-1, record)
    # CIFAR-100 records are (coarse, fine, pixels); CIFAR-10 records are (label, pixels).
    labels = rows[:, 0 if coarse or label_bytes == 1 else 1].astype(np.int32)
    images = rows[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def read_cifar_binary(path: str | os.PathLike, split: str = "train", coarse: bool = False,
                      name: str | None = None):
    """Read a split of a CIFAR-10/100 binary archive (.tar.gz) or extracted folder.

    CIFAR-100 gives fine labels (100 classes), or coarse ones (20) with `coarse=True`. `name`
    ("cifar10" | "cifar100") fixes the format; by default it is told from the member names.
    """
    path, split = Path(path), check_split(split)
    members = _read_cifar_members(path)
    if name is None:
        name = "cifar100" if "train.bin" in members or "test.bin" in members else "cifar10"
    elif name not in CIFAR_FOLDERS:
        raise ValueError(f"name must be one of {tuple(CIFAR_FOLDERS)}, got {name!r}")
    wanted = CIFAR_MEMBERS[name, split]
    missing = [m for m in wanted if m not in members]
    if missing:
        raise ValueError(f"{path}: not a complete {info(name).files[0].name}: missing {missing}")
    label_bytes = 2 if name == "cifar100" else 1
    parts = [parse_cifar_records(members[m], label_bytes, coarse, f"{path}:{m}") for m in wanted]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    check_labels(labels, 20 if coarse and name == "cifar100" else info(name).num_classes, path)
    return images, labels


def read_image_tree(path: str | os.PathLike, split: str = "train",
                    classes: tuple[str, ...] | None = None, mode: str = "RGB",
                    limit: int | None = None):
    """Decode a tarball or folder of `<split>/<class>/*.jpg|png` into (NHWC uint8, int32, classes).

    Files are ordered by (file name, class index, path): deterministic, and when files are
    numbered per class (0000.jpg, ...) the classes interleave, so `limit` gives a balanced subset.
    """
    path = Path(path)
    entries = _list_image_tree(path, split)  # [(class_name, member_path, read_fn)]
    if not entries:
        raise ValueError(f"{path}: no images (*{'|*'.join(IMAGE_SUFFIXES)}) found under "
                         f"'{split}/<class>/'")
    found = sorted({c for c, _, _ in entries})
    classes = tuple(found) if classes is None else tuple(classes)
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(f"{path}: unknown class folder(s) {unknown}; expected {list(classes)}")
    index = {c: i for i, c in enumerate(classes)}
    entries.sort(key=lambda e: (Path(e[1]).name, index[e[0]], e[1]))
    if limit is not None:
        entries = entries[:limit]
    images = [decode_image(read(), mode, f"{path}:{member}") for _, member, read in entries]
    if not images:
        shape = (0, 0, 0, 3 if mode == "RGB" else 1)
        return np.zeros(shape, np.uint8), np.zeros(0, np.int32), classes
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise ValueError(f"{path}: images of different shapes {sorted(shapes)}")
    labels = np.array([index[c] for c, _, _ in entries], np.int32)
    return np.stack(images), labels, classes


def check_labels(labels: np.ndarray, num_classes: int, source) -> None:
    """Raise a ValueError naming `source` if a label is >= num_classes."""
    if labels.size and int(labels.max()) >= num_classes:
        raise ValueError(f"{source}: label {int(labels.max())} out of range for "
                         f"{num_classes} classes")


def read_maybe_gzip(path: Path) -> bytes:
    """The bytes of `path`, gunzipped when its name ends in .gz."""
    data = path.read_bytes()
    if path.suffix != ".gz":
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: not a valid gzip file ({one_line(e)})") from e


def read_tar(path: Path, keep) -> list[tuple[str, bytes]]:
    """(name, bytes) of the regular files of a tar or .tar.gz whose name passes `keep`."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)  # at once: much faster than tarfile's streaming gunzip
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            return [(m.name, tar.extractfile(m).read()) for m in tar
                    if m.isfile() and keep(m.name)]
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: not a readable tar or .tar.gz archive ({one_line(e)})") from e


def decode_image(data: bytes, mode: str, source: str) -> np.ndarray:
    """One encoded image (JPEG, PNG, ...) as uint8 [H, W, C] in Pillow `mode`."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(im.convert(mode))
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{source}: cannot decode image ({one_line(e)})") from e
    return arr[..., None] if arr.ndim == 2 else arr


def image_tree_files(folder: Path, split: str) -> list[Path]:
    """The image files `<split>/<class>/<image>` under `folder`, in sorted order."""
    return sorted(p for p in folder.rglob(f"{split}/*/*")
                  if p.is_file() and _wanted_image(p.relative_to(folder).parts, split))


def _wanted_image(parts: tuple[str, ...], split: str) -> bool:
    return (len(parts) >= 3 and parts[-3] == split and parts[-1].lower().endswith(IMAGE_SUFFIXES)
            and not any(p.startswith((".", "__MACOSX")) for p in parts))


def _read_cifar_members(path: Path) -> dict[str, bytes]:
    """The *.bin files of a CIFAR archive or folder, by base name."""
    if path.is_dir():
        return {p.name: p.read_bytes() for p in sorted(path.glob("*.bin"))}
    return {Path(n).name: data for n, data in read_tar(path, lambda n: n.endswith(".bin"))}


def _list_image_tree(path: Path, split: str):
    """[(class, member path, read_fn)] for every `<split>/<class>/<image>` in a folder or tar."""
    if path.is_dir():
        return [(p.parts[-2], str(p.relative_to(path)), p.read_bytes)
                for p in image_tree_files(path, split)]
    members = read_tar(path, lambda n: _wanted_image(Path(n).parts, split))
    return [(Path(n).parts[-2], n, lambda d=data: d) for n, data in members]
