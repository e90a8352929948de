"""Per-chip conv and dense on an explicit chip axis: many chips' weights in one forward pass.

A *chip batch* gives every analog layer a weight stack ``w [C, *kernel.shape]`` (the
quantized kernel times each chip's factor). Activations then carry one extra leading axis,
``[C, B, ...]``, everywhere after the first analog layer; the network input ``[B, ...]`` is
shared by all chips. A plain ``jax.vmap`` over chips turns each conv into a grouped conv,
which XLA's CPU backend runs many times below a plain conv; these functions avoid it:

* **shared input** (``x [B, ...]``, the first analog layer): one conv/matmul whose output
  channels are all chips' filters side by side (``[K, C*O]``), a single wide GEMM whose
  input patches are extracted once for every chip;
* **chip-batched input** (``x [C, B, ...]``): on CPU a conv or matmul is a ``lax.map`` over
  chips of the ordinary op at batch ``B`` (no grouped conv, no im2col copy); on GPU/TPU a
  batched conv and one batched GEMM ``einsum('cbk,cko->cbo')``. See :func:`strategy`.

The layers of :mod:`pimjax.layers` route here when their chip factor has one more leading
axis than the kernel. Results equal the plain layers applied chip by chip within float
rounding (the GEMM shapes differ, so the summation order may too).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pimjax import ops

# How each case is computed. "wide": one conv/matmul with C*O output channels, then a
# transpose to chip-major; "map": lax.map over chips of the plain op; "vmap": a batched
# (grouped) conv; "einsum": one batched GEMM. On a 2-core CPU (benchmarks/montecarlo.py,
# LeNet-5, 64 chips x 1000 images, chip-img/s): wide+map+map 9.1k, wide+map+einsum 6.6k,
# map+map+einsum 4.0k, wide+vmap+einsum 3.3k; a plain shared-weight forward 2.2k. XLA's CPU
# grouped convs and batched dots are slow while its plain convs/GEMMs are fast. None = by
# backend: the CPU choice above, or vmap/einsum on GPU/TPU (whose libraries batch these well;
# not measured here).
SHARED_CONV: str | None = None
BATCHED_CONV: str | None = None
BATCHED_DENSE: str | None = None
_BY_BACKEND = {"cpu": ("wide", "map", "map")}
_ACCELERATOR = ("wide", "vmap", "einsum")


def strategy() -> tuple[str, str, str]:
    """The (shared conv, batched conv, batched dense) strategies in force."""
    default = _BY_BACKEND.get(jax.default_backend(), _ACCELERATOR)
    chosen = (SHARED_CONV, BATCHED_CONV, BATCHED_DENSE)
    return tuple(c or d for c, d in zip(chosen, default, strict=True))


def _check(x, w, spatial: int, kind: str):
    if w.ndim != spatial + 3:
        raise ValueError(f"per-chip {kind} weights must be [chips, *kernel], got {w.shape}")
    if x.ndim not in (spatial + 2, spatial + 3):
        raise ValueError(
            f"per-chip {kind} input must be [batch, ...] (shared by all chips) or "
            f"[chips, batch, ...] with {spatial + 2} or {spatial + 3} dims, got {x.shape}"
        )
    if x.ndim == spatial + 3 and x.shape[0] != w.shape[0]:
        raise ValueError(
            f"per-chip {kind}: input has {x.shape[0]} chips on axis 0, the weights {w.shape[0]}"
        )


def conv2d(x, w, strides=(1, 1), padding="SAME"):
    """Per-chip NHWC conv: ``w [C, kh, kw, I, O]``; ``x [B, H, W, I]`` or ``[C, B, H, W, I]``.

    Returns ``[C, B, H', W', O]``.
    """
    _check(x, w, 2, "conv")
    chips, kh, kw, cin, cout = w.shape
    shared_conv, batched_conv, _ = strategy()
    if x.ndim == 4:
        if shared_conv == "wide":
            wide = jnp.moveaxis(w, 0, -2).reshape(kh, kw, cin, chips * cout)
            y = ops.conv2d(x, wide, strides, padding)
            y = y.reshape(*y.shape[:-1], chips, cout)
            return jnp.moveaxis(y, -2, 0)
        return lax.map(lambda wc: ops.conv2d(x, wc, strides, padding), w)
    if batched_conv == "map":
        return lax.map(lambda a: ops.conv2d(a[0], a[1], strides, padding), (x, w))
    return jax.vmap(lambda xc, wc: ops.conv2d(xc, wc, strides, padding))(x, w)


def dense(x, w):
    """Per-chip matmul: ``w [C, K, O]``; ``x [B, K]`` or ``[C, B, K]``. Returns ``[C, B, O]``."""
    _check(x, w, 0, "dense")
    chips, k, out = w.shape
    if x.ndim == 2:
        y = ops.dense(x, jnp.moveaxis(w, 0, 1).reshape(k, chips * out))
        return jnp.moveaxis(y.reshape(x.shape[0], chips, out), 1, 0)
    if strategy()[2] == "map":
        return lax.map(lambda a: ops.dense(a[0], a[1]), (x, w))
    return jnp.einsum("cbk,cko->cbo", x, w)


def broadcast_per_chip(v, y):
    """Reshape per-chip ``[C, F]`` values to broadcast against ``y [C, ..., F]``; ``[F]`` as is."""
    if v.ndim <= 1:
        return v
    return v.reshape((v.shape[0],) + (1,) * (y.ndim - 2) + (v.shape[-1],))
