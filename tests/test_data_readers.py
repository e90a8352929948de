"""Tests for pimjax.data's readers through load_dataset: IDX, CIFAR binary, image trees."""

from pathlib import Path

import numpy as np
import pytest
from datafiles import (
    MNIST_TEST_COUNTS,
    cifar_records,
    clear_env,
    make_cifar10_tar,
    make_idx_dir,
    png_bytes,
    real_data,
    tree_images,
    write_tar,
)

from pimjax import data
from pimjax.data.locate import CIFAR10_JPEG_ARCHIVE


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    clear_env(monkeypatch)


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
    write_tar(tmp_path / CIFAR10_JPEG_ARCHIVE,
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
    write_tar(folder / CIFAR10_JPEG_ARCHIVE,
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


# --------------------------------------------------------------------------- bundled MNIST


def test_bundled_mnist_test_split_and_normalize(cache):
    ds = data.load_dataset("mnist", "test", cache_dir=cache)
    assert ds.images.shape == (10000, 28, 28, 1) and ds.tag == "mnist"
    assert np.bincount(ds.labels).tolist() == MNIST_TEST_COUNTS
    x = np.asarray(data.normalize(ds.images, "mnist"))
    assert x.dtype == np.float32 and x.shape == ds.images.shape
    assert abs(x.mean()) < 0.05 and abs(x.std() - 1) < 0.05


# --------------------------------------------------------------------------- real data


@pytest.mark.slow
def test_real_cifar10_jpeg_limit(cache):
    folder = real_data("cifar10_jpeg/" + CIFAR10_JPEG_ARCHIVE).parent.parent
    ds = data.load_dataset("cifar10", "test", data_dir=folder, cache_dir=cache, limit=40)
    assert ds.images.shape == (40, 32, 32, 3) and ds.tag == "cifar10-jpeg"
    assert ds.labels.tolist() == list(range(10)) * 4
