"""Process-wide settings, applied only by an explicit :func:`configure` call.

Importing pimjax changes nothing outside pimjax. Entry points (the experiment and benchmark
scripts, the test suite's ``conftest.py``) call :func:`configure` once, before their first JAX
computation, to set:

* **XLA:CPU flags.** With jaxlib 0.10, XLA:CPU hands 3x3 convolutions to YNNPACK, which ran
  them at about half the speed of XLA's own (Eigen) convolution on two cores: ResNet-20's
  16x16x32 conv forward took 11.3 ms against 5.4 ms, the 8x8x64 one 9.9 ms against 4.3 ms
  (``benchmarks/conv_grad.py`` with and without the flag). The flag is experimental, so it is
  set only for the jaxlib versions it was measured on and never over a user's own setting.
  It takes effect only if set before JAX initializes its CPU backend.
* **A persistent compilation cache** under the pimjax cache directory, so a second run of a
  script skips most of its compile time.
* **Quiet logs**: orbax logs every checkpoint save and restore through absl at INFO level.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from importlib import metadata
from pathlib import Path

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
CPU_FLAGS = (f"{YNN_FLAG}=dot,reduce",)
MEASURED_JAXLIB = ("0.10.",)
# Programs that compile faster than this are not worth a disk write.
CACHE_MIN_COMPILE_SECONDS = 0.5


@dataclasses.dataclass(frozen=True)
class Settings:
    """What :func:`configure` did."""

    xla_cpu_flags: bool
    compile_cache: str | None


def cache_dir(environ=os.environ) -> Path:
    """pimjax's cache directory: ``$PIMJAX_CACHE_DIR``, else ``~/.cache/pimjax``."""
    return Path(environ.get("PIMJAX_CACHE_DIR") or Path.home() / ".cache" / "pimjax").expanduser()


def apply_cpu_flags(environ=os.environ) -> bool:
    """Append :data:`CPU_FLAGS` to ``XLA_FLAGS``; False when opted out or not applicable.

    ``PIMJAX_XLA_DEFAULTS=0`` opts out; a user's own setting of the flag is kept.
    """
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


def cpu_flags_applied(environ=os.environ) -> bool:
    """Whether ``XLA_FLAGS`` carries :data:`CPU_FLAGS` (pimjax's or the user's own)."""
    flags = environ.get("XLA_FLAGS", "").split()
    return all(flag in flags for flag in CPU_FLAGS)


def configure(*, xla_cpu_flags: bool = True, compile_cache: bool | str | os.PathLike = True,
              quiet_logs: bool = True, environ=os.environ) -> Settings:
    """Apply pimjax's process-wide settings; call once, before the first JAX computation.

    ``compile_cache``: True for ``<cache_dir>/jax-compile`` (``PIMJAX_COMPILE_CACHE=0`` turns
    it off), a path for that directory, or False for none.
    """
    import jax

    flags = apply_cpu_flags(environ) if xla_cpu_flags else False
    directory = None
    if compile_cache is True and environ.get("PIMJAX_COMPILE_CACHE", "1") != "0":
        directory = str(cache_dir(environ) / "jax-compile")
    elif compile_cache not in (True, False, None):
        directory = os.fspath(compile_cache)
    if directory is not None:
        jax.config.update("jax_compilation_cache_dir", directory)
        jax.config.update("jax_persistent_cache_min_compile_time_secs",
                          CACHE_MIN_COMPILE_SECONDS)
    if quiet_logs:
        logging.getLogger("absl").setLevel(logging.ERROR)
    return Settings(flags, directory)
