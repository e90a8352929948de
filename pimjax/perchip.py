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
  batched conv and one batched GEMM ``einsum('cbk,cko->cbo')``. See :class:`Strategy`.

The layers of :mod:`pimjax.layers` route here when their chip factor has one more leading
axis than the kernel. Results equal the plain layers applied chip by chip within float
rounding (the GEMM shapes differ, so the summation order may too).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from pimjax import ops

# How each case is computed. "wide": one conv/matmul with C*O output channels, then a
# transpose to chip-major; "map": lax.map over chips of the plain op; "vmap": a batched
# (grouped) conv; "einsum": one batched GEMM. On a 2-core CPU (benchmarks/montecarlo.py,
# LeNet-5, 64 chips x 1000 images, chip-img/s): wide+map+map 9.1k, wide+map+einsum 6.6k,
# map+map+einsum 4.0k, wide+vmap+einsum 3.3k; a plain shared-weight forward 2.2k. XLA's CPU
# grouped convs and batched dots are slow while its plain convs/GEMMs are fast. GPUs and TPUs
# batch these well, so ACCELERATOR uses the batched forms (not measured here).
SHARED_CONVS = ("wide", "map")
BATCHED_CONVS = ("map", "vmap")
BATCHED_DENSES = ("map", "einsum")


@dataclasses.dataclass(frozen=True)
class Strategy:
    """How a chip batch's convs and matmuls are computed (a static choice, see above)."""

    shared_conv: str = "wide"
    batched_conv: str = "map"
    batched_dense: str = "map"

    def __post_init__(self):
        for field, allowed in (("shared_conv", SHARED_CONVS), ("batched_conv", BATCHED_CONVS),
                               ("batched_dense", BATCHED_DENSES)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field}={getattr(self, field)!r} is unknown: use one of "
                                 f"{allowed}")


CPU = Strategy("wide", "map", "map")
ACCELERATOR = Strategy("wide", "vmap", "einsum")


def default_strategy(backend: str | None = None) -> Strategy:
    """:data:`CPU` on the CPU backend, :data:`ACCELERATOR` on GPU/TPU (default: JAX's)."""
    return CPU if (backend or jax.default_backend()) == "cpu" else ACCELERATOR


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


def conv2d(x, w, strides=(1, 1), padding="SAME", strategy: Strategy | None = None):
    """Per-chip NHWC conv: ``w [C, kh, kw, I, O]``; ``x [B, H, W, I]`` or ``[C, B, H, W, I]``.

    Returns ``[C, B, H', W', O]``. ``strategy``: None for :func:`default_strategy`.
    """
    _check(x, w, 2, "conv")
    chips, kh, kw, cin, cout = w.shape
    strategy = strategy or default_strategy()
    if x.ndim == 4:
        if strategy.shared_conv == "wide":
            wide = jnp.moveaxis(w, 0, -2).reshape(kh, kw, cin, chips * cout)
            y = ops.conv2d(x, wide, strides, padding)
            y = y.reshape(*y.shape[:-1], chips, cout)
            return jnp.moveaxis(y, -2, 0)
        return lax.map(lambda wc: ops.conv2d(x, wc, strides, padding), w)
    if strategy.batched_conv == "map":
        return lax.map(lambda a: ops.conv2d(a[0], a[1], strides, padding), (x, w))
    return jax.vmap(lambda xc, wc: ops.conv2d(xc, wc, strides, padding))(x, w)


def dense(x, w, strategy: Strategy | None = None):
    """Per-chip matmul: ``w [C, K, O]``; ``x [B, K]`` or ``[C, B, K]``. Returns ``[C, B, O]``."""
    _check(x, w, 0, "dense")
    chips, k, out = w.shape
    if x.ndim == 2:
        y = ops.dense(x, jnp.moveaxis(w, 0, 1).reshape(k, chips * out))
        return jnp.moveaxis(y.reshape(x.shape[0], chips, out), 1, 0)
    if (strategy or default_strategy()).batched_dense == "map":
        return lax.map(lambda a: ops.dense(a[0], a[1]), (x, w))
    return jnp.einsum("cbk,cko->cbo", x, w)


def chip_map(fn, xs):
    """``lax.map`` of ``fn`` over the leading (chip) axis of the pytree ``xs``, compiled as one
    loop body whatever the number of chips.

    A chip's reductions (its loss sum, its self-tuning statistics) then have the same shapes,
    so the same bits, for any chips per device. XLA sums an axis in an order that depends on
    the array's other axes (a ``[C, B]`` sum over ``B`` rounds differently for another ``C``),
    and it inlines a loop of one iteration into its surroundings (other fusions, other
    rounding); the chip count is passed through an optimization barrier, so XLA does not see
    the trip count and keeps the loop. Not differentiable (a loop of unknown length).
    """
    n = jax.tree.leaves(xs)[0].shape[0]
    count = lax.optimization_barrier(jnp.int32(n))
    shapes = jax.eval_shape(fn, jax.tree.map(lambda a: a[0], xs))
    init = jax.tree.map(lambda s: jnp.zeros((n, *s.shape), s.dtype), shapes)

    def body(i, out):
        y = fn(jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, i, keepdims=False), xs))
        return jax.tree.map(lambda o, v: lax.dynamic_update_index_in_dim(o, v, i, 0), out, y)

    return lax.fori_loop(0, count, body, init)


def broadcast_per_chip(v, y):
    """Reshape per-chip ``[C, F]`` values to broadcast against ``y [C, ..., F]``; ``[F]`` as is."""
    if v.ndim <= 1:
        return v
    return v.reshape((v.shape[0],) + (1,) * (y.ndim - 2) + (v.shape[-1],))
