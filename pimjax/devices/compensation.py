"""Global drift compensation: a per-layer output gain measured by the chip itself.

aihwkit 1.1's ``GlobalDriftCompensation`` (``aihwkit/inference/compensation/drift.py``): right
after programming, each tile reads a reference input (the identity, one unit vector per row)
and stores ``baseline = max(mean|out|, 1e-4)``; at read time ``t`` it reads it again and
multiplies the tile's outputs by ``baseline / readout``. With a unit vector as input, noise
management leaves it as is and the DAC is exact, so the reference read of row ``k`` is the
normalised weight row plus output noise, through the ADC: no matrix product is needed.

Differences from aihwkit, by design: one gain per analog layer (aihwkit: per tile of at most
512 rows; the same for every layer of LeNet-5), and the baseline is read at ``t = 0`` with that
time's read noise (aihwkit reads the programmed conductances before any drift or read noise);
the gain is a calibration, so no gradient flows through it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pimjax import draws
from pimjax.devices.mapping import broadcast_scale, mapping_scale
from pimjax.devices.periphery import clip, quantize_uniform

READOUT_FLOOR = 1e-4  # aihwkit's clamp of the readout


@dataclasses.dataclass(frozen=True)
class GlobalDriftCompensation:
    """Per-layer gain ``baseline / readout`` of the reference read (see the module docstring)."""

    def sample(self, key, template):
        """Chip state: the output-noise normals of the two reference reads of every layer."""
        leaves, treedef = jax.tree_util.tree_flatten(template)
        out = draws.normals(draws.fold_ins(key, len(leaves)),
                            [(2, *jnp.shape(leaf)) for leaf in leaves])
        return jax.tree_util.tree_unflatten(treedef, out)

    def readout(self, w_eff, w_nominal, periphery, z):
        """``max(mean|reference read|, 1e-4)`` of weights ``w_eff`` (chip axis first if any)."""
        per_column = periphery is not None and periphery.per_column
        u = w_eff / broadcast_scale(mapping_scale(w_nominal, per_column), w_nominal)
        if periphery is not None:
            u = u + periphery.out_noise * z
            u = quantize_uniform(u, periphery.out_bits, periphery.out_bound) \
                if periphery.out_bits is not None else clip(u, periphery.out_bound)
        axes = tuple(range(u.ndim - jnp.ndim(w_nominal), u.ndim))
        return jnp.maximum(jnp.mean(jnp.abs(u), axis=axes), READOUT_FLOOR)

    def gain(self, chip_layer, w_nominal, state, w_eff=None):
        """The layer's compensation gain at the chip's read time (``[C]`` for a chip batch).

        ``w_eff``: the chip's weights at its read time, if already computed.
        """
        periphery = chip_layer.device.periphery
        z0, zt = (state[0], state[1]) if chip_layer.num_chips is None else (state[:, 0],
                                                                             state[:, 1])
        if w_eff is None:
            w_eff = chip_layer.weights(w_nominal)
        base = self.readout(chip_layer.weights(w_nominal, t=0.0), w_nominal, periphery, z0)
        now = self.readout(w_eff, w_nominal, periphery, zt)
        return jax.lax.stop_gradient(base / now)
