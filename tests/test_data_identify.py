"""MNIST and Fashion-MNIST share their IDX file names: load_dataset must tell them apart by
content (pimjax.data.identify) and refuse one loaded under the other's name, while synthetic
fixtures, unknown content and files too small to tell still load."""

import gzip
import shutil

import numpy as np
import pytest
from datafiles import clear_env, make_idx_dir, real_data, write_idx_split

from pimjax import data
from pimjax.data import identify
from pimjax.data.locate import BUNDLED_MNIST
from pimjax.data.registry import Fingerprint


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    clear_env(monkeypatch)


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def mnist_test():
    """The bundled MNIST test split: (images [N,28,28], labels [N])."""
    return (data.read_idx(BUNDLED_MNIST / "t10k-images-idx3-ubyte.gz"),
            data.read_idx(BUNDLED_MNIST / "t10k-labels-idx1-ubyte.gz"))


def one_line_error(exc, match, *args, **kwargs) -> str:
    with pytest.raises(exc, match=match) as e:
        data.load_dataset(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("split", ["test", "train"])
def test_fashion_files_loaded_as_mnist_are_refused(tmp_path, split):
    folder = real_data("fashion_mnist")  # a reordered copy: not the official checksums
    msg = one_line_error(ValueError, "holds Fashion-MNIST, not MNIST", "mnist", split,
                         data_dir=folder, cache_dir=tmp_path)
    assert "mean pixel 7" in msg and "load it as 'fashion_mnist'" in msg
    ds = data.load_dataset("fashion_mnist", split, data_dir=folder, cache_dir=tmp_path)
    assert np.bincount(ds.labels).tolist() == [len(ds) // 10] * 10


def test_official_mnist_files_loaded_as_fashion_are_refused(tmp_path, cache):
    folder = tmp_path / "fashion_mnist"
    folder.mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(BUNDLED_MNIST / name, folder / name)
    msg = one_line_error(ValueError, "holds MNIST, not Fashion-MNIST: it is the official MNIST "
                         "file t10k-images-idx3-ubyte.gz", "fashion_mnist", "test",
                         data_dir=tmp_path, cache_dir=cache)
    assert "load it as 'mnist'" in msg
    assert len(data.load_dataset("mnist", "test", data_dir=folder, cache_dir=cache)) == 10000


def test_official_file_of_the_other_split_is_refused(tmp_path, cache):
    for split in ("images-idx3", "labels-idx1"):
        shutil.copy(BUNDLED_MNIST / f"t10k-{split}-ubyte.gz", tmp_path / f"train-{split}-ubyte.gz")
    one_line_error(ValueError, "official MNIST file t10k-images-idx3-ubyte.gz, not "
                   "train-images-idx3-ubyte", "mnist", "train", data_dir=tmp_path,
                   cache_dir=cache)


@pytest.mark.parametrize("gz", [True, False])
def test_reordered_mnist_loaded_as_fashion_is_refused_by_content(tmp_path, cache, mnist_test,
                                                                 gz):
    images, labels = mnist_test
    order = np.random.default_rng(0).permutation(len(labels))
    write_idx_split(tmp_path, "test", images[order], labels[order], gz=gz)
    official = {s for f in data.info("mnist").files for s in (f.sha256, f.sha256_raw)}
    assert identify.sha256_file(tmp_path / ("t10k-images-idx3-ubyte" + ".gz" * gz)) not in official
    # The whole file is identified, whatever the limit.
    for limit in (None, 5):
        msg = one_line_error(ValueError, "holds MNIST, not Fashion-MNIST: its 10000 images have "
                             "mean pixel 33.79", "fashion_mnist", "test", data_dir=tmp_path,
                             cache_dir=cache, limit=limit)
        assert "load it as 'mnist'" in msg
    ds = data.load_dataset("mnist", "test", data_dir=tmp_path, cache_dir=cache)
    np.testing.assert_array_equal(ds.labels, labels[order])


def test_small_files_are_too_small_to_tell(tmp_path, cache, mnist_test):
    # With 5-standard-error bands, MNIST and Fashion-MNIST separate from 40 images up:
    # smaller files (fixtures) are never refused.
    images, labels = mnist_test
    pick = np.random.default_rng(1).choice(len(labels), 40, replace=False)
    for n, refused in ((39, False), (40, True)):
        write_idx_split(tmp_path, "test", images[pick[:n]], labels[pick[:n]])
        if refused:
            one_line_error(ValueError, f"its {n} images", "fashion_mnist", "test",
                           data_dir=tmp_path, cache_dir=cache)
        else:
            ds = data.load_dataset("fashion_mnist", "test", data_dir=tmp_path, cache_dir=cache)
            assert len(ds) == n
        assert len(data.load_dataset("mnist", "test", data_dir=tmp_path, cache_dir=cache)) == n


@pytest.mark.parametrize("fill", ["noise", "zeros", "constant"])
def test_unknown_content_loads_under_both_names(tmp_path, cache, fill):
    n = 1000
    rng = np.random.default_rng(2)
    images = {"noise": rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
              "zeros": np.zeros((n, 28, 28), np.uint8),
              "constant": np.full((n, 28, 28), 73, np.uint8)}[fill]
    write_idx_split(tmp_path, "train", images, rng.integers(0, 10, n, dtype=np.uint8))
    for name in ("mnist", "fashion_mnist"):
        ds = data.load_dataset(name, "train", data_dir=tmp_path, cache_dir=cache)
        assert ds.tag == name and len(ds) == n


def test_small_fixtures_load_under_both_names(tmp_path, cache):
    make_idx_dir(tmp_path, n_train=1, n_test=39)
    for name in ("mnist", "fashion_mnist"):
        for split in ("train", "test"):
            assert data.load_dataset(name, split, data_dir=tmp_path, cache_dir=cache).tag == name


def test_measure_hand_computed():
    images = np.array([[[0, 0], [0, 0]], [[0, 100], [200, 100]]], np.uint8)
    # Per-image means 0 and 100, zero fractions 1 and 0.25.
    assert identify.measure(images) == Fingerprint((50.0, 50.0), (0.625, 0.375))


def numpy_fingerprint(path):
    """(mean, sd) over images of the mean pixel and of the zero fraction, decoded here."""
    raw = gzip.decompress(path.read_bytes())
    x = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 784).astype(np.float64)
    m, z = x.mean(1), (x == 0).mean(1)
    return (m.mean(), m.std()), (z.mean(), z.std())


def check_fingerprints(name, folder):
    for split, stem in (("train", "train"), ("test", "t10k")):
        ref = data.info(name).fingerprint(split)
        (m, ms), (z, zs) = numpy_fingerprint(folder / f"{stem}-images-idx3-ubyte.gz")
        np.testing.assert_allclose([m, ms], ref.pixel_mean, atol=1e-4)
        np.testing.assert_allclose([z, zs], ref.zero_fraction, atol=1e-5)


def test_mnist_fingerprints_match_the_official_files():
    check_fingerprints("mnist", BUNDLED_MNIST)


def test_fashion_fingerprints_match_real_files():
    check_fingerprints("fashion_mnist", real_data("fashion_mnist"))
