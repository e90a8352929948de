"""Every user-facing error of pimjax.data is one line, of the right type, naming file and fix."""

import gzip
import shutil

import numpy as np
import pytest
from datafiles import cifar_records, clear_env, make_idx_dir, png_bytes, write_idx, write_tar

import pimjax.data.locate as locate
from pimjax import data


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    clear_env(monkeypatch)


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def raises_one_line(exc, match, fn, *args, **kwargs) -> str:
    """Call fn, check it raises `exc` matching `match` with a one-line message; return it."""
    with pytest.raises(exc, match=match) as e:
        fn(*args, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg and "\r" not in msg, msg
    return msg


def test_unknown_name_and_split(tmp_path):
    raises_one_line(ValueError, "cifar100", data.load_dataset, "svhn", data_dir=tmp_path)
    raises_one_line(ValueError, "'train', 'test'", data.load_dataset, "mnist", "validation",
                    data_dir=tmp_path)
    raises_one_line(ValueError, "cifar100", data.info, "svhn")
    raises_one_line(ValueError, "download must be", data.load_dataset, "mnist", download="yes")


def test_missing_files_messages(tmp_path, cache):
    msg = raises_one_line(FileNotFoundError, "MNIST 'train' split not found",
                          data.load_dataset, "mnist", "train", data_dir=tmp_path, cache_dir=cache)
    for part in (str(tmp_path), "train-images-idx3-ubyte.gz", "9912422 bytes", "magic 2051",
                 "train-labels-idx1-ubyte.gz", "magic 2049", f"in {tmp_path / 'mnist'}",
                 "https://storage.googleapis.com/cvdf-datasets/mnist/train-images-idx3-ubyte.gz",
                 "no download since data_dir was given", "download=True", "[tfds]"):
        assert part in msg
    msg = raises_one_line(FileNotFoundError, "cifar-10-binary.tar.gz", data.load_dataset,
                          "cifar10", "test", data_dir=tmp_path, cache_dir=cache)
    assert locate.CIFAR10_JPEG_ARCHIVE in msg and "170052171 bytes" in msg
    msg = raises_one_line(FileNotFoundError, "no copy of CIFAR-100 ships with pimjax",
                          data.load_dataset, "cifar100", data_dir=tmp_path, cache_dir=cache)
    assert "cifar-100-binary.tar.gz" in msg and "https://www.cs.toronto.edu/~kriz/" in msg
    # No data folder: the message says where to put the files and that downloads are off.
    msg = raises_one_line(FileNotFoundError, "PIMJAX_DATA_DIR", data.load_dataset,
                          "fashion_mnist", cache_dir=cache)
    assert "downloads are off: PIMJAX_OFFLINE is set" in msg
    assert f"in {cache / 'downloads' / 'fashion_mnist'}" in msg
    raises_one_line(FileNotFoundError, "downloads are off: download=False", data.load_dataset,
                    "cifar100", cache_dir=cache, download=False)


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda raw: raw[:3] + b"\x09" + raw[4:], "bad IDX magic number 2057, expected 2051"),
        (lambda raw: raw[:-100], "truncated"),
        (lambda raw: raw + b"\x00", "trailing bytes"),
        (lambda raw: raw[:3], "truncated IDX file"),
    ],
)
def test_corrupt_idx(tmp_path, cache, corrupt, match):
    make_idx_dir(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(corrupt(gzip.decompress(path.read_bytes()))))
    msg = raises_one_line(ValueError, match, data.load_dataset, "mnist", "test",
                          data_dir=tmp_path, cache_dir=cache)
    assert str(path) in msg


def test_not_gzip_truncated_gzip_and_swapped_files(tmp_path, cache):
    make_idx_dir(tmp_path)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    good = path.read_bytes()
    path.write_bytes(b"plain text, not gzip")
    raises_one_line(ValueError, "t10k-labels-idx1-ubyte.gz: not a valid gzip", data.load_dataset,
                    "mnist", "test", data_dir=tmp_path, cache_dir=cache)
    path.write_bytes(good[:-10])  # a download cut short
    raises_one_line(ValueError, "t10k-labels-idx1-ubyte.gz: not a valid gzip", data.load_dataset,
                    "mnist", "test", data_dir=tmp_path, cache_dir=cache)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros(5, np.uint8), 2049)
    path.write_bytes(good)
    raises_one_line(ValueError, "magic number 2049, expected 2051", data.load_dataset,
                    "mnist", "test", data_dir=tmp_path, cache_dir=cache)


def test_corrupt_cifar(tmp_path, cache):
    raw, _, _ = cifar_records(3, 1, seed=0)
    member = "cifar-10-batches-bin/test_batch.bin"
    archive = tmp_path / "cifar-10-binary.tar.gz"
    load = (data.load_dataset, "cifar10", "test")
    kw = dict(data_dir=tmp_path, cache_dir=cache)
    write_tar(archive, {member: raw[:-7]})
    raises_one_line(ValueError, "test_batch.bin: 9212 bytes .* 3073-byte", *load, **kw)
    raw100, _, _ = cifar_records(3, 2, seed=0)  # CIFAR-100 records named as CIFAR-10
    write_tar(archive, {member: raw100})
    raises_one_line(ValueError, "wrong record size", *load, **kw)
    archive.write_bytes(b"\x1f\x8b not really")
    raises_one_line(ValueError, "cifar-10-binary.tar.gz: not a readable", *load, **kw)
    write_tar(archive, {member: raw})
    archive.write_bytes(archive.read_bytes()[:-20])  # truncated tarball
    raises_one_line(ValueError, "cifar-10-binary.tar.gz: not a readable", *load, **kw)
    write_tar(archive, {"cifar-10-batches-bin/data_batch_1.bin": raw})
    raises_one_line(ValueError, "missing .*data_batch_2.bin", data.load_dataset, "cifar10",
                    "train", **kw)


def test_corrupt_and_empty_image_tree(tmp_path, cache):
    (tmp_path / "test" / "airplane").mkdir(parents=True)
    kw = dict(data_dir=tmp_path, cache_dir=cache)
    raises_one_line(ValueError, r"no images \(\*.jpg\|\*.jpeg\|\*.png\) found under 'test/",
                    data.load_dataset, "cifar10", "test", **kw)
    (tmp_path / "test" / "airplane" / "0.jpg").write_bytes(b"not a jpeg")
    raises_one_line(ValueError, "0.jpg: cannot decode", data.load_dataset, "cifar10", "test",
                    **kw)
    (tmp_path / "test" / "kitten").mkdir()
    (tmp_path / "test" / "kitten" / "0.png").write_bytes(png_bytes(np.zeros((32, 32, 3), "u1")))
    raises_one_line(ValueError, "unknown class folder.*kitten", data.load_dataset, "cifar10",
                    "test", **kw)
    write_tar(tmp_path / "empty.tar.gz", {"readme.txt": b"x"})
    raises_one_line(ValueError, "no images", data.read_image_tree, tmp_path / "empty.tar.gz")


def test_bundled_mnist_corrupt_or_missing(tmp_path, cache, monkeypatch):
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(locate.BUNDLED_MNIST / name, tmp_path / name)
    raw = bytearray((tmp_path / "t10k-labels-idx1-ubyte.gz").read_bytes())
    raw[100] ^= 0xFF
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(bytes(raw))
    monkeypatch.setattr(locate, "BUNDLED_MNIST", tmp_path)
    raises_one_line(ValueError, "bundled MNIST file .*t10k-labels.* corrupt.*reinstall pimjax",
                    data.load_dataset, "mnist", "test", cache_dir=cache)
    monkeypatch.setattr(locate, "BUNDLED_MNIST", tmp_path / "nowhere")
    msg = raises_one_line(FileNotFoundError, "bundled with pimjax .* missing", data.load_dataset,
                          "mnist", "test", cache_dir=cache)
    assert "downloads are off: PIMJAX_OFFLINE is set" in msg and "t10k-images-idx3-ubyte.gz" in msg
