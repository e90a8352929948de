"""Test-session settings: a few host devices for sharding tests, pimjax's runtime settings."""

import os

import pytest

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()

from pimjax import runtime  # noqa: E402  (after XLA_FLAGS is set, before JAX starts)

# Identical programs compiled by different tests (same model, different closures) compile
# once per machine: a persistent compilation cache outside the work tree.
runtime.configure(compile_cache=os.environ.get(
    "PIMJAX_TEST_COMPILE_CACHE", os.path.join("/tmp", "pimjax-test-jax-cache")))


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No test reaches the internet: dataset downloads are off unless a test turns them on."""
    monkeypatch.setenv("PIMJAX_OFFLINE", "1")
    monkeypatch.delenv("PIMJAX_DOWNLOAD_URL", raising=False)
