"""Analog Flax layers: quantize, compute on the chip, then tune digitally.

An analog layer computes ``y = g * MVM_chip(q_a(x), q_w(W)) + o (+ bias)``:

* ``q_w`` and ``q_a`` are the weight and input-activation quantizers (:mod:`pimjax.quant`);
* ``MVM_chip`` is the crossbar's matrix-vector product on this layer's
  :class:`pimjax.devices.ChipLayer` from the ``"chip"`` variable collection: the device's
  weight parts perturb the quantized weight and its periphery wraps the product. Without a
  chip the layer computes the ideal (nominal) product;
* ``g``/``o`` are the digital self-tuning gain and offset of the ``"tune"`` collection (per
  output channel, identity by default), applied at inference only;
* the bias and batch norm stay digital float.

Pass a chip with :func:`with_chip`; the chip is an ordinary argument, so ``jax.vmap`` over
chips is a plain vmap. A *chip batch* (:func:`pimjax.devices.sample_chips`) computes all its
chips in one pass without vmap: the output gains a leading chip axis (:mod:`pimjax.perchip`).
With ``analog=False`` a layer is digital: it never reads a chip and carries no tuning variables.

:func:`intercept_mvm` and :func:`intercept_calls` are the public hooks through which
:mod:`pimjax.introspect` watches or edits analog layers while a model runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from pimjax import ops, perchip
from pimjax.devices import ChipLayer
from pimjax.quant import (
    QuantConfig,
    act_levels,
    lsq_init_scale,
    pact_quantize,
    quantize_activations,
    quantize_affine,
    quantize_weights,
    scale_grad,
    weight_levels,
    weight_scale,
)

CHIP = "chip"
TUNE = "tune"
READ_RNG = "read"  # the Flax rng stream of per-read noise (see pimjax.devices)
PACT_INIT_CLIP = 6.0  # PACT alpha / LSQ clip at initialisation (ReLU-6 range)


class ActQuant(nn.Module):
    """Input-activation quantizer: running-range (EMA) clip, PACT or LSQ.

    ``ema`` (the paper's): unsigned inputs (after a ReLU) use ``2^b`` levels over
    ``[0, running max]``; a signed input (a network's first layer, e.g. standardized pixels,
    which MNIST puts in [-0.42, 2.82]) uses ``2^b`` levels over ``[running min, running max]``,
    so every level is used (a symmetric range would leave 6 of 15 4-bit levels empty on
    MNIST); its offset is a constant the digital periphery adds, as a bias is. ``pact`` and
    ``lsq`` learn a symmetric clip for signed inputs.
    """

    bits: int | None
    clip: str = "ema"
    momentum: float = 0.9
    signed: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.bits is None:
            return x
        levels = act_levels(self.bits, self.signed)
        if self.clip == "ema":
            hi = self._running("act_max", jnp.max, x, train)
            if not self.signed:  # an all-zero batch must not make the step zero
                return quantize_activations(x, self.bits, jnp.maximum(hi, 1e-8))
            lo = self._running("act_min", jnp.min, x, train)
            return quantize_affine(x, self.bits, lo, hi)
        if self.clip == "pact":
            alpha = self.param("pact_alpha", nn.initializers.constant(PACT_INIT_CLIP), ())
            return pact_quantize(x, self.bits, alpha, self.signed)
        if self.clip == "lsq":
            step = self.param("act_step", nn.initializers.constant(PACT_INIT_CLIP / levels), ())
            step = scale_grad(step, 1.0 / jnp.sqrt(x.size * levels))
            return quantize_activations(x, self.bits, step * levels, self.signed)
        raise ValueError(f"act_clip={self.clip!r} is unknown: use 'ema', 'pact' or 'lsq'")

    def _running(self, name: str, reduce, x, train: bool):
        """An EMA of ``reduce(x)`` over training batches; at inference the stored value (a
        never-trained quantizer, whose value is 0, falls back to this batch's)."""
        running = self.variable("batch_stats", name, lambda: jnp.zeros((), jnp.float32))
        batch = lambda: jax.lax.stop_gradient(reduce(x)).astype(jnp.float32)  # noqa: E731
        if not train:  # lax.cond: no pass over x when the stored value is set
            return jax.lax.cond(running.value != 0, lambda: running.value, batch)
        b = batch()
        value = jnp.where(running.value != 0,
                          self.momentum * running.value + (1 - self.momentum) * b, b)
        if not self.is_initializing():
            running.value = value
        return value


class Analog(nn.Module):
    """The analog layers' shared machinery: quantizers, the chip's MVM, the digital tune and
    bias (subclassed by AnalogDense, AnalogConv and :mod:`pimjax.analog`'s AnalogLinear)."""

    features: int
    quant: QuantConfig = QuantConfig()
    analog: bool = True
    input_signed: bool = False
    use_bias: bool = False
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    perchip: perchip.Strategy | None = None  # chip batches: None = by backend

    def _quantize_input(self, x, train):
        q = self.quant
        return ActQuant(
            q.act_bits, q.act_clip, q.act_momentum, self.input_signed, name="input_quant"
        )(x, train)

    def _quantized_kernel(self, kernel):
        q = self.quant
        if q.weight_bits is None:
            return kernel
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
        return quantize_weights(kernel, q.weight_bits, s)

    def _chip(self, kernel) -> ChipLayer | None:
        if not (self.analog and self.has_variable(CHIP, "kernel")):
            return None
        chip = self.get_variable(CHIP, "kernel")
        if not isinstance(chip, ChipLayer) or tuple(chip.shape) != tuple(kernel.shape):
            got = tuple(chip.shape) if isinstance(chip, ChipLayer) else type(chip).__name__
            raise ValueError(
                f"the chip for {'/'.join(self.scope.path)} was sampled for a kernel {got}, "
                f"this layer's is {tuple(kernel.shape)}: sample the chip from this model's "
                "pimjax.introspect.analog_kernels(variables)")
        return chip

    def _mvm(self, x, kernel, plain: Callable, batched: Callable, conv=None):
        """The crossbar product of ``x`` and the quantized ``kernel`` on this layer's chip."""
        w = self._quantized_kernel(kernel)
        chip = self._chip(kernel)
        if chip is None:
            return plain(x, w)
        linear = plain if chip.num_chips is None else batched
        key = self.make_rng(READ_RNG) if chip.needs_key else None
        return chip.forward(x, w, linear, key, conv)

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
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return y


def _scale_axes(kernel, per_channel):
    return tuple(range(kernel.ndim - 1)) if per_channel else tuple(range(kernel.ndim))


class AnalogDense(Analog):
    """Analog fully connected layer (a crossbar MVM): ``x [..., K] -> [..., features]``."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
        x = self._quantize_input(x, train)
        y = self._mvm(x, kernel, ops.dense,
                      lambda x, w: perchip.dense(x, w, self.perchip))
        return self._tune_and_bias(y, train)


class AnalogConv(Analog):
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
        strides = tuple(self.strides)

        def plain(x, w):  # leading dims beyond the batch (e.g. [C, B, ...]) fold in
            y = ops.conv2d(x.reshape((-1, *x.shape[-3:])), w, strides, self.padding)
            return y.reshape((*x.shape[:-3], *y.shape[-3:]))

        def batched(x, w):  # x [B, H, W, I] shared by the chips, or [C, B, H, W, I]
            return perchip.conv2d(x, w, strides, self.padding, self.perchip)

        y = self._mvm(x, kernel, plain, batched, conv=(strides, self.padding))
        return self._tune_and_bias(y, train)


def _is_analog_call(context, method: str) -> bool:
    return (context.method_name == method and isinstance(context.module, Analog)
            and context.module.analog)


@contextlib.contextmanager
def intercept_mvm(fn: Callable):
    """Inside the context, each analog layer's MVM output ``y`` (before its tune gain/offset
    and bias) becomes ``fn(path, y)``, where ``path`` is the layer's module path (a tuple)."""
    def interceptor(next_fun, args, kwargs, context):
        if not _is_analog_call(context, "_tune_and_bias"):
            return next_fun(*args, **kwargs)
        y, *rest = args
        return next_fun(fn(tuple(context.module.scope.path), y), *rest, **kwargs)

    with nn.intercept_methods(interceptor):
        yield


@contextlib.contextmanager
def intercept_calls(fn: Callable):
    """Inside the context, each analog layer's call returns ``fn(path, x, call)``: ``path`` is
    its module path (a tuple), ``x`` its input and ``call()`` runs the layer as usual."""
    def interceptor(next_fun, args, kwargs, context):
        if not _is_analog_call(context, "__call__"):
            return next_fun(*args, **kwargs)
        return fn(tuple(context.module.scope.path), args[0], lambda: next_fun(*args, **kwargs))

    with nn.intercept_methods(interceptor):
        yield


def with_chip(variables, chip):
    """Variables with ``chip`` as their ``"chip"`` collection (None removes it)."""
    out = {k: v for k, v in variables.items() if k != CHIP}
    if chip is not None:
        out[CHIP] = chip
    return out


def with_tune(variables, tune):
    """Variables with ``tune`` as their ``"tune"`` collection."""
    return {**variables, TUNE: tune}
