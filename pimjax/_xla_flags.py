"""XLA:CPU settings pimjax applies before JAX starts its CPU backend.

With jaxlib 0.10, XLA:CPU hands 3x3 convolutions to YNNPACK, which ran them here at about
half the speed of XLA's own (Eigen) convolution on two cores: ResNet-20's 16x16x32 conv
forward took 11.3 ms against 5.4 ms, and the 8x8x64 one 9.9 ms against 4.3 ms
(``benchmarks/conv_grad.py`` with ``PIMJAX_XLA_DEFAULTS=0`` and ``=1``). The flag is
experimental, so it is set only for the jaxlib versions it was measured on, never over a
user's own setting of it, and ``PIMJAX_XLA_DEFAULTS=0`` turns it off. It takes effect only
if pimjax is imported before JAX initializes its CPU backend (the first computation).
"""

from __future__ import annotations

import os
from importlib import metadata

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
CPU_FLAGS = (f"{YNN_FLAG}=dot,reduce",)
MEASURED_JAXLIB = ("0.10.",)


def apply_cpu_defaults(environ=os.environ) -> bool:
    """Append :data:`CPU_FLAGS` to ``XLA_FLAGS``; False when opted out or not applicable."""
    if environ.get("PIMJAX_XLA_DEFAULTS", "1") == "0":
        return False
    try:
        version = metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        return False
    flags = environ.get("XLA_FLAGS", "")
    if not version.startswith(MEASURED_JAXLIB) or YNN_FLAG in flags:
        return False
    environ["XLA_FLAGS"] = " ".join([flags, *CPU_FLAGS]).strip()
    return True


def cpu_defaults_applied(environ=os.environ) -> bool:
    """Whether ``XLA_FLAGS`` carries :data:`CPU_FLAGS` (pimjax's or the user's own)."""
    flags = environ.get("XLA_FLAGS", "").split()
    return all(flag in flags for flag in CPU_FLAGS)
