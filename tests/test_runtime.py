"""pimjax.runtime: nothing at import; configure() applies the XLA:CPU flag, cache and logs."""

import logging
import os
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import jax
import pytest

from pimjax import runtime as R


@pytest.fixture
def jaxlib_version(monkeypatch):
    def set_version(v):
        monkeypatch.setattr(R.metadata, "version", lambda name: v)

    return set_version


def test_import_changes_no_global_state():
    """A fresh interpreter: importing every pimjax module (found by walking the package)
    leaves the environment, logging and JAX's configuration alone."""
    code = textwrap.dedent("""
        import importlib, logging, os, pkgutil
        def snapshot():
            import jax
            return (dict(os.environ), logging.getLogger().level,
                    {name: logging.getLogger(name).level for name in ("absl", "jax", "orbax")},
                    jax.config.jax_compilation_cache_dir,
                    jax.config.jax_persistent_cache_min_compile_time_secs,
                    jax.config.jax_enable_x64, jax.config.jax_default_matmul_precision)
        before = snapshot()
        import pimjax
        names = [m.name for m in pkgutil.walk_packages(pimjax.__path__, "pimjax.")]
        for name in names:
            importlib.import_module(name)
        assert len(names) >= 15, names
        after = snapshot()
        assert before == after, (before, after)
    """)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120,
                   cwd=Path(__file__).parents[1])


def test_appends_to_existing_flags(jaxlib_version):
    jaxlib_version("0.10.2")
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    assert R.apply_cpu_flags(env)
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4 " + " ".join(R.CPU_FLAGS)
    assert not R.apply_cpu_flags(env)  # already there: not added twice


@pytest.mark.parametrize("env", [
    {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot,reduce,eltwise"},  # user's own
    {"PIMJAX_XLA_DEFAULTS": "0"},  # opted out
])
def test_leaves_user_settings_alone(jaxlib_version, env):
    jaxlib_version("0.10.2")
    before = dict(env)
    assert not R.apply_cpu_flags(env)
    assert env == before


def test_only_on_measured_jaxlib(jaxlib_version, monkeypatch):
    jaxlib_version("0.12.0")
    env = {}
    assert not R.apply_cpu_flags(env) and env == {}

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(R.metadata, "version", missing)
    assert not R.apply_cpu_flags(env) and env == {}


def test_cpu_flags_applied_reads_the_flags():
    assert R.cpu_flags_applied({"XLA_FLAGS": "--a=1 " + " ".join(R.CPU_FLAGS)})
    assert not R.cpu_flags_applied({"XLA_FLAGS": R.YNN_FLAG + "=dot"})
    assert not R.cpu_flags_applied({})


@pytest.fixture
def restore_jax_cache_config():
    saved = (jax.config.jax_compilation_cache_dir,
             jax.config.jax_persistent_cache_min_compile_time_secs,
             logging.getLogger("absl").level)
    yield
    jax.config.update("jax_compilation_cache_dir", saved[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", saved[1])
    logging.getLogger("absl").setLevel(saved[2])


def test_configure_sets_cache_under_the_cache_dir(tmp_path, restore_jax_cache_config):
    env = {"PIMJAX_CACHE_DIR": str(tmp_path), "PIMJAX_XLA_DEFAULTS": "0"}
    settings = R.configure(environ=env)
    assert settings.compile_cache == str(tmp_path / "jax-compile")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "jax-compile")
    assert not settings.xla_cpu_flags and "XLA_FLAGS" not in env
    assert logging.getLogger("absl").level == logging.ERROR


def test_configure_cache_opt_out_and_explicit_dir(tmp_path, restore_jax_cache_config):
    jax.config.update("jax_compilation_cache_dir", None)
    env = {"PIMJAX_CACHE_DIR": str(tmp_path), "PIMJAX_COMPILE_CACHE": "0"}
    assert R.configure(xla_cpu_flags=False, quiet_logs=False, environ=env).compile_cache is None
    assert jax.config.jax_compilation_cache_dir is None
    settings = R.configure(xla_cpu_flags=False, compile_cache=tmp_path / "c", environ=env)
    assert settings.compile_cache == str(tmp_path / "c")
