"""Analog Flax layers: quantize, perturb by the chip, compute, then tune digitally.

An analog layer computes ``y = g * MVM(q_a(x), q_w(W) * chip) + o (+ bias)``:

* ``q_w`` and ``q_a`` are the weight and input-activation quantizers (:mod:`pimjax.quant`);
* ``chip`` is this layer's multiplicative factor from the ``"chip"`` variable
  collection (absent = the nominal chip; see :mod:`pimjax.variability`);
* ``g``/``o`` are the digital self-tuning gain and offset of the ``"tune"``
  collection (per output channel, identity by default);
* the bias and batch norm stay digital float.

Pass a chip with ``model.apply({**variables, "chip": chip}, x)`` (or
:func:`with_chip`): the chip is an ordinary argument, so ``jax.vmap`` over chips
is a plain vmap. A *chip batch* (every factor ``[C, *kernel.shape]``, tune values
optionally ``[C, features]``) computes all C chips in one pass without vmap: the
output gains a leading chip axis (see :mod:`pimjax.perchip`). With ``analog=False``
a layer is digital: it never reads a chip and carries no tuning variables.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from pimjax import ops, perchip
from pimjax.quant import (
    QuantConfig,
    act_levels,
    lsq_init_scale,
    pact_quantize,
    quantize_activations,
    quantize_weights,
    scale_grad,
    weight_levels,
    weight_scale,
)

CHIP = "chip"
TUNE = "tune"
PACT_INIT_CLIP = 6.0  # PACT alpha / LSQ clip at initialisation (ReLU-6 range)


class ActQuant(nn.Module):
    """Input-activation quantizer: running-max (EMA) clip, PACT or LSQ."""

    bits: int | None
    method: str = "ema"
    momentum: float = 0.9
    signed: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.bits is None:
            return x
        levels = act_levels(self.bits, self.signed)
        if self.method == "ema":
            running = self.variable("batch_stats", "act_max", lambda: jnp.zeros((), jnp.float32))
            batch_max = jax.lax.stop_gradient(jnp.max(jnp.abs(x) if self.signed else x))
            batch_max = jnp.maximum(batch_max, 1e-8)
            if train:
                clip = jnp.where(
                    running.value > 0,
                    self.momentum * running.value + (1 - self.momentum) * batch_max,
                    batch_max,
                )
                if not self.is_initializing():
                    running.value = clip
            else:  # a never-trained model falls back to this batch's max
                clip = jnp.where(running.value > 0, running.value, batch_max)
            return quantize_activations(x, self.bits, clip, self.signed)
        if self.method == "pact":
            alpha = self.param("pact_alpha", nn.initializers.constant(PACT_INIT_CLIP), ())
            return pact_quantize(x, self.bits, alpha, self.signed)
        if self.method == "lsq":
            step = self.param("act_step", nn.initializers.constant(PACT_INIT_CLIP / levels), ())
            step = scale_grad(step, 1.0 / jnp.sqrt(x.size * levels))
            return quantize_activations(x, self.bits, step * levels, self.signed)
        raise ValueError(f"act_clip={self.method!r} is unknown: use 'ema', 'pact' or 'lsq'")


class _Analog(nn.Module):
    """Shared machinery of the analog layers (not used directly)."""

    features: int
    quant: QuantConfig = QuantConfig()
    analog: bool = True
    input_signed: bool = False
    use_bias: bool = False
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

    def _quantize_input(self, x, train):
        q = self.quant
        return ActQuant(
            q.act_bits, q.act_clip, q.act_momentum, self.input_signed, name="input_quant"
        )(x, train)

    def _effective_kernel(self, kernel):
        """Quantize the kernel, then multiply by this layer's chip factor if one is given."""
        q = self.quant
        w = kernel
        if q.weight_bits is not None:
            if q.weight_scale == "lsq":
                s = self.param(
                    "weight_step",
                    lambda _: lsq_init_scale(kernel, q.weight_bits, q.weight_per_channel)
                    if q.weight_bits > 1
                    else jnp.mean(jnp.abs(kernel), axis=_scale_axes(kernel, q.weight_per_channel)),
                )
                per_scale = kernel.size // max(s.size, 1)
                s = scale_grad(s, 1.0 / jnp.sqrt(per_scale * weight_levels(q.weight_bits)))
            else:
                s = weight_scale(kernel, q.weight_bits, q.weight_scale, q.weight_per_channel)
            w = quantize_weights(kernel, q.weight_bits, s)
        if self.analog and self.has_variable(CHIP, "kernel"):
            factor = self.get_variable(CHIP, "kernel")
            if factor.shape == kernel.shape:
                w = w * factor
            elif factor.shape[1:] == kernel.shape:  # a chip batch [C, *kernel]: pimjax.perchip
                w = w[None] * factor
            else:
                raise ValueError(
                    f"chip factor for {'/'.join(self.scope.path)} has shape {factor.shape}, "
                    f"the kernel {kernel.shape} (or [chips, *kernel] for a chip batch): sample "
                    "the chip from this model's analog_kernels(variables)"
                )
        return w

    def _tune_and_bias(self, y, train: bool):
        """Apply the digital self-tuning gain/offset (analog, inference only) and the bias.

        Self-tuning corrects one fabricated chip after training, so training (``train``)
        leaves it out: an identity gain/offset there would only cost two passes over y.
        """
        if self.analog and (self.is_initializing() or self.has_variable(TUNE, "gain")):
            gain = self.variable(TUNE, "gain", jnp.ones, (self.features,), jnp.float32).value
            offset = self.variable(TUNE, "offset", jnp.zeros, (self.features,), jnp.float32).value
            if not train:
                # per-chip tuning [C, features] of a chip batch broadcasts over y [C, ..., F]
                y = y * perchip.broadcast_per_chip(gain, y) + perchip.broadcast_per_chip(offset, y)
        if self.analog:
            self.sow("intermediates", "mvm", y)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return y


def _scale_axes(kernel, per_channel):
    return tuple(range(kernel.ndim - 1)) if per_channel else tuple(range(kernel.ndim))


class AnalogDense(_Analog):
    """Analog fully connected layer (a crossbar MVM): ``x [..., K] -> [..., features]``."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
        x = self._quantize_input(x, train)
        w = self._effective_kernel(kernel)
        y = perchip.dense(x, w) if w.ndim == kernel.ndim + 1 else ops.dense(x, w)
        return self._tune_and_bias(y, train)


class AnalogConv(_Analog):
    """Analog 2-D convolution, NHWC input and HWIO kernel, computed as crossbar MVMs."""

    kernel_size: Sequence[int] = (3, 3)
    strides: Sequence[int] = (1, 1)
    padding: str | Sequence[tuple[int, int]] = "SAME"

    @nn.compact
    def __call__(self, x, train: bool = False):
        if x.ndim < 4:
            raise ValueError(f"AnalogConv input must be NHWC (4-D), got shape {x.shape}")
        shape = (*self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape, jnp.float32)
        x = self._quantize_input(x, train)
        w = self._effective_kernel(kernel)
        strides = tuple(self.strides)
        if w.ndim == kernel.ndim + 1:  # a chip batch: x [B, H, W, I] shared or [C, B, H, W, I]
            y = perchip.conv2d(x, w, strides, self.padding)
        else:  # leading dims beyond the batch (e.g. [C, B, ...] with shared weights) fold in
            y = ops.conv2d(x.reshape((-1, *x.shape[-3:])), w, strides, self.padding)
            y = y.reshape((*x.shape[:-3], *y.shape[-3:]))
        return self._tune_and_bias(y, train)


def analog_kernels(variables):
    """The analog layers' kernels, in the layout of the ``"chip"`` collection.

    An analog layer is one that carries ``"tune"`` variables; its kernel sits at
    the same path in ``"params"``. Use it as the template of ``sample_chip``.
    """
    if TUNE not in variables or "params" not in variables:
        raise ValueError(
            "variables need 'params' and 'tune' collections (from model.init): "
            f"got {sorted(variables)}"
        )

    def walk(tune, params):
        out = {}
        for name, sub in tune.items():
            if name == "gain":
                out["kernel"] = params["kernel"]
            elif isinstance(sub, dict) or hasattr(sub, "items"):
                child = walk(sub, params[name])
                if child:
                    out[name] = child
        return out

    return walk(variables[TUNE], variables["params"])


def with_chip(variables, chip):
    """Variables with ``chip`` as their ``"chip"`` collection (None removes it)."""
    out = {k: v for k, v in variables.items() if k != CHIP}
    if chip is not None:
        out[CHIP] = chip
    return out
