"""pimjax.data.load_tfds: a clear error without TensorFlow, and one real build of MNIST."""

import hashlib
import importlib.util
import sys

import numpy as np
import pytest
from datafiles import clear_env

from pimjax import data
from pimjax.data.locate import BUNDLED_MNIST


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    clear_env(monkeypatch)


def test_load_tfds_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import now fails
    with pytest.raises(ImportError, match=r'pip install -e "\.\[tfds\]"') as e:
        data.load_tfds("mnist", "train")
    assert "\n" not in str(e.value)


def records(images: np.ndarray, labels: np.ndarray) -> list[str]:
    """Sorted digests of (image, label) records: compares two splits whatever their order."""
    return sorted(hashlib.sha1(im.tobytes() + bytes([int(lab)])).hexdigest()
                  for im, lab in zip(images, labels, strict=True))


@pytest.mark.slow
def test_load_tfds_builds_mnist_from_the_bundled_files(tmp_path):
    missing = [m for m in ("tensorflow", "tensorflow_datasets", "importlib_resources")
               if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs the tfds extra ({', '.join(missing)} not installed): "
                    'pip install -e ".[tfds]"')
    # The bundled files are the official ones: TFDS accepts them from manual_dir, offline.
    ds = data.load_tfds("mnist", "test", manual_dir=BUNDLED_MNIST, data_dir=tmp_path / "tfds")
    ref = data.load_dataset("mnist", "test", cache_dir=tmp_path / "cache")
    assert (ds.name, ds.split, ds.tag, ds.num_classes) == ("mnist", "test", "tfds:mnist", 10)
    assert ds.images.shape == (10000, 28, 28, 1) and ds.images.dtype == np.uint8
    assert records(ds.images, ds.labels) == records(ref.images, ref.labels)
