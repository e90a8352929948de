"""Weight-to-conductance mapping: the normalisation scale and the differential pair.

A weight ``w`` is stored as a pair of conductances ``(g+, g-)`` in ``[0, g_max]`` with
``w = (g+ - g-) / g_max * scale``: the larger-magnitude weight of a layer (or of an output
column) sits at ``g_max`` on one device and 0 on the other (aihwkit 1.1
``SinglePairConductanceConverter``; per column when ``MappingParameter.weight_scaling_omega
= 1`` with ``weight_scaling_columnwise``). Everything here is in *normalised* conductance
units ``u = g / g_max`` in ``[0, 1]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def mapping_scale(w, per_column: bool = False):
    """max|w| of a layer (shape ``()``) or of each output column (``(out,)``, the last axis).

    A zero maximum maps to 1 (aihwkit sets a zero mapping scale to 1). No gradient flows
    through the scale: the mapping is chosen once, from the weight being programmed.
    """
    w = jax.lax.stop_gradient(jnp.asarray(w))
    axes = tuple(range(w.ndim - 1)) if per_column else tuple(range(w.ndim))
    m = jnp.max(jnp.abs(w), axis=axes)
    return jnp.where(m > 0, m, 1.0)


def to_pair(w_normalized):
    """Split a weight normalised to [-1, 1] into the pair ``(u+, u-)``, each in [0, 1].

    The gradient is 1 on the device that holds the weight (``u+`` for w >= 0, ``u-`` for
    w < 0, including at |w| = 1) and 0 beyond the clip at 1.
    """
    w = w_normalized
    plus = jnp.where(w > 1.0, 1.0, jnp.where(w >= 0, w, 0.0))
    minus = jnp.where(w < -1.0, 1.0, jnp.where(w < 0, -w, 0.0))
    return plus, minus


def from_pair(u_plus, u_minus):
    """The normalised weight ``u+ - u-`` that a pair encodes."""
    return u_plus - u_minus


def broadcast_scale(scale, w):
    """Reshape a scale of shape ``()``/``(out,)`` to broadcast against a kernel ``w``."""
    scale = jnp.asarray(scale)
    if scale.ndim == 0:
        return scale
    return scale.reshape((1,) * (jnp.ndim(w) - 1) + scale.shape[-1:])
