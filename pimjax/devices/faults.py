"""Stuck-at faults: per chip, a fraction of the cells stuck at 0 and a fraction at g_max.

Every device of a weight's differential pair (``g+`` and ``g-``, see
:mod:`pimjax.devices.mapping`) is faulty on its own: with probability ``p_zero`` it is
stuck at 0 (an open / fully RESET cell), with probability ``p_gmax`` at ``g_max`` (a
shorted / fully SET cell), whatever is programmed and at every read time. The chip state
is one uniform per device, so which cells are stuck depends only on the chip key and the
shapes, and the same chip keeps its faults across training steps and read times.

aihwkit 1.1 has no stuck-at model in its inference noise models; this part is pimjax's.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from pimjax.devices.mapping import broadcast_scale, from_pair, mapping_scale, to_pair


@dataclasses.dataclass(frozen=True)
class StuckAt:
    """Stuck-at-0 and stuck-at-g_max fractions of the devices of every pair."""

    p_zero: float = 0.0
    p_gmax: float = 0.0
    per_column: bool = False  # mapping scale per output column (else per layer)

    def __post_init__(self):
        for field in ("p_zero", "p_gmax"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{field}={v!r} must be a number in [0, 1]")
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{field}={v!r} must be in [0, 1] (a fraction of the cells)")
        if self.p_zero + self.p_gmax > 1.0:
            raise ValueError(
                f"p_zero + p_gmax = {self.p_zero + self.p_gmax} must be <= 1: lower one of them")

    def sample(self, key, template):
        """Chip state: ``{"plus", "minus"}`` uniforms in [0, 1) per layer of ``template``.

        Layer ``i`` (pytree-flatten order) draws from ``fold_in(key, i)``; only shapes are read.
        """
        leaves, treedef = jax.tree_util.tree_flatten(template)
        if not leaves:
            raise ValueError("template has no arrays: pass the model's analog kernels")
        out = []
        for i, leaf in enumerate(leaves):
            kp, km = jax.random.split(jax.random.fold_in(key, i))
            shape = tuple(jnp.shape(leaf))  # an array or a jax.ShapeDtypeStruct
            out.append({"plus": jax.random.uniform(kp, shape, jnp.float32),
                        "minus": jax.random.uniform(km, shape, jnp.float32)})
        return jax.tree_util.tree_unflatten(treedef, out)

    def stick(self, u_plus, u_minus, state):
        """Apply the faults to a normalised pair ``(u+, u-)`` (units of g_max)."""
        def one(u, r):
            u = jnp.where(r < self.p_zero, 0.0, u)
            return jnp.where((r >= self.p_zero) & (r < self.p_zero + self.p_gmax), 1.0, u)

        return one(u_plus, state["plus"]), one(u_minus, state["minus"])

    def apply(self, w, state, t=None):
        """The weight with its stuck devices: map ``w`` to pairs, stick, map back.

        The mapping scale is ``max|w|`` of *this* input (per layer or column), so put the part
        first in a device (on the quantized weight); :class:`pimjax.devices.pcm.PCM` applies
        faults itself, after programming, drift and read noise, when given ``stuck=``.
        ``w`` is one kernel, or a chip batch ``[C, *kernel]`` when ``t`` has shape ``(C,)``.
        """
        if t is not None and jnp.ndim(t) == 1:
            return jax.vmap(lambda wc, sc: self.apply(wc, sc))(w, state)
        scale = broadcast_scale(mapping_scale(w, self.per_column), w)
        up, um = self.stick(*to_pair(w / scale), state)
        return from_pair(up, um) * scale
