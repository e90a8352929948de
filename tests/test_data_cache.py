"""Tests for pimjax.data's .npz cache: written once, reused, invalidated, robust to corruption."""

import os

import numpy as np
import pytest
from datafiles import clear_env, make_idx_dir

import pimjax.data.load as load_module
from pimjax import data
from pimjax.data.cache import cache_root


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    clear_env(monkeypatch)


def test_cache_written_reused_and_invalidated(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    make_idx_dir(tmp_path)
    first = data.load_dataset("mnist", "test", data_dir=tmp_path, cache_dir=cache)
    files = list(cache.glob("*.npz"))
    assert len(files) == 1 and not list(cache.glob("*.tmp"))

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded again despite the cache")

    with monkeypatch.context() as m:
        m.setattr(load_module, "decode", no_decode)
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
    assert cache_root() == tmp_path / "envcache"
    data.load_dataset("mnist", "test", data_dir=tmp_path)
    (path,) = (tmp_path / "envcache").glob("*.npz")
    path.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable cache"):
        assert len(data.load_dataset("mnist", "test", data_dir=tmp_path)) == 5


def test_cache_is_per_dataset_name(tmp_path):
    # The same folder loaded under another name is a cache miss, so the content check runs again.
    cache = tmp_path / "cache"
    make_idx_dir(tmp_path)
    data.load_dataset("mnist", "test", data_dir=tmp_path, cache_dir=cache)
    ds = data.load_dataset("fashion_mnist", "test", data_dir=tmp_path, cache_dir=cache)
    assert ds.tag == "fashion_mnist" and len(list(cache.glob("*.npz"))) == 2
