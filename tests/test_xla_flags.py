"""pimjax's XLA:CPU defaults: applied once, never over the user's flags, opt-out by env."""

from importlib import metadata

import pytest

from pimjax import _xla_flags as F


@pytest.fixture
def jaxlib_version(monkeypatch):
    def set_version(v):
        monkeypatch.setattr(F.metadata, "version", lambda name: v)

    return set_version


def test_appends_to_existing_flags(jaxlib_version):
    jaxlib_version("0.10.2")
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    assert F.apply_cpu_defaults(env)
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4 " + " ".join(F.CPU_FLAGS)
    assert not F.apply_cpu_defaults(env)  # already there: not added twice


@pytest.mark.parametrize("env", [
    {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot,reduce,eltwise"},  # user's own
    {"PIMJAX_XLA_DEFAULTS": "0"},  # opted out
])
def test_leaves_user_settings_alone(jaxlib_version, env):
    jaxlib_version("0.10.2")
    before = dict(env)
    assert not F.apply_cpu_defaults(env)
    assert env == before


def test_only_on_measured_jaxlib(jaxlib_version, monkeypatch):
    jaxlib_version("0.12.0")
    env = {}
    assert not F.apply_cpu_defaults(env) and env == {}

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(F.metadata, "version", missing)
    assert not F.apply_cpu_defaults(env) and env == {}


def test_cpu_defaults_applied_reads_the_flags():
    assert F.cpu_defaults_applied({"XLA_FLAGS": "--a=1 " + " ".join(F.CPU_FLAGS)})
    assert not F.cpu_defaults_applied({"XLA_FLAGS": F.YNN_FLAG + "=dot"})
    assert not F.cpu_defaults_applied({})
