"""Introspection of pimjax models: their analog layers, partial forward passes, the chip axis.

Everything that needs to know a model's structure goes through here: self-tuning solves one
analog layer after another, the Monte-Carlo sweep runs the first analog layer for all chips
and the rest chip by chip, memory planning sizes activations. The layers expose two public
hooks (:func:`pimjax.layers.intercept_mvm`, :func:`pimjax.layers.intercept_calls`); this module
builds the partial passes on them.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from pimjax.devices import num_chips  # noqa: F401  (the chip axis, re-exported)
from pimjax.layers import TUNE, intercept_calls, intercept_mvm


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """One analog layer: its path, width, bias, and the batch norm that reads its output."""

    path: tuple[str, ...]
    features: int  # the MVM's columns: the "tune" gain/offset's channels
    bias: bool
    bn_path: tuple[str, ...] | None
    bn_epsilon: float
    in_size: int  # input elements per image
    out_size: int  # output elements per image

    @property
    def name(self) -> str:
        """The layer's path joined by '/' (the key of its statistics)."""
        return "/".join(self.path)


def input_shape(model) -> tuple[int, ...]:
    """The ``[H, W, C]`` input shape of a pimjax model (ValueError for other modules)."""
    shape = getattr(model, "input_shape", None)
    if shape is None:
        raise ValueError(f"{type(model).__name__} has no input_shape: use a pimjax.models model")
    return tuple(shape)


def _example(model):
    return jax.ShapeDtypeStruct((1, *input_shape(model)), jnp.float32)


@functools.lru_cache(maxsize=64)
def abstract_variables(model) -> dict:
    """Shapes and dtypes of the variables ``model.init`` makes (traced once per model)."""
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), _example(model))


def analog_kernels(variables):
    """The analog layers' kernels, in the layout of the ``"chip"`` collection.

    An analog layer is one that carries ``"tune"`` variables; its kernel sits at the same path
    in ``"params"``. Use it as the template of :func:`pimjax.devices.sample_chip`.
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
                out["kernel"] = _crossbar(params["kernel"], sub.shape[-1])
            elif hasattr(sub, "items"):
                child = walk(sub, params[name])
                if child:
                    out[name] = child
        return out

    return walk(variables[TUNE], variables["params"])


def _crossbar(kernel, columns: int):
    """A kernel as its crossbar holds it: a conv's HWIO or a dense ``[K, N]`` as is, a
    ``DenseGeneral``'s or ``Einsum``'s N-D kernel (:mod:`pimjax.analog`) as ``[rows, columns]``."""
    if kernel.ndim in (2, 4):
        return kernel
    shape = (math.prod(kernel.shape) // columns, columns)
    if isinstance(kernel, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(shape, kernel.dtype)
    return kernel.reshape(shape)


@functools.lru_cache(maxsize=64)
def _trace(model):
    """One abstract forward pass (traced once per model): the analog layers of
    :func:`analog_layers` and the shapes of every module's output (``capture_intermediates``)."""
    outputs, bns, sizes = [], [], {}

    def on_call(path, x, call):
        y = call()
        sizes[path] = (math.prod(x.shape[1:]), math.prod(y.shape[1:]))
        outputs.append((path, y))
        return y

    def on_bn(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
            bns.append((tuple(context.module.scope.path), args[0], context.module.epsilon))
        return next_fun(*args, **kwargs)

    def run(variables, x):
        with intercept_calls(on_call), nn.intercept_methods(on_bn):
            _, state = model.apply(variables, x, capture_intermediates=True,
                                   mutable=["intermediates"])
        return state["intermediates"]

    variables = abstract_variables(model)
    intermediates = jax.eval_shape(run, variables, _example(model))
    out = []
    for path, y in outputs:
        bn = next(((p, eps) for p, inp, eps in bns if inp is y), (None, 0.0))
        params, tune = variables["params"], variables.get(TUNE, {})
        for name in path:
            params, tune = params[name], tune.get(name, {})
        # the tuning's channels: the MVM's columns, which a converted DenseGeneral/Einsum
        # (pimjax.analog) reshapes to several output axes ([heads, head_dim])
        features = tune["gain"].shape[-1] if "gain" in tune else int(y.shape[-1])
        out.append(LayerInfo(path, int(features), "bias" in params, bn[0], float(bn[1]),
                             *sizes[path]))
    return tuple(out), intermediates


def analog_layers(model) -> tuple[LayerInfo, ...]:
    """The model's analog layers in execution order, each with the batch norm fed by it."""
    return _trace(model)[0]


CHIP_MODES = ("layers", "map")


def chip_mode(model) -> str:
    """How a chip batch runs fastest on this model: ``"layers"`` or ``"map"`` (a cost rule).

    ``layers`` carries the chip axis through every layer and copies each later analog
    layer's input once per chip (``lax.map`` slices); ``map`` computes the first analog layer
    for all chips and copies only its output per chip, then runs one chip at a time (whose
    activations also stay in cache, so ``map`` gets a 2x margin). Measured on a 2-core CPU:
    LeNet-5 (layers 8.4k vs map 7.1k chip-img/s), ResNet-20 (layers 238 vs map 367).
    """
    layers = analog_layers(model)
    later_inputs = sum(layer.in_size for layer in layers[1:])
    return "layers" if 2 * later_inputs <= layers[0].out_size else "map"


class _Stop(Exception):  # noqa: N818 - control flow, not an error
    """Raised inside a forward pass once the layer of interest has run."""


def capture_mvm(model, variables, x, **kwargs) -> dict:
    """Each analog layer's MVM output (before its tune gain/offset), keyed by layer name."""
    out = {}

    def grab(path, y):
        out["/".join(path)] = y
        return y

    with intercept_mvm(grab):
        model.apply(variables, x, **kwargs)
    return out


def apply_with_mvm(model, variables, x, edit, **kwargs):
    """``model.apply`` with every analog layer's MVM output ``y`` replaced by ``edit(path, y)``."""
    with intercept_mvm(edit):
        return model.apply(variables, x, **kwargs)


def run_to_layer(model, variables, x, path, edit=None, **kwargs):
    """The MVM output of the analog layer at ``path``, running the model only that far.

    ``edit(path, y) -> y`` (optional) changes the MVM outputs of the layers before it.
    """
    path = tuple(path)
    captured = {}

    def at(p, y):
        if p == path:
            captured["y"] = y
            raise _Stop
        return y if edit is None else edit(p, y)

    try:
        apply_with_mvm(model, variables, x, at, **kwargs)
    except _Stop:
        return captured["y"]
    raise ValueError(f"{'/'.join(path)} is not an analog layer of {type(model).__name__}")


def layer_output(model, variables, x, path, **kwargs):
    """The output of the analog layer at ``path`` (after tune and bias), running only that far."""
    path = tuple(path)
    captured = {}

    def at(p, _, call):
        y = call()
        if p == path:
            captured["y"] = y
            raise _Stop
        return y

    try:
        with intercept_calls(at):
            model.apply(variables, x, **kwargs)
    except _Stop:
        return captured["y"]
    raise ValueError(f"{'/'.join(path)} is not an analog layer of {type(model).__name__}")


def apply_from_layer(model, variables, x, path, y, **kwargs):
    """``model.apply`` with the analog layer at ``path`` returning ``y`` instead of running."""
    path = tuple(path)

    def at(p, _, call):
        return y if p == path else call()

    with intercept_calls(at):
        return model.apply(variables, x, **kwargs)


def activation_sizes(model) -> tuple[int, ...]:
    """Elements per image of every module output of a forward pass (for memory planning)."""
    return tuple(math.prod(a.shape[1:]) for a in jax.tree_util.tree_leaves(_trace(model)[1]))


def forward_flops(model) -> int:
    """FLOPs of one image's forward pass through the conv/dense layers (2 per multiply-add)."""
    variables = abstract_variables(model)
    inter = _trace(model)[1]
    total = 0
    for path, kernel in jax.tree_util.tree_flatten_with_path(variables["params"])[0]:
        if getattr(path[-1], "key", None) != "kernel":
            continue
        node = inter
        for p in path[:-1]:
            node = node[p.key]
        out = node["__call__"][0]
        total += 2 * math.prod(out.shape[1:]) * math.prod(kernel.shape[:-1])
    return int(total)
