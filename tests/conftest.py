"""Test-session settings: fast XLA compiles and a few host devices for sharding tests."""

import os

# The suite compiles many small programs and runs little: LLVM's backend optimisations
# cost more time than they save here (a ResNet-20 init compiles in 5 s instead of 50 s).
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0"
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=4"
os.environ["XLA_FLAGS"] = _flags.strip()

import jax  # noqa: E402  (after XLA_FLAGS is set)

# Identical programs compiled by different tests (same model, different closures) are
# compiled once per machine: a persistent compilation cache outside the work tree.
jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("PIMJAX_TEST_COMPILE_CACHE", os.path.join("/tmp", "pimjax-test-jax-cache")),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
