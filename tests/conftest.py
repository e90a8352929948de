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
