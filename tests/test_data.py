"""Tests for pimjax.data: offline readers, cache, errors, normalize and augment."""

import gzip
import io
import os
import shutil
import struct
import sys
import tarfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from pimjax import data

SHARED = Path("/work/shared/data")
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# --------------------------------------------------------------------------- file builders


def idx_bytes(arr: np.ndarray, magic: int) -> bytes:
    return struct.pack(f">I{arr.ndim}I", magic, *arr.shape) + arr.astype(np.uint8).tobytes()


def write_idx(path: Path, arr: np.ndarray, magic: int) -> None:
    raw = idx_bytes(arr, magic)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def make_idx_dir(folder: Path, n_train=7, n_test=5, seed=0, gz=True) -> dict:
    """An MNIST-like folder; returns {split: (images [N,28,28], labels [N])}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        stem_i, stem_l = data._IDX_NAMES[split]
        ext = ".gz" if gz else ""
        write_idx(folder / (stem_i + ext), images, 2051)
        write_idx(folder / (stem_l + ext), labels, 2049)
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


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("PIMJAX_DATA_DIR", raising=False)
    monkeypatch.delenv("PIMJAX_CACHE_DIR", raising=False)


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [True, False])
def test_idx_dataset_folder(tmp_path, cache, gz):
    truth = make_idx_dir(tmp_path / "mnist", gz=gz)
    for split in ("train", "test"):
        ds = data.load_dataset("mnist", split, data_dir=tmp_path / "mnist", cache_dir=cache)
        images, labels = truth[split]
        assert ds.images.shape == (len(images), 28, 28, 1) and ds.images.dtype == np.uint8
        assert ds.labels.dtype == np.int32 and len(ds) == len(labels)
        np.testing.assert_array_equal(ds.images[..., 0], images)
        np.testing.assert_array_equal(ds.labels, labels)
        assert (ds.name, ds.split, ds.tag, ds.num_classes) == ("mnist", split, "mnist", 10)


def test_idx_parent_folder_and_fashion(tmp_path, cache):
    truth = make_idx_dir(tmp_path / "fashion_mnist", seed=5)
    ds = data.load_dataset("fashion_mnist", "test", data_dir=tmp_path, cache_dir=cache)
    np.testing.assert_array_equal(ds.images[..., 0], truth["test"][0])
    assert ds.tag == "fashion_mnist"


def test_env_data_dir(tmp_path, cache, monkeypatch):
    truth = make_idx_dir(tmp_path / "fashion_mnist", seed=5)
    monkeypatch.setenv("PIMJAX_DATA_DIR", str(tmp_path))
    ds = data.load_dataset("fashion_mnist", "train", cache_dir=cache)
    np.testing.assert_array_equal(ds.labels, truth["train"][1])


def test_limit(tmp_path, cache):
    truth = make_idx_dir(tmp_path)
    ds = data.load_dataset("mnist", "train", data_dir=tmp_path, cache_dir=cache, limit=3)
    assert len(ds) == 3
    np.testing.assert_array_equal(ds.labels, truth["train"][1][:3])
    assert len(data.load_dataset("mnist", "train", data_dir=tmp_path, cache_dir=cache)) == 7


# --------------------------------------------------------------------------- CIFAR binary


def test_cifar10_binary_archive(tmp_path, cache):
    (tmp_path / "cifar10").mkdir()
    truth = make_cifar10_tar(tmp_path / "cifar10" / "cifar-10-binary.tar.gz")
    for split, n in (("train", 10), ("test", 3)):
        ds = data.load_dataset("cifar10", split, data_dir=tmp_path, cache_dir=cache)
        assert ds.images.shape == (n, 32, 32, 3)
        np.testing.assert_array_equal(ds.images, truth[split][0])
        np.testing.assert_array_equal(ds.labels, truth[split][1])
        assert (ds.tag, ds.num_classes) == ("cifar10", 10)


def test_cifar10_extracted_folder(tmp_path, cache):
    raw, images, labels = cifar_records(4, 1, seed=1)
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    (folder / "test_batch.bin").write_bytes(raw)
    ds = data.load_dataset("cifar10", "test", data_dir=tmp_path, cache_dir=cache)
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, labels[:, 0])


def test_cifar100_fine_and_coarse(tmp_path, cache):
    raw_train, img_train, lab_train = cifar_records(6, 2, seed=1)
    raw_test, img_test, lab_test = cifar_records(4, 2, seed=2)
    archive = tmp_path / "cifar-100-binary.tar.gz"
    write_tar(archive, {"cifar-100-binary/train.bin": raw_train,
                        "cifar-100-binary/test.bin": raw_test})
    ds = data.load_dataset("cifar100", "test", data_dir=tmp_path, cache_dir=cache)
    np.testing.assert_array_equal(ds.images, img_test)
    np.testing.assert_array_equal(ds.labels, lab_test[:, 1])  # fine label
    assert (ds.tag, ds.num_classes) == ("cifar100", 100)
    images, coarse = data.read_cifar_binary(archive, "train", coarse=True)
    np.testing.assert_array_equal(images, img_train)
    np.testing.assert_array_equal(coarse, lab_train[:, 0])
    assert coarse.max() < 20


def test_cifar10_prefers_binary_over_jpeg(tmp_path, cache):
    truth = make_cifar10_tar(tmp_path / "cifar-10-binary.tar.gz")
    write_tar(tmp_path / data._CIFAR10_JPEG_ARCHIVE,
              {k: png_bytes(v) for k, v in tree_images().items()})
    ds = data.load_dataset("cifar10", "test", data_dir=tmp_path, cache_dir=cache)
    assert ds.tag == "cifar10"
    np.testing.assert_array_equal(ds.images, truth["test"][0])


# --------------------------------------------------------------------------- image trees


def check_tree(ds, imgs, split="test"):
    # Ordered by (file name, class index): classes interleave.
    names = sorted((k for k in imgs if k.startswith(split + "/")),
                   key=lambda k: (Path(k).name, data.CIFAR10_CLASSES.index(Path(k).parts[1])))
    np.testing.assert_array_equal(ds.images, np.stack([imgs[k] for k in names]))
    want = [data.CIFAR10_CLASSES.index(Path(k).parts[1]) for k in names]
    np.testing.assert_array_equal(ds.labels, want)
    assert want[:3] == [0, 3, 9]


def test_image_tree_tarball_with_top_folder(tmp_path, cache):
    imgs = tree_images()
    folder = tmp_path / "cifar10_jpeg"
    folder.mkdir()
    write_tar(folder / data._CIFAR10_JPEG_ARCHIVE,
              {f"top/{k}": png_bytes(v) for k, v in imgs.items()})
    ds = data.load_dataset("cifar10", "test", data_dir=tmp_path, cache_dir=cache)
    check_tree(ds, imgs)
    assert (ds.tag, ds.num_classes, ds.images.shape) == ("cifar10-jpeg", 10, (6, 32, 32, 3))
    ds = data.load_dataset("cifar10", "train", data_dir=tmp_path, cache_dir=cache, limit=4)
    assert ds.labels.tolist() == [0, 3, 9, 0]


def test_image_tree_folder_png_and_jpeg(tmp_path, cache):
    imgs = tree_images()
    for rel, arr in imgs.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(png_bytes(arr))
    ds = data.load_dataset("cifar10", "test", data_dir=tmp_path, cache_dir=cache)
    check_tree(ds, imgs)
    assert ds.tag == "cifar10-png"
    # A JPEG tree through the generic reader: lossy, so compare approximately.
    jpg = tmp_path / "jpg"
    smooth = np.broadcast_to(np.linspace(0, 255, 32, dtype=np.uint8)[None, :, None], (32, 32, 3))
    for c in ("b", "a"):
        (jpg / "train" / c).mkdir(parents=True)
        (jpg / "train" / c / "0.jpg").write_bytes(png_bytes(np.ascontiguousarray(smooth), "JPEG"))
    images, labels, classes = data.read_image_tree(jpg, "train")
    assert classes == ("a", "b") and labels.tolist() == [0, 1]
    assert np.abs(images.astype(int) - smooth).max() < 12


# --------------------------------------------------------------------------- cache


def test_cache_written_reused_and_invalidated(tmp_path, cache, monkeypatch):
    make_idx_dir(tmp_path)
    first = data.load_dataset("mnist", "test", data_dir=tmp_path, cache_dir=cache)
    files = list(cache.glob("*.npz"))
    assert len(files) == 1 and not list(cache.glob("*.tmp"))

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded again despite the cache")

    with monkeypatch.context() as m:
        m.setattr(data, "_decode", no_decode)
        again = data.load_dataset("mnist", "test", data_dir=tmp_path, cache_dir=cache)
        np.testing.assert_array_equal(again.images, first.images)
        assert again.tag == "mnist" and again.images.flags.writeable
        # A limited load is served from the full cache too.
        assert len(data.load_dataset("mnist", "test", data_dir=tmp_path, cache_dir=cache,
                                     limit=2)) == 2

    # Change the source (new content, new mtime): the cache is rebuilt, the stale file dropped.
    new = make_idx_dir(tmp_path, n_test=6, seed=1)
    stamp = os.stat(tmp_path / "t10k-images-idx3-ubyte.gz").st_mtime_ns + 10**9
    os.utime(tmp_path / "t10k-images-idx3-ubyte.gz", ns=(stamp, stamp))
    changed = data.load_dataset("mnist", "test", data_dir=tmp_path, cache_dir=cache)
    np.testing.assert_array_equal(changed.images[..., 0], new["test"][0])
    assert len(list(cache.glob("*.npz"))) == 1 and list(cache.glob("*.npz")) != files


def test_cache_env_and_corrupt_cache_file(tmp_path, monkeypatch):
    make_idx_dir(tmp_path)
    monkeypatch.setenv("PIMJAX_CACHE_DIR", str(tmp_path / "envcache"))
    data.load_dataset("mnist", "test", data_dir=tmp_path)
    (path,) = (tmp_path / "envcache").glob("*.npz")
    path.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable cache"):
        assert len(data.load_dataset("mnist", "test", data_dir=tmp_path)) == 5


# --------------------------------------------------------------------------- errors


def test_unknown_name_and_split(tmp_path):
    with pytest.raises(ValueError, match="cifar100"):
        data.load_dataset("svhn", data_dir=tmp_path)
    with pytest.raises(ValueError, match="'train', 'test'"):
        data.load_dataset("mnist", "validation", data_dir=tmp_path)


def test_missing_files_messages(tmp_path, cache):
    with pytest.raises(FileNotFoundError) as e:
        data.load_dataset("mnist", "train", data_dir=tmp_path, cache_dir=cache)
    msg = str(e.value)
    for part in (str(tmp_path), "train-images-idx3-ubyte.gz", "9912422 bytes", "magic 2051",
                 "train-labels-idx1-ubyte.gz", "magic 2049", "MNIST distribution", "[tfds]"):
        assert part in msg
    with pytest.raises(FileNotFoundError, match="cifar-10-binary.tar.gz") as e:
        data.load_dataset("cifar10", "test", data_dir=tmp_path, cache_dir=cache)
    assert data._CIFAR10_JPEG_ARCHIVE in str(e.value)
    with pytest.raises(FileNotFoundError, match="No offline copy of CIFAR-100") as e:
        data.load_dataset("cifar100", data_dir=tmp_path, cache_dir=cache)
    assert "cifar-100-binary.tar.gz" in str(e.value)
    with pytest.raises(FileNotFoundError, match="PIMJAX_DATA_DIR"):
        data.load_dataset("fashion_mnist", cache_dir=cache)


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda raw: raw[:3] + b"\x09" + raw[4:], "bad IDX magic number 2057, expected 2051"),
        (lambda raw: raw[:-100], "truncated"),
        (lambda raw: raw + b"\x00", "trailing bytes"),
    ],
)
def test_corrupt_idx(tmp_path, cache, corrupt, match):
    make_idx_dir(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(corrupt(gzip.decompress(path.read_bytes()))))
    with pytest.raises(ValueError, match=match) as e:
        data.load_dataset("mnist", "test", data_dir=tmp_path, cache_dir=cache)
    assert str(path) in str(e.value)


def test_not_gzip_and_swapped_files(tmp_path, cache):
    make_idx_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"plain text, not gzip")
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz: not a valid gzip"):
        data.load_dataset("mnist", "test", data_dir=tmp_path, cache_dir=cache)
    labels = np.zeros(5, np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", labels, 2049)
    with pytest.raises(ValueError, match="magic number 2049, expected 2051"):
        data.load_dataset("mnist", "test", data_dir=tmp_path, cache_dir=cache)


def test_corrupt_cifar(tmp_path, cache):
    raw, _, _ = cifar_records(3, 1, seed=0)
    member = "cifar-10-batches-bin/test_batch.bin"
    write_tar(tmp_path / "cifar-10-binary.tar.gz", {member: raw[:-7]})
    with pytest.raises(ValueError, match="test_batch.bin: 9212 bytes .* 3073-byte"):
        data.load_dataset("cifar10", "test", data_dir=tmp_path, cache_dir=cache)
    raw100, _, _ = cifar_records(3, 2, seed=0)  # CIFAR-100 records named as CIFAR-10
    write_tar(tmp_path / "cifar-10-binary.tar.gz", {member: raw100})
    with pytest.raises(ValueError, match="wrong record size"):
        data.load_dataset("cifar10", "test", data_dir=tmp_path, cache_dir=cache)
    (tmp_path / "cifar-10-binary.tar.gz").write_bytes(b"\x1f\x8b not really")
    with pytest.raises(ValueError, match="cifar-10-binary.tar.gz: not a readable"):
        data.load_dataset("cifar10", "test", data_dir=tmp_path, cache_dir=cache)
    write_tar(tmp_path / "cifar-10-binary.tar.gz", {"cifar-10-batches-bin/data_batch_1.bin": raw})
    with pytest.raises(ValueError, match="missing .*data_batch_2.bin"):
        data.load_dataset("cifar10", "train", data_dir=tmp_path, cache_dir=cache)


def test_corrupt_image_tree(tmp_path, cache):
    (tmp_path / "test" / "airplane").mkdir(parents=True)
    (tmp_path / "test" / "airplane" / "0.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="0.jpg: cannot decode"):
        data.load_dataset("cifar10", "test", data_dir=tmp_path, cache_dir=cache)
    (tmp_path / "test" / "kitten").mkdir()
    (tmp_path / "test" / "kitten" / "0.png").write_bytes(png_bytes(np.zeros((32, 32, 3), "u1")))
    with pytest.raises(ValueError, match="unknown class folder.*kitten"):
        data.load_dataset("cifar10", "test", data_dir=tmp_path, cache_dir=cache)


# --------------------------------------------------------------------------- bundled MNIST


def test_bundled_mnist_test_split_and_normalize(cache):
    ds = data.load_dataset("mnist", "test", cache_dir=cache)
    assert ds.images.shape == (10000, 28, 28, 1) and ds.tag == "mnist"
    assert np.bincount(ds.labels).tolist() == MNIST_TEST_COUNTS
    x = np.asarray(data.normalize(ds.images, "mnist"))
    assert x.dtype == np.float32 and x.shape == ds.images.shape
    assert abs(x.mean()) < 0.05 and abs(x.std() - 1) < 0.05


def test_bundled_mnist_corrupt(tmp_path, cache, monkeypatch):
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(data._BUNDLED_MNIST / name, tmp_path / name)
    raw = bytearray((tmp_path / "t10k-labels-idx1-ubyte.gz").read_bytes())
    raw[100] ^= 0xFF
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(bytes(raw))
    monkeypatch.setattr(data, "_BUNDLED_MNIST", tmp_path)
    with pytest.raises(ValueError, match="bundled MNIST file .*t10k-labels.* corrupt"):
        data.load_dataset("mnist", "test", cache_dir=cache)
    monkeypatch.setattr(data, "_BUNDLED_MNIST", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="bundled with pimjax .* missing"):
        data.load_dataset("mnist", "test", cache_dir=cache)


# --------------------------------------------------------------------------- normalize / augment


def test_normalize_constants_and_jit():
    img = np.full((2, 4, 4, 3), 128, np.uint8)
    mean, std = data.MEAN_STD["cifar10"]
    want = (128 / 255 - np.array(mean)) / np.array(std)
    f = jax.jit(data.normalize, static_argnames="name")
    for out in (data.normalize(img, "cifar10"), f(jnp.asarray(img), name="cifar10"),
                data.normalize(img, "cifar10-jpeg")):
        np.testing.assert_allclose(np.asarray(out)[0, 0, 0], want, rtol=1e-5)
    with pytest.raises(ValueError, match="channel"):
        data.normalize(img, "mnist")
    with pytest.raises(ValueError, match="unknown dataset"):
        data.normalize(img, "svhn")


def crops_and_flips(img: np.ndarray, pad: int = 4):
    h, w = img.shape[:2]
    padded = np.pad(img, ((pad, pad), (pad, pad), (0, 0)))
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[dy:dy + h, dx:dx + w]
            yield (dy, dx, False), crop
            yield (dy, dx, True), crop[:, ::-1]


def test_augment_properties():
    # Eager jax.random ops compile slowly on CPU: build inputs with numpy.
    x = np.random.default_rng(0).uniform(1, 2, (16, 8, 8, 3)).astype(np.float32)  # nonzero
    key = jax.random.PRNGKey(42)
    aug = data.augment  # jitted itself
    out = np.asarray(aug(key, x))
    assert out.shape == x.shape and out.dtype == np.float32
    np.testing.assert_array_equal(out, np.asarray(data.augment(key, x)))  # same key, same result
    assert not np.array_equal(out, np.asarray(aug(jax.random.PRNGKey(1), x)))
    assert not np.array_equal(out, x)
    seen = set()
    for img, res in zip(x, out, strict=True):
        matches = [p for p, cand in crops_and_flips(img) if np.array_equal(cand, res)]
        assert matches, "output is not a padded crop / flip of its input"
        seen.add(matches[0][2])
    assert seen == {False, True}  # both flipped and unflipped images in the batch


def test_augment_known_pixels():
    img = np.arange(1, 5, dtype=np.float32).reshape(1, 2, 2, 1)  # [[1,2],[3,4]]
    batch = np.tile(img, (512, 1, 1, 1))
    outs = {tuple(row) for row in np.asarray(data.augment(jax.random.PRNGKey(0), batch, pad=1))
            .reshape(512, 4).tolist()}
    # Identity, flip, and e.g. a shift down-right by one pixel (zero row/column come in).
    assert {(1, 2, 3, 4), (2, 1, 4, 3), (0, 0, 0, 1)} <= outs
    assert len(outs) == 18  # 3x3 offsets x flip, all distinct for this image
    with pytest.raises(ValueError, match="batch"):
        data.augment(jax.random.PRNGKey(0), img[0])


# --------------------------------------------------------------------------- TFDS


def test_load_tfds_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import now fails
    with pytest.raises(ImportError, match=r'pip install -e "\.\[tfds\]"'):
        data.load_tfds("mnist", "train")


# --------------------------------------------------------------------------- real data


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "cifar10_jpeg" / data._CIFAR10_JPEG_ARCHIVE).is_file(),
                    reason="shared CIFAR-10 JPEG tarball absent")
def test_real_cifar10_jpeg_limit(cache):
    ds = data.load_dataset("cifar10", "test", data_dir=SHARED, cache_dir=cache, limit=40)
    assert ds.images.shape == (40, 32, 32, 3) and ds.tag == "cifar10-jpeg"
    assert ds.labels.tolist() == list(range(10)) * 4
