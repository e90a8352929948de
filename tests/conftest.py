"""Test-session settings and the shared trained models.

* Four host devices, so that sharding tests have several devices on a CPU.
* pimjax's runtime settings (:func:`pimjax.runtime.configure`) with a persistent compilation
  cache outside the work tree (``PIMJAX_TEST_COMPILE_CACHE`` overrides where). XLA runs at its
  default optimization level, the level users run at, so the tests that claim bit-identity
  (chip i's logits whatever the chunking or device count, nominal chip == no chip, resume ==
  uninterrupted run) test what users get.
* XLA's optimization level per test: the default level unless a test (or its module) is
  marked ``@pytest.mark.xla_level("fast")``. Then XLA compiles with most optimizations off
  (``jax_disable_most_optimizations``: backend level 0): programs compile 3-8x faster and
  run up to 3x slower, a good trade for the many small programs of the unit tests (a LeNet-5
  chip sampler compiles in 1.5 s instead of 12 s). The tests that claim bit-identity (chip
  i's logits whatever the chunking or device count, nominal chip == no chip, resume ==
  uninterrupted run) and the shared trained runs stay at the default level, the one users
  run at. Switching levels clears JAX's in-memory compilation caches (the flag is not part of
  their keys), so no program compiled at one level is ever run at the other; the persistent
  cache keys include the level.
* :func:`trained`: one session-wide pair of briefly trained LeNet-5 W2A4 runs (qat and qavat
  under sigma_within 0.5) that the training, Monte-Carlo, self-tuning and checkpoint tests
  share instead of each training its own.
"""

import contextlib
import dataclasses
import os
import tempfile
from pathlib import Path

import pytest

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()

from pimjax import runtime  # noqa: E402  (after XLA_FLAGS is set, before JAX starts)

# Identical programs compiled by different tests (same model, different closures) compile
# once per machine: a persistent compilation cache outside the work tree.
runtime.configure(compile_cache=os.environ.get(
    "PIMJAX_TEST_COMPILE_CACHE", str(Path(tempfile.gettempdir()) / "pimjax-test-jax-cache")))

import jax  # noqa: E402
from helpers import TEST_IMAGES, TRAIN_IMAGES, run_config  # noqa: E402

from pimjax import data  # noqa: E402
from pimjax import train as T  # noqa: E402

XLA_LEVELS = ("default", "fast")
_level = ["default"]  # the level XLA compiles at now


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "xla_level(level): compile at XLA's 'default' optimization level or 'fast' "
        "(most optimizations off); unmarked tests run at the default level")


def set_xla_level(level: str) -> str:
    """Compile at ``level`` from now on; returns the previous level."""
    if level not in XLA_LEVELS:
        raise ValueError(f"xla_level={level!r} is unknown: use one of {XLA_LEVELS}")
    previous = _level[0]
    if level != previous:
        jax.config.update("jax_disable_most_optimizations", level == "fast")
        jax.clear_caches()  # no executable compiled at one level runs at the other
        _level[0] = level
    return previous


@contextlib.contextmanager
def xla_level(level: str):
    """Compile at ``level`` inside the block."""
    previous = set_xla_level(level)
    try:
        yield
    finally:
        set_xla_level(previous)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Each test, and the fixtures it sets up first, compile at the level its closest
    ``xla_level`` marker names (default: "default"); consecutive tests at one level share
    the compiled programs."""
    marker = item.get_closest_marker("xla_level")
    set_xla_level(marker.args[0] if marker else "default")


@dataclasses.dataclass(frozen=True)
class Run:
    """A finished training run: its config, result and run directory (treat as read-only)."""

    config: T.TrainConfig
    result: T.TrainResult
    workdir: Path

    @property
    def model(self):
        return self.result.state.model

    @property
    def variables(self) -> dict:
        return self.result.state.variables


@pytest.fixture(scope="session")
def mnist():
    """The shared runs' training and test splits."""
    return (data.load_dataset("mnist", "train", limit=TRAIN_IMAGES),
            data.load_dataset("mnist", "test", limit=TEST_IMAGES))


@pytest.fixture(scope="session")
def trained(mnist, tmp_path_factory) -> dict:
    """The shared qat and qavat runs, keyed by method (trained once per session)."""
    train_ds, test_ds = mnist
    runs = {}
    with xla_level("default"):  # the runs users get, which resumed runs must reproduce
        for method in ("qat", "qavat"):
            config = run_config(method)
            workdir = tmp_path_factory.mktemp(f"run-{method}")
            result = T.train(config, train_data=train_ds, test_data=test_ds, workdir=workdir,
                             num_devices=1, progress=False)
            runs[method] = Run(config, result, workdir)
    return runs


@pytest.fixture
def script_settings(monkeypatch):
    """The scripts call runtime.configure(): keep this session's compilation cache, and
    report errors in one line (no PIMJAX_DEBUG)."""
    monkeypatch.setenv("PIMJAX_COMPILE_CACHE", "0")
    monkeypatch.delenv("PIMJAX_DEBUG", raising=False)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No test reaches the internet: dataset downloads are off unless a test turns them on."""
    monkeypatch.setenv("PIMJAX_OFFLINE", "1")
    monkeypatch.delenv("PIMJAX_DOWNLOAD_URL", raising=False)
