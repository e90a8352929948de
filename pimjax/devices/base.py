"""Devices and chips: a device is a frozen dataclass of parts, a chip is one sample of it.

A **device** lists *weight parts*, each a non-ideality of the stored weights (the paper's
multiplicative variability, PCM programming noise, drift, ...), applied in order to the
quantized weight, and optionally a *periphery* (DAC, ADC, output noise, tiles) around each
matrix-vector multiplication. A part is a frozen dataclass with two pure methods:

* ``sample(key, template) -> tree``: the chip-fixed state of every analog layer (a pytree of
  arrays per leaf of ``template``, the analog kernels or their shapes), from one key. It
  depends on the key and the shapes only, never on the weights, so training (whose weights
  change every step) and evaluation share it.
* ``apply(w, state, t) -> w``: one layer's weight after the part, at read time ``t`` (seconds
  since programming). For a chip batch ``w`` is ``[C, *kernel]``, the state leaves carry the
  same leading ``C`` and ``t`` has shape ``(C,)``.

Per-read noise (the periphery's output noise) is drawn from a key: the Flax rng stream
``"read"`` of the forward pass, or keys stored on the chip by :func:`with_read_keys` (one per
image, or per chip and image), which is how a Monte-Carlo sweep stays independent of its
chunking.

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

from pimjax import draws

PART_STREAM = 1 << 16  # fold_in tags of weight parts after the first (see part_key)


class WeightPart(Protocol):
    """A non-ideality of the stored weights (see the module docstring)."""

    def sample(self, key, template): ...

    def apply(self, w, state, t): ...


class PeripheryPart(Protocol):
    """What a chip does around each matrix-vector multiplication (DAC, ADC, noise, tiles)."""

    needs_key: bool

    def forward(self, x, w_eff, w_nominal, key, conv): ...


class Compensation(Protocol):
    """A per-layer output gain the chip computes from its own state (e.g. drift compensation)."""

    def sample(self, key, template): ...

    def gain(self, chip_layer, w_nominal, state, w_eff=None): ...


@dataclasses.dataclass(frozen=True)
class Device:
    """A device: weight parts applied in order, an optional periphery, an optional
    compensation of the outputs."""

    weights: tuple[Any, ...] = ()
    periphery: Any = None
    compensation: Any = None
    name: str = "custom"

    def __post_init__(self):
        if not isinstance(self.weights, tuple):
            object.__setattr__(self, "weights", tuple(self.weights))
        for part in self.weights:
            if not (callable(getattr(part, "sample", None)) and callable(getattr(part, "apply",
                                                                                 None))):
                raise ValueError(f"device part {part!r} needs sample(key, template) and "
                                 "apply(w, state, t) methods")

    @property
    def needs_key(self) -> bool:
        """True when the device draws fresh noise at every read (the Flax rng stream "read")."""
        return self.periphery is not None and bool(self.periphery.needs_key)

    @property
    def is_ideal(self) -> bool:
        """True when the device changes nothing: no parts, no periphery, no compensation."""
        return not self.weights and self.periphery is None and self.compensation is None


@flax.struct.dataclass
class ChipLayer:
    """One analog layer of a chip: its parts' states, the read time and the device."""

    states: tuple  # one state per weight part of the device
    t: jax.Array  # seconds since programming: () for one chip, (C,) for a chip batch
    compensation: Any = None  # the compensation's state (None without one)
    read_key: jax.Array | None = None  # per-image (or chip-and-image) read keys, if set
    device: Device = flax.struct.field(pytree_node=False, default=None)
    shape: tuple = flax.struct.field(pytree_node=False, default=())  # the layer's kernel shape
    index: int = flax.struct.field(pytree_node=False, default=0)  # the layer's position

    @property
    def num_chips(self) -> int | None:
        """The chip-batch size, or None for a single chip (the chip axis lives on ``t``)."""
        return int(self.t.shape[0]) if jnp.ndim(self.t) else None

    @property
    def needs_key(self) -> bool:
        """True when :meth:`forward` draws per-read noise and no read keys are stored."""
        return self.device.needs_key and self.read_key is None

    def weights(self, w, t=None):
        """The weights the crossbar computes with: ``w`` after every weight part, at ``t``
        (default: the chip's read time). A chip batch gives ``[C, *kernel]``."""
        t = self.t if t is None else jnp.broadcast_to(jnp.asarray(t, jnp.float32), self.t.shape)
        if self.num_chips is not None:
            w = jnp.broadcast_to(w, (self.num_chips, *jnp.shape(w)))
        for part, state in zip(self.device.weights, self.states, strict=True):
            w = part.apply(w, state, t)
        return w

    def forward(self, x, w, linear: Callable, key=None, conv=None):
        """The layer's MVM on this chip: ``linear(x, w_eff)``, or the device's periphery.

        ``w`` is the quantized kernel, ``linear(x, w)`` the layer's ideal conv or matmul (for
        a chip batch it takes ``w [C, *kernel]``), ``conv`` the ``(strides, padding)`` of a conv
        layer (None: dense). ``key`` is the read key when :attr:`needs_key`.
        """
        w_eff = self.weights(w)
        if self.device.periphery is None:
            y = linear(x, w_eff)
        else:
            if self.read_key is not None:
                key = fold_keys(self.read_key, self.index)
            y = self.device.periphery.forward(x, w_eff, w, key, conv)
        if self.device.compensation is not None:
            g = self.device.compensation.gain(self, w, self.compensation, w_eff)
            y = y * (g if self.num_chips is None else g.reshape((-1,) + (1,) * (y.ndim - 1)))
        return y


def fold_keys(keys, data: int):
    """``fold_in(k, data)`` of every key of a key array of any shape (typed keys, or raw
    ``uint32`` key data with the key's words last); returns typed keys."""
    keys = jnp.asarray(keys) if not isinstance(keys, jax.Array) else keys
    if not jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key):
        keys = jax.random.wrap_key_data(keys)
    return draws.fold_in(keys, data)


def part_key(key, index: int):
    """The key weight part ``index`` of a device samples from (part 0: the chip key itself)."""
    return key if index == 0 else draws.fold_in(key, PART_STREAM + index)


COMPENSATION_STREAM = PART_STREAM - 1  # fold_in tag of the compensation's state
READ_STREAM = PART_STREAM - 2  # fold_in tag of a chip's per-read keys
EVAL_READS, TUNE_READS = 0, 1  # read_keys streams: evaluation reads, self-tuning's reads


def sample_chip(key, device: Device, template):
    """One chip of ``device``: a pytree of :class:`ChipLayer` shaped like ``template``.

    ``template`` is any pytree with the analog kernels' structure (usually
    ``analog_kernels(variables)``); only its shapes are read.
    """
    if not isinstance(device, Device):
        raise ValueError(f"device must be a pimjax.devices.Device, got {type(device).__name__}: "
                         "build one with pimjax.devices.paper(...), pcm(...) or ideal()")
    leaves, treedef = jax.tree_util.tree_flatten(template)
    if not leaves:
        raise ValueError("template has no arrays: pass the model's analog kernels "
                         "(pimjax.introspect.analog_kernels(variables))")
    per_part = [treedef.flatten_up_to(part.sample(part_key(key, j), template))
                for j, part in enumerate(device.weights)]
    comp = [None] * len(leaves)
    if device.compensation is not None:
        comp = treedef.flatten_up_to(device.compensation.sample(
            draws.fold_in(key, COMPENSATION_STREAM), template))
    layers = [ChipLayer(tuple(p[i] for p in per_part), jnp.zeros((), jnp.float32), comp[i],
                        None, device, tuple(jnp.shape(leaf)), i)
              for i, leaf in enumerate(leaves)]
    return jax.tree_util.tree_unflatten(treedef, layers)


def chip_keys(key, num_chips: int, start: int = 0):
    """Keys of chips ``start .. start+num_chips-1``: chip i's key is ``fold_in(key, i)``."""
    if int(num_chips) <= 0:
        raise ValueError(f"num_chips={num_chips!r} must be a positive integer")
    idx = jnp.arange(start, start + num_chips, dtype=jnp.uint32)
    return draws.fold_in(key, idx)


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


def read_keys(chip_keys, image_ids, stream: int = 0):
    """``[C, B]`` keys of reading images ``image_ids [B]`` on the chips of ``chip_keys [C]``.

    The key of (chip, image) depends on the chip's key and the image's id only, so a sweep
    draws the same noise for it whatever its chunking; ``stream`` separates uses
    (:data:`EVAL_READS`: evaluation, :data:`TUNE_READS`: self-tuning's calibration reads).
    """
    root = draws.fold_in(draws.fold_in(chip_keys, READ_STREAM), stream)
    typed = jax.dtypes.issubdtype(root.dtype, jax.dtypes.prng_key)
    root = root[:, None] if typed else root[:, None, :]
    return draws.fold_in(root, jnp.asarray(image_ids, jnp.uint32)[None, :])


def with_read_keys(chip, keys):
    """The chip with per-read keys stored on every layer (None removes them).

    ``keys``: one key per image ``[B]`` (one chip), or per chip and image ``[C, B]`` (a chip
    batch); each layer folds in its index, so every (chip, image, layer) draws its own noise.
    """
    return jax.tree_util.tree_map(lambda layer: layer.replace(read_key=keys), chip,
                                  is_leaf=is_chip_layer)


def _first_layer(chip) -> ChipLayer:
    layers = jax.tree_util.tree_leaves(chip, is_leaf=is_chip_layer)
    if not layers or not isinstance(layers[0], ChipLayer):
        raise ValueError("not a chip: sample one with pimjax.devices.sample_chip")
    return layers[0]


def num_chips(chip) -> int | None:
    """The chip-batch size of a chip pytree, or None for a single chip."""
    return _first_layer(chip).num_chips


def chip_device(chip) -> Device:
    """The device a chip (or chip batch) was sampled from."""
    return _first_layer(chip).device


def stored_read_keys(chip):
    """The per-read keys stored on a chip by :func:`with_read_keys`, or None."""
    return _first_layer(chip).read_key
