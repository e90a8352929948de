"""Image-classification datasets: offline readers, an `.npz` cache, normalization, augmentation.

Offline readers need only numpy and Pillow:

* IDX `.gz` files (MNIST, Fashion-MNIST), as distributed;
* the CIFAR-10/100 binary archives (`cifar-10-binary.tar.gz`, `cifar-100-binary.tar.gz`) or
  their extracted folders;
* a tarball or folder of images laid out `<split>/<class>/*.jpg|png` (the JPEG copy of
  CIFAR-10 in the shared data folder).

`load_dataset` finds the files, decodes them once and caches the arrays as `.npz`. MNIST is
bundled with the package so it loads with no data folder and no network. `load_tfds` is the
optional TensorFlow-Datasets path (`pip install -e ".[tfds]"`).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import importlib
import importlib.util
import io
import json
import math
import os
import re
import struct
import tarfile
import tempfile
import warnings
import zipfile
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100")
SPLITS = ("train", "test")

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)

# Per-channel pixel mean and std (of pixel/255) over each official training split: the usual
# published values. The JPEG copy of CIFAR-10 has train means 0.4913, 0.4821, 0.4465.
MEAN_STD = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

_NUM_CLASSES = {"mnist": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100}

_IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_COUNTS = {"train": 60000, "test": 10000}
_IDX_IMAGES_MAGIC, _IDX_LABELS_MAGIC = 2051, 2049

# Sizes and SHA-256 of the official MNIST files (identical to the copy bundled with pimjax).
_MNIST_FILES = {
    "train-images-idx3-ubyte.gz": (
        9912422, "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
    "train-labels-idx1-ubyte.gz": (
        28881, "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
    "t10k-images-idx3-ubyte.gz": (
        1648877, "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
    "t10k-labels-idx1-ubyte.gz": (
        4542, "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
}
_BUNDLED_MNIST = Path(__file__).resolve().parent / "datasets" / "mnist"

_CIFAR_IMAGE_BYTES = 3 * 32 * 32
_CIFAR_ARCHIVES = {"cifar10": "cifar-10-binary.tar.gz", "cifar100": "cifar-100-binary.tar.gz"}
_CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-bin", "cifar100": "cifar-100-binary"}
_CIFAR_MEMBERS = {
    ("cifar10", "train"): tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    ("cifar10", "test"): ("test_batch.bin",),
    ("cifar100", "train"): ("train.bin",),
    ("cifar100", "test"): ("test.bin",),
}
_CIFAR10_JPEG_ARCHIVE = "cifar10_jpeg_q75_images.tar.gz"
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

_HOW_TO_GET = {
    "mnist": "the MNIST distribution (http://yann.lecun.com/exdb/mnist/; mirrors keep the same "
             "file names), or pass data_dir=None to use the copy bundled with pimjax",
    "fashion_mnist": "the Fashion-MNIST distribution "
                     "(https://github.com/zalandoresearch/fashion-mnist, folder data/fashion)",
    "cifar10": "the CIFAR site (https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz)",
    "cifar100": "the CIFAR site (https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz). "
                "No offline copy of CIFAR-100 ships with pimjax or its shared data folder",
}
_TFDS_HINT = 'or `pip install -e ".[tfds]"` and use pimjax.data.load_tfds'
_CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What pimjax knows of a dataset: image shape, classes, split sizes, normalization."""

    name: str
    image_shape: tuple[int, int, int]
    num_classes: int
    train_size: int
    test_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


_SHAPES = {"mnist": (28, 28, 1), "fashion_mnist": (28, 28, 1), "cifar10": (32, 32, 3),
           "cifar100": (32, 32, 3)}
_SIZES = {"mnist": (60000, 10000), "fashion_mnist": (60000, 10000), "cifar10": (50000, 10000),
          "cifar100": (50000, 10000)}


def info(name: str) -> DatasetInfo:
    """The registry entry of dataset ``name`` (one of :data:`DATASETS`)."""
    name = _check_name(name)
    return DatasetInfo(name, _SHAPES[name], _NUM_CLASSES[name], *_SIZES[name], *MEAN_STD[name])


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: arrays make `==` ambiguous
class Dataset:
    """One split of an image-classification dataset held in memory."""

    images: np.ndarray  # uint8 [N, H, W, C]
    labels: np.ndarray  # int32 [N]
    name: str  # one of DATASETS
    split: str  # "train" | "test"
    tag: str  # provenance carried into results: "mnist", "cifar10-jpeg", "tfds:mnist", ...
    num_classes: int

    def __post_init__(self):
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 [N,H,W,C], got {self.images.dtype} "
                             f"{self.images.shape}")
        if self.labels.shape != self.images.shape[:1] or self.labels.dtype != np.int32:
            raise ValueError(f"labels must be int32 [{len(self.images)}], got "
                             f"{self.labels.dtype} {self.labels.shape}")

    def __len__(self) -> int:
        """Number of examples."""
        return len(self.labels)


# --------------------------------------------------------------------------- readers


def read_idx(path: str | os.PathLike, magic: int | None = None) -> np.ndarray:
    """Read a uint8 IDX file (gzip-compressed if its name ends in .gz) into a numpy array."""
    path = Path(path)
    raw = _read_maybe_gzip(path)
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
    images = read_idx(images_path, _IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, _IDX_LABELS_MAGIC)
    if images.ndim != 3:
        raise ValueError(f"{images_path}: expected 3 IDX dims (N, rows, cols), got {images.shape}")
    if labels.ndim != 1:
        raise ValueError(f"{labels_path}: expected 1 IDX dim (N), got {labels.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{images_path} has {len(images)} images but {labels_path} has "
                         f"{len(labels)} labels")
    _check_labels(labels, num_classes, labels_path)
    return images[..., None], labels.astype(np.int32)


def parse_cifar_records(buf: bytes, label_bytes: int, coarse: bool = False, source: str = ""):
    """Decode CIFAR binary records (label byte(s) + 3072 CHW bytes) into (NHWC uint8, int32)."""
    record = label_bytes + _CIFAR_IMAGE_BYTES
    if not buf or len(buf) % record:
        raise ValueError(f"{source}: {len(buf)} bytes is not a whole number of {record}-byte "
                         f"CIFAR records ({label_bytes} label byte(s) + {_CIFAR_IMAGE_BYTES} "
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
    path, split = Path(path), _check_split(split)
    members = _read_cifar_members(path)
    if name is None:
        name = "cifar100" if "train.bin" in members or "test.bin" in members else "cifar10"
    elif name not in _CIFAR_ARCHIVES:
        raise ValueError(f"name must be one of {tuple(_CIFAR_ARCHIVES)}, got {name!r}")
    wanted = _CIFAR_MEMBERS[name, split]
    missing = [m for m in wanted if m not in members]
    if missing:
        raise ValueError(f"{path}: not a complete {_CIFAR_ARCHIVES[name]}: missing {missing}")
    label_bytes = 2 if name == "cifar100" else 1
    parts = [parse_cifar_records(members[m], label_bytes, coarse, f"{path}:{m}") for m in wanted]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    _check_labels(labels, 20 if coarse and name == "cifar100" else _NUM_CLASSES[name], path)
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
        raise ValueError(f"{path}: no images (*{'|*'.join(_IMAGE_SUFFIXES)}) found under "
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
    images = [_decode_image(read(), mode, f"{path}:{member}") for _, member, read in entries]
    if not images:
        shape = (0, 0, 0, 3 if mode == "RGB" else 1)
        return np.zeros(shape, np.uint8), np.zeros(0, np.int32), classes
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise ValueError(f"{path}: images of different shapes {sorted(shapes)}")
    labels = np.array([index[c] for c, _, _ in entries], np.int32)
    return np.stack(images), labels, classes


# --------------------------------------------------------------------------- loading


def load_dataset(name: str, split: str = "train", data_dir: str | os.PathLike | None = None,
                 cache_dir: str | os.PathLike | None = None,
                 limit: int | None = None) -> Dataset:
    """Load a dataset split from local files (decoded once, then cached as .npz).

    Files are looked for in `data_dir` (else $PIMJAX_DATA_DIR) and its `<name>/` subfolder
    (`cifar10_jpeg/` too for cifar10); MNIST falls back to the copy bundled with pimjax when
    `data_dir` is None. CIFAR-10 prefers the official binary archive over a JPEG tree. The cache
    lives in `cache_dir` (else $PIMJAX_CACHE_DIR, else ~/.cache/pimjax). `limit` keeps the first
    `limit` examples.
    """
    name, split = _check_name(name), _check_split(split)
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 0:
            raise ValueError(f"limit must be a non-negative int or None, got {limit!r}")
        limit = int(limit)
    source = _find_source(name, split, data_dir)
    cache = _Cache(cache_dir, name, split, source)
    arrays = cache.load(None)
    # Only image trees are decoded partially for a `limit`; other formats are cheap to read whole.
    partial = max(limit, 1) if source.kind == "image_tree" and limit is not None else None
    if arrays is None and partial is not None:
        arrays = cache.load(partial)
    if arrays is None:
        arrays = _decode(name, source, split, partial)
        cache.save(partial, *arrays)
    images, labels, tag = arrays
    if limit is not None and limit < len(labels):
        images, labels = images[:limit].copy(), labels[:limit].copy()
    if not images.flags.writeable:
        images = images.copy()
    return Dataset(images=images, labels=labels.astype(np.int32, copy=False), name=name,
                   split=split, tag=tag, num_classes=_NUM_CLASSES[name])


def load_tfds(name: str, split: str, manual_dir: str | os.PathLike | None = None,
              data_dir: str | os.PathLike | None = None) -> Dataset:
    """Load a dataset split through tensorflow-datasets (optional extra, needs TensorFlow)."""
    name, split = _check_name(name), _check_split(split)
    try:
        tfds = importlib.import_module("tensorflow_datasets")
        if importlib.util.find_spec("tensorflow") is None:
            raise ModuleNotFoundError("No module named 'tensorflow'", name="tensorflow")
    except ImportError as e:
        raise ImportError(
            f"load_tfds needs tensorflow-datasets and TensorFlow ({e}); they are an optional "
            'extra: pip install -e ".[tfds]". Without them use pimjax.data.load_dataset with '
            "local files.") from e
    builder = tfds.builder(name, data_dir=None if data_dir is None else os.fspath(data_dir))
    if manual_dir is not None:
        config = tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir),
                                              try_download_gcs=False)
        builder.download_and_prepare(download_config=config)
    else:
        builder.download_and_prepare()
    ds = builder.as_dataset(split=split, batch_size=-1, as_supervised=True)
    images, labels = tfds.as_numpy(ds)
    return Dataset(images=np.asarray(images, np.uint8), labels=np.asarray(labels, np.int32),
                   name=name, split=split, tag=f"tfds:{name}",
                   num_classes=int(builder.info.features["label"].num_classes))


# --------------------------------------------------------------------------- jax transforms


@functools.partial(jax.jit, static_argnames="name")
def normalize(images, name: str) -> jnp.ndarray:
    """Map uint8 pixels to float32 standardized by the dataset's per-channel MEAN_STD."""
    mean, std = MEAN_STD[_base_name(name)]
    x = jnp.asarray(images, jnp.float32)
    if x.shape[-1] != len(mean):
        raise ValueError(f"{name} has {len(mean)} channel(s), images have shape {x.shape}")
    return (x / 255.0 - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


@functools.partial(jax.jit, static_argnames="pad")
def augment(key: jax.Array, images: jnp.ndarray, pad: int = 4) -> jnp.ndarray:
    """Per-image random crop (zero padding of `pad` pixels) and random horizontal flip."""
    if images.ndim != 4:
        raise ValueError(f"augment expects a batch [B,H,W,C], got shape {images.shape}")
    b, h, w, c = images.shape
    k_crop, k_flip = jax.random.split(key)
    offsets = jax.random.randint(k_crop, (b, 2), 0, 2 * pad + 1)
    flips = jax.random.bernoulli(k_flip, 0.5, (b,))
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

    def one(img, off, flip):
        out = jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))
        return jnp.where(flip, out[:, ::-1], out)

    return jax.vmap(one)(padded, offsets, flips)


# --------------------------------------------------------------------------- internals


@dataclasses.dataclass(frozen=True)
class _Source:
    kind: str  # "idx" | "cifar_binary" | "image_tree"
    paths: tuple[Path, ...]
    bundled: bool = False


def _check_name(name: str) -> str:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")
    return name


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return split


def _base_name(name: str) -> str:
    """Dataset name from a name or provenance tag ("tfds:mnist", "cifar10-jpeg")."""
    base = re.sub(r"^tfds:", "", name).split("-")[0]
    if base not in MEAN_STD:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")
    return base


def _check_labels(labels: np.ndarray, num_classes: int, source) -> None:
    if labels.size and int(labels.max()) >= num_classes:
        raise ValueError(f"{source}: label {int(labels.max())} out of range for "
                         f"{num_classes} classes")


def _read_maybe_gzip(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix != ".gz":
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: not a valid gzip file ({e})") from e


def _read_cifar_members(path: Path) -> dict[str, bytes]:
    """The *.bin files of a CIFAR archive or folder, by base name."""
    if path.is_dir():
        return {p.name: p.read_bytes() for p in sorted(path.glob("*.bin"))}
    return {Path(n).name: data for n, data in _read_tar(path, lambda n: n.endswith(".bin"))}


def _list_image_tree(path: Path, split: str):
    """[(class, member path, read_fn)] for every `<split>/<class>/<image>` in a folder or tar."""
    def wanted(parts):
        return (len(parts) >= 3 and parts[-3] == split and parts[-1].lower().endswith(
            _IMAGE_SUFFIXES) and not any(p.startswith((".", "__MACOSX")) for p in parts))

    if path.is_dir():
        files = [p for p in path.rglob(f"{split}/*/*") if p.is_file()]
        return [(p.parts[-2], str(p.relative_to(path)), p.read_bytes) for p in files
                if wanted(p.relative_to(path).parts)]
    members = _read_tar(path, lambda n: wanted(Path(n).parts))
    return [(Path(n).parts[-2], n, lambda d=data: d) for n, data in members]


def _read_tar(path: Path, keep) -> list[tuple[str, bytes]]:
    """(name, bytes) of the regular files of a tar or .tar.gz whose name passes `keep`."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)  # at once: much faster than tarfile's streaming gunzip
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            return [(m.name, tar.extractfile(m).read()) for m in tar
                    if m.isfile() and keep(m.name)]
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: not a readable tar or .tar.gz archive ({e})") from e


def _decode_image(data: bytes, mode: str, source: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(im.convert(mode))
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{source}: cannot decode image ({e})") from e
    return arr[..., None] if arr.ndim == 2 else arr


def _search_roots(name: str, data_dir) -> list[Path]:
    if data_dir is None:
        data_dir = os.environ.get("PIMJAX_DATA_DIR") or None
    if data_dir is None:
        return []
    base = Path(data_dir).expanduser()
    extra = ["cifar10_jpeg"] if name == "cifar10" else []
    return [base] + [base / sub for sub in [name, *extra]]


def _find_source(name: str, split: str, data_dir) -> _Source:
    roots = _search_roots(name, data_dir)
    if name in ("mnist", "fashion_mnist"):
        return _find_idx(name, split, roots, bundled=data_dir is None and name == "mnist")
    return _find_cifar(name, split, roots)


def _find_idx(name: str, split: str, roots: list[Path], bundled: bool) -> _Source:
    stems = _IDX_NAMES[split]
    for root in roots:
        found = [next((p for p in (root / f"{s}.gz", root / s) if p.is_file()), None)
                 for s in stems]
        if all(found):
            return _Source("idx", tuple(found))
    packaged = tuple(_BUNDLED_MNIST / f"{s}.gz" for s in stems)
    if bundled and all(p.is_file() for p in packaged):
        return _Source("idx", packaged, bundled=True)
    n = _IDX_COUNTS[split]
    expect = [f"the copy bundled with pimjax in {_BUNDLED_MNIST} is missing: reinstall pimjax"
              ] if bundled else []
    for stem, (magic, shape) in zip(stems, ((2051, f"{n}x28x28"), (2049, f"{n}")), strict=True):
        size = _MNIST_FILES[f"{stem}.gz"][0] if name == "mnist" else None
        kind = "images" if magic == 2051 else "labels"
        nbytes = f", {size} bytes" if size else ""
        expect.append(f"{stem}.gz (gzip IDX {kind}{nbytes}, magic {magic}, {shape} uint8; "
                      "or uncompressed without .gz)")
    raise FileNotFoundError(_missing_message(name, split, roots, expect))


def _find_cifar(name: str, split: str, roots: list[Path]) -> _Source:
    archive, folder = _CIFAR_ARCHIVES[name], _CIFAR_FOLDERS[name]
    first = _CIFAR_MEMBERS[name, split][0]
    for root in roots:
        if (root / archive).is_file():
            return _Source("cifar_binary", (root / archive,))
        for d in (root / folder, root):
            if (d / first).is_file():
                return _Source("cifar_binary", (d,))
    expect = [f"{archive} (CIFAR binary archive, members {folder}/"
              f"{', '.join(_CIFAR_MEMBERS[name, split])}), or that folder extracted"]
    if name == "cifar10":
        for root in roots:
            if (root / _CIFAR10_JPEG_ARCHIVE).is_file():
                return _Source("image_tree", (root / _CIFAR10_JPEG_ARCHIVE,))
            if (root / split / CIFAR10_CLASSES[0]).is_dir():
                return _Source("image_tree", (root,))
        expect.append(f"or {_CIFAR10_JPEG_ARCHIVE} / a folder of {split}/<class>/*.jpg|png "
                      "(class folders airplane ... truck)")
    raise FileNotFoundError(_missing_message(name, split, roots, expect))


def _missing_message(name: str, split: str, roots: list[Path], expect: list[str]) -> str:
    where = ("looked in: " + ", ".join(str(r) for r in roots) if roots else
             "no data folder given: pass data_dir=... or set PIMJAX_DATA_DIR")
    lines = "\n".join(f"  {e}" for e in expect)
    return (f"{name} '{split}' split not found ({where}). Expected:\n{lines}\n"
            f"Get the files from {_HOW_TO_GET[name]}, {_TFDS_HINT}.")


def _decode(name: str, source: _Source, split: str, limit: int | None):
    """(images, labels, tag) decoded from a located source."""
    path = source.paths[0]
    if source.kind == "idx":
        if source.bundled:
            _verify_bundled(source.paths)
        return (*read_idx_pair(*source.paths), name)
    if source.kind == "cifar_binary":
        return (*read_cifar_binary(path, split, name=name), name)
    images, labels, _ = read_image_tree(path, split, CIFAR10_CLASSES, "RGB", limit)
    if images.shape[1:] != (32, 32, 3):
        raise ValueError(f"{path}: expected 32x32 RGB images, got {images.shape[1:]}")
    # The shared JPEG copy is lossy; a folder of PNGs (lossless) gets its own tag.
    png_only = path.is_dir() and not any(
        f.suffix.lower() in (".jpg", ".jpeg") for f in path.rglob(f"{split}/*/*"))
    return images, labels, "cifar10-png" if png_only else "cifar10-jpeg"


def _verify_bundled(paths: tuple[Path, ...]) -> None:
    for p in paths:
        size, sha = _MNIST_FILES[p.name]
        if not p.is_file():
            raise FileNotFoundError(f"bundled MNIST file {p} is missing; reinstall pimjax")
        got = hashlib.sha256(p.read_bytes()).hexdigest()
        if got != sha:
            raise ValueError(f"bundled MNIST file {p} is corrupt ({p.stat().st_size} bytes, "
                             f"sha256 {got}; expected {size} bytes, sha256 {sha}); "
                             "reinstall pimjax")


class _Cache:
    """`.npz` cache of decoded arrays, keyed by source path, size and mtime."""

    def __init__(self, cache_dir, name: str, split: str, source: _Source):
        if cache_dir is None:
            cache_dir = os.environ.get("PIMJAX_CACHE_DIR") or Path.home() / ".cache" / "pimjax"
        self.dir = Path(cache_dir).expanduser()
        where = hashlib.sha256(str([str(p.resolve()) for p in source.paths]).encode())
        self.prefix = f"{name}-{split}-{where.hexdigest()[:8]}"
        state = json.dumps([_CACHE_VERSION, source.kind, _stat_key(source, split)])
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


def _stat_key(source: _Source, split: str) -> list:
    """[path, size, mtime_ns] of each file the source is read from."""
    files = []
    for p in source.paths:
        if not p.is_dir():
            files.append(p)
        elif source.kind == "cifar_binary":
            files.extend(sorted(p.glob("*.bin")))
        else:
            files.extend(sorted(f for f in p.rglob(f"{split}/*/*") if f.is_file()))
    return [[str(f), (s := f.stat()).st_size, s.st_mtime_ns] for f in files]
