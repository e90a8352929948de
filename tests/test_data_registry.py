"""pimjax.data.info: the one table of dataset facts, checked against the files themselves."""

import dataclasses
import gzip
import hashlib

import numpy as np
import pytest
from datafiles import MNIST_TEST_COUNTS

from pimjax import data
from pimjax.data.locate import BUNDLED_MNIST


def test_every_dataset_has_consistent_info():
    for name in data.DATASETS:
        i = data.info(name)
        assert i.name == name and len(i.image_shape) == 3
        assert len(i.mean) == len(i.std) == i.image_shape[2]
        assert data.MEAN_STD[name] == (i.mean, i.std)
        assert (i.split_size("train"), i.split_size("test")) == (i.train_size, i.test_size)
        for split in data.SPLITS:
            assert i.split_files(split)  # every split has official files
        for f in i.files:
            assert f.url.startswith(("http://", "https://")) and f.url.endswith("/" + f.name)
            assert len(f.sha256) == 64 and f.size > 0
        assert i.urls == tuple(f.url for f in i.files)
    with pytest.raises(dataclasses.FrozenInstanceError):
        data.info("mnist").num_classes = 3
    with pytest.raises(ValueError, match="unknown split"):
        data.info("mnist").split_files("valid")


def test_known_facts():
    # Independent sources: the datasets' own pages (shapes, classes, split sizes).
    facts = {"mnist": ((28, 28, 1), 10, 60000, 10000),
             "fashion_mnist": ((28, 28, 1), 10, 60000, 10000),
             "cifar10": ((32, 32, 3), 10, 50000, 10000),
             "cifar100": ((32, 32, 3), 100, 50000, 10000)}
    for name, want in facts.items():
        i = data.info(name)
        assert (i.image_shape, i.num_classes, i.train_size, i.test_size) == want


def test_registry_matches_the_bundled_official_mnist():
    for f in data.info("mnist").files:
        raw = (BUNDLED_MNIST / f.name).read_bytes()
        assert len(raw) == f.size and hashlib.sha256(raw).hexdigest() == f.sha256
        assert hashlib.sha256(gzip.decompress(raw)).hexdigest() == f.sha256_raw
    labels = data.read_idx(BUNDLED_MNIST / "t10k-labels-idx1-ubyte.gz")
    assert len(labels) == data.info("mnist").test_size
    assert np.bincount(labels).tolist() == MNIST_TEST_COUNTS
    images = data.read_idx(BUNDLED_MNIST / "train-images-idx3-ubyte.gz")
    assert images.shape == (data.info("mnist").train_size, 28, 28)
    # The published normalisation constants of MNIST, from the training pixels.
    np.testing.assert_allclose(images.mean() / 255, data.info("mnist").mean, atol=5e-5)
    np.testing.assert_allclose(images.std() / 255, data.info("mnist").std, atol=5e-5)
