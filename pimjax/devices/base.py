"""Devices and chips: a device is a frozen dataclass of parts, a chip is one sample of it.

A **device** lists *weight parts*, each a non-ideality of the stored weights (the paper's
multiplicative variability, PCM programming noise, drift, ...), applied in order to the
quantized weight, and optionally a *periphery* (DAC, ADC, output noise, tiles) around each
matrix-vector multiplication. A part is a frozen dataclass with two pure methods:

* ``sample(key, shapes) -> tuple``: the chip-fixed state of every analog layer (one pytree of
  arrays per kernel shape), from one key. It depends on the key and the shapes only, never on
  the weights, so training (whose weights change every step) and evaluation share it.
* ``apply(w, state, t) -> w``: one layer's weight after the part, at read time ``t`` (seconds
  since programming). ``w`` and the state may carry a leading chip axis.

A **chip** has the structure of the analog kernels (:func:`pimjax.introspect.analog_kernels`):
``{"Conv_0": {"kernel": ChipLayer}, ...}``, and goes into the Flax ``"chip"`` collection. A
:class:`ChipLayer` holds the parts' states of one layer, the read time ``t`` and (static) the
device, so an analog layer computes with any device without knowing its parts. A *chip batch*
(from :func:`sample_chips`) has a leading axis ``C`` on every leaf: ``t`` is ``()`` for one chip
and ``(C,)`` for a batch, which is how :attr:`ChipLayer.num_chips` tells them apart.

Chip ``i`` of a key is drawn from ``fold_in(key, i)`` (:func:`chip_keys`); weight part ``j``
draws from :func:`part_key` of the chip key, so a chip is the same on any device, in any
chunk and in any process.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import flax.struct
import jax
import jax.numpy as jnp

PART_STREAM = 1 << 16  # fold_in tags of weight parts after the first (see part_key)


class WeightPart(Protocol):
    """A non-ideality of the stored weights (see the module docstring)."""

    def sample(self, key, shapes) -> tuple: ...

    def apply(self, w, state, t): ...


class Periphery(Protocol):
    """What a chip does around each matrix-vector multiplication (DAC, ADC, noise, tiles)."""

    needs_key: bool

    def apply(self, x, w_eff, w_nominal, linear: Callable, key): ...


@dataclasses.dataclass(frozen=True)
class Device:
    """A device: weight parts applied in order, and an optional periphery."""

    weights: tuple[Any, ...] = ()
    periphery: Any = None
    name: str = "custom"

    def __post_init__(self):
        if not isinstance(self.weights, tuple):
            object.__setattr__(self, "weights", tuple(self.weights))
        for part in self.weights:
            if not (callable(getattr(part, "sample", None)) and callable(getattr(part, "apply",
                                                                                 None))):
                raise ValueError(f"device part {part!r} needs sample(key, shapes) and "
                                 "apply(w, state, t) methods")

    @property
    def needs_key(self) -> bool:
        """True when the device draws fresh noise at every read (the Flax rng stream "read")."""
        return self.periphery is not None and bool(self.periphery.needs_key)

    @property
    def is_ideal(self) -> bool:
        """True when the device changes nothing: no weight parts and no periphery."""
        return not self.weights and self.periphery is None


@flax.struct.dataclass
class ChipLayer:
    """One analog layer of a chip: its parts' states, the read time and the device."""

    states: tuple
    t: jax.Array
    device: Device = flax.struct.field(pytree_node=False)
    shape: tuple = flax.struct.field(pytree_node=False, default=())  # the layer's kernel shape

    @property
    def num_chips(self) -> int | None:
        """The chip-batch size, or None for a single chip (the chip axis lives on ``t``)."""
        return int(self.t.shape[0]) if jnp.ndim(self.t) else None

    @property
    def needs_key(self) -> bool:
        """True when :meth:`forward` needs a fresh key at every read."""
        return self.device.needs_key

    def weights(self, w):
        """The weights the crossbar computes with: ``w`` after every weight part, in order.

        For a chip batch the result has a leading chip axis.
        """
        t = self.t if self.num_chips is None else self.t.reshape((-1,) + (1,) * jnp.ndim(w))
        for part, state in zip(self.device.weights, self.states, strict=True):
            w = part.apply(w, state, t)
        return w

    def forward(self, x, w, linear: Callable, key=None):
        """The layer's MVM on this chip: ``linear(x, w_eff)`` inside the device's periphery.

        ``w`` is the quantized kernel, ``linear(x, w)`` the layer's conv or matmul (for a chip
        batch it takes ``w [C, *kernel]``); ``key`` is the read key when :attr:`needs_key`.
        """
        w_eff = self.weights(w)
        if self.device.periphery is None:
            return linear(x, w_eff)
        return self.device.periphery.apply(x, w_eff, w, linear, key)


def part_key(key, index: int):
    """The key weight part ``index`` of a device samples from (part 0: the chip key itself)."""
    return key if index == 0 else jax.random.fold_in(key, PART_STREAM + index)


def _shapes(template) -> tuple:
    leaves = jax.tree_util.tree_leaves(template)
    if not leaves:
        raise ValueError("template has no arrays: pass the model's analog kernels "
                         "(pimjax.introspect.analog_kernels(variables))")
    return tuple(tuple(leaf.shape) for leaf in leaves)


def sample_chip(key, device: Device, template):
    """One chip of ``device``: a pytree of :class:`ChipLayer` shaped like ``template``.

    ``template`` is any pytree with the analog kernels' structure (usually
    ``analog_kernels(variables)``); only its shapes are read.
    """
    if not isinstance(device, Device):
        raise ValueError(f"device must be a pimjax.devices.Device, got {type(device).__name__}: "
                         "build one with pimjax.devices.paper(...), pcm(...) or ideal()")
    shapes = _shapes(template)
    states = [part.sample(part_key(key, j), shapes) for j, part in enumerate(device.weights)]
    layers = [ChipLayer(tuple(s[i] for s in states), jnp.zeros((), jnp.float32), device, shape)
              for i, shape in enumerate(shapes)]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), layers)


def chip_keys(key, num_chips: int, start: int = 0):
    """Keys of chips ``start .. start+num_chips-1``: chip i's key is ``fold_in(key, i)``."""
    if int(num_chips) <= 0:
        raise ValueError(f"num_chips={num_chips!r} must be a positive integer")
    idx = jnp.arange(start, start + num_chips, dtype=jnp.uint32)
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, idx)


def sample_chips(key, device: Device, template, num_chips: int):
    """A chip batch: chips ``0..num_chips-1`` of ``key`` stacked on a leading axis."""
    keys = chip_keys(key, num_chips)
    return jax.vmap(lambda k: sample_chip(k, device, template))(keys)


def is_chip_layer(node) -> bool:
    """True for a :class:`ChipLayer` (an ``is_leaf`` for tree maps over chips)."""
    return isinstance(node, ChipLayer)


def at_time(chip, t):
    """The chip read ``t`` seconds after programming (every layer's ``t`` set to ``t``)."""
    def set_t(layer):
        return layer.replace(t=jnp.broadcast_to(jnp.asarray(t, jnp.float32), layer.t.shape))

    return jax.tree_util.tree_map(set_t, chip, is_leaf=is_chip_layer)


def num_chips(chip) -> int | None:
    """The chip-batch size of a chip pytree, or None for a single chip."""
    layers = jax.tree_util.tree_leaves(chip, is_leaf=is_chip_layer)
    if not layers or not isinstance(layers[0], ChipLayer):
        raise ValueError("not a chip: sample one with pimjax.devices.sample_chip")
    return layers[0].num_chips
