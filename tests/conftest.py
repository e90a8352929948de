"""Test-session settings and the shared trained models.

* Four host devices, so that sharding tests have several devices on a CPU.
* pimjax's runtime settings (:func:`pimjax.runtime.configure`) with a persistent compilation
  cache outside the work tree (``PIMJAX_TEST_COMPILE_CACHE`` overrides where). XLA runs at its
  default optimization level, the level users run at, so the tests that claim bit-identity
  (chip i's logits whatever the chunking or device count, nominal chip == no chip, resume ==
  uninterrupted run) test what users get.
* :func:`trained`: one session-wide pair of briefly trained LeNet-5 W2A4 runs (qat and qavat
  under sigma_within 0.5) that the training, Monte-Carlo, self-tuning and checkpoint tests
  share instead of each training its own.
"""

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

from helpers import TEST_IMAGES, TRAIN_IMAGES, run_config  # noqa: E402

from pimjax import data  # noqa: E402
from pimjax import train as T  # noqa: E402


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
    for method in ("qat", "qavat"):
        config = run_config(method)
        workdir = tmp_path_factory.mktemp(f"run-{method}")
        result = T.train(config, train_data=train_ds, test_data=test_ds, workdir=workdir,
                         num_devices=1, progress=False)
        runs[method] = Run(config, result, workdir)
    return runs


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No test reaches the internet: dataset downloads are off unless a test turns them on."""
    monkeypatch.setenv("PIMJAX_OFFLINE", "1")
    monkeypatch.delenv("PIMJAX_DOWNLOAD_URL", raising=False)
