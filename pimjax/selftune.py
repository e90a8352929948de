"""Label-free self-tuning of chips: per-layer digital gains/offsets solved layer by layer.

Every analog layer applies a digital gain and offset to its MVM output, ``g * mvm + o``
(the ``"tune"`` collection, identity by default). After training, the nominal model's
per-channel output statistics on calibration images are recorded once
(:func:`nominal_stats`) and stored with the model (:func:`save_stats`). On a chip,
:func:`self_tune` solves ``g``/``o`` of one layer after another, in execution order, with
the earlier layers already tuned, so that the chip's statistics match the stored ones:

=============== ============================================================================
``gain``        one gain per layer: ``g = std_nominal / std_chip`` (over channels and positions)
``gain_offset`` one gain and one offset per layer, matching the layer's mean and std
``channel``     a gain and an offset per output channel, matching each channel's mean and std
``bn``          batch-norm re-estimation: the batch norm reading the layer gets the chip's own
                calibration mean/var (expressed exactly as a per-channel gain/offset on the MVM
                output; layers not followed by a batch norm keep g = 1, o = 0)
``paired``      per-channel least squares against the nominal model's activations on the same
                images: ``g, o = argmin ||g y_chip + o - y_nominal||^2``
=============== ============================================================================

The solve is one jitted function of (variables, chip, calibration images); a chip batch
(factors ``[C, *kernel]``, see :mod:`pimjax.perchip`) tunes all C chips at once and
``jax.vmap`` over single chips works too. With the calibration set as a single batch the
solve is **one forward pass** (each layer's statistics are taken as the pass reaches it);
with ``batch_size`` smaller than the set it makes one pass per analog layer over the
batches (each stopped after its layer), accumulating exact streaming moments. The cost
(images, passes) comes back with every result (:class:`TuneCost`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import warnings
from pathlib import Path

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from pimjax import perchip
from pimjax.layers import TUNE, analog_kernels, with_chip

METHODS = ("gain", "gain_offset", "channel", "bn", "paired")
CHIP_MODES = ("layers", "map")
NEEDS_STATS = ("gain", "gain_offset", "channel")
_TINY = 1e-12  # variances below this are treated as a dead channel: left untuned
_ANALOG_METHOD = "_tune_and_bias"  # the analog layers' method that applies g/o to the MVM


# ------------------------------------------------------------------------- model structure


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """One analog layer: its path, width, bias, and the batch norm that reads its output."""

    path: tuple[str, ...]
    features: int
    bias: bool
    bn_path: tuple[str, ...] | None
    bn_epsilon: float
    in_size: int = 0  # input elements per image
    out_size: int = 0  # output elements per image

    @property
    def name(self) -> str:
        """The layer's path joined by '/' (the key of its statistics)."""
        return "/".join(self.path)


def _input_shape(model) -> tuple[int, ...]:
    shape = getattr(model, "input_shape", None)
    if shape is None:
        raise ValueError(f"{type(model).__name__} has no input_shape: use a pimjax.models model")
    return tuple(shape)


@functools.lru_cache(maxsize=64)
def _layers_cached(model) -> tuple[LayerInfo, ...]:
    x = jax.ShapeDtypeStruct((1, *_input_shape(model)), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    analog, bns, sizes = [], [], {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        mod = context.module
        if context.method_name == "__call__" and getattr(mod, "analog", False) \
                and hasattr(mod, "features") and not isinstance(mod, nn.BatchNorm):
            sizes[tuple(mod.scope.path)] = (math.prod(args[0].shape), math.prod(out.shape))
        if context.method_name == _ANALOG_METHOD and getattr(mod, "analog", False):
            analog.append((tuple(mod.scope.path), out, mod.features, mod.use_bias))
        elif isinstance(mod, nn.BatchNorm) and context.method_name == "__call__":
            bns.append((tuple(mod.scope.path), args[0], mod.epsilon))
        return out

    def run(variables, x):
        with nn.intercept_methods(record):
            model.apply(variables, x)
        return 0

    jax.eval_shape(run, variables, x)
    out = []
    for path, y, features, bias in analog:
        bn = next(((p, eps) for p, inp, eps in bns if inp is y), (None, 0.0))
        out.append(LayerInfo(path, int(features), bool(bias), bn[0], float(bn[1]),
                             *sizes.get(path, (0, 0))))
    return tuple(out)


def analog_layers(model) -> tuple[LayerInfo, ...]:
    """The model's analog layers in execution order, each with the batch norm fed by it."""
    return _layers_cached(model)


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


def _get(tree, path):
    for name in path:
        tree = tree[name]
    return tree


def _nest(flat: dict) -> dict:
    """``{("a", "b"): v}`` -> ``{"a": {"b": v}}``."""
    out: dict = {}
    for path, v in flat.items():
        node = out
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = v
    return out


def identity_tune(model, num_chips: int | None = None) -> dict:
    """The identity tune (g = 1, o = 0) in the ``"tune"`` layout, optionally ``[C, F]`` per chip."""
    flat = {}
    for layer in analog_layers(model):
        shape = (layer.features,) if num_chips is None else (num_chips, layer.features)
        flat[(*layer.path, "gain")] = jnp.ones(shape, jnp.float32)
        flat[(*layer.path, "offset")] = jnp.zeros(shape, jnp.float32)
    return _nest(flat)


def with_tune(variables, tune):
    """Variables with ``tune`` as their ``"tune"`` collection."""
    return {**variables, TUNE: tune}


# ------------------------------------------------------------------------------ statistics


@flax.struct.dataclass
class NominalStats:
    """Per-channel mean and variance of each analog layer's MVM output on the nominal chip."""

    mean: dict  # layer name -> [features]
    var: dict  # layer name -> [features]
    num_images: int = flax.struct.field(pytree_node=False, default=0)


@flax.struct.dataclass
class _Moments:
    """Streaming per-channel moments (Chan et al.): count, means, centred sums of squares."""

    n: jax.Array
    mean: jax.Array
    m2: jax.Array
    nmean: jax.Array | None = None  # the paired nominal activations'
    nm2: jax.Array | None = None
    cross: jax.Array | None = None  # sum of (y - mean)(y_nom - nmean)

    @property
    def var(self):
        return self.m2 / jnp.maximum(self.n, 1.0)

    @property
    def nvar(self):
        return self.nm2 / jnp.maximum(self.n, 1.0)

    @property
    def cov(self):
        return self.cross / jnp.maximum(self.n, 1.0)


def _moments_axes(y, weight, y_nom, chip_axis: bool):
    """Per-channel moments of ``y`` over its batch and spatial axes; ``weight [B]`` masks images.

    ``y`` is ``[C, B, ..., F]`` with ``chip_axis`` (the chip axis is kept), else ``[B, ..., F]``;
    ``y_nom [B, ..., F]`` (optional) are the paired nominal activations.
    """
    b_axis = 1 if chip_axis else 0
    axes = tuple(range(b_axis, y.ndim - 1))
    w = weight.reshape((weight.shape[0],) + (1,) * (y.ndim - b_axis - 1))
    spatial = math.prod(y.shape[b_axis + 1 : -1])
    n = jnp.sum(weight) * spatial
    nsafe = jnp.maximum(n, 1.0)
    mean = jnp.sum(y * w, axis=axes) / nsafe
    yc = y - jnp.expand_dims(mean, axes)
    m2 = jnp.sum(w * yc * yc, axis=axes)
    if y_nom is None:
        return _Moments(n, mean, m2)
    n_axes = tuple(range(0, y_nom.ndim - 1))
    nmean = jnp.sum(y_nom * w, axis=n_axes) / nsafe
    nc = y_nom - jnp.expand_dims(nmean, n_axes)
    nm2 = jnp.sum(w * nc * nc, axis=n_axes)
    cross = jnp.sum(w * yc * nc, axis=axes)
    return _Moments(n, mean, m2, nmean, nm2, cross)


def _combine(a: _Moments, b: _Moments) -> _Moments:
    """Chan's parallel update of two sets of moments."""
    n = a.n + b.n
    nsafe = jnp.maximum(n, 1.0)
    f = a.n * b.n / nsafe
    d = b.mean - a.mean
    out = dict(n=n, mean=a.mean + d * b.n / nsafe, m2=a.m2 + b.m2 + d * d * f)
    if a.nmean is not None:
        dn = b.nmean - a.nmean
        out.update(nmean=a.nmean + dn * b.n / nsafe, nm2=a.nm2 + b.nm2 + dn * dn * f,
                   cross=a.cross + b.cross + d * dn * f)
    return _Moments(**out)


def _batches(images, batch_size: int | None):
    """Split ``images [n, ...]`` into zero-padded batches ``[nb, B, ...]`` and masks ``[nb, B]``."""
    n = images.shape[0]
    if n == 0:
        raise ValueError("the calibration set is empty: pass at least one image")
    bs = n if batch_size is None else min(int(batch_size), n)
    nb = -(-n // bs)
    pad = nb * bs - n
    x = images
    if pad:
        x = jnp.concatenate([images, jnp.zeros((pad, *images.shape[1:]), images.dtype)])
    mask = jnp.concatenate([jnp.ones(n, jnp.float32), jnp.zeros(pad, jnp.float32)])
    return x.reshape(nb, bs, *images.shape[1:]), mask.reshape(nb, bs)


def _capture_mvm(model, variables, x):
    """Run ``model`` and return each analog layer's sowed MVM output, keyed by layer name."""
    _, state = model.apply(variables, x, mutable=["intermediates"])
    inter = state["intermediates"]
    return {layer.name: _get(inter, layer.path)["mvm"][0] for layer in analog_layers(model)}


@functools.partial(jax.jit, static_argnames="model")
def _nominal_batch_moments(model, variables, x, weight):
    mvm = _capture_mvm(model, with_chip(variables, None), x)
    return {k: _moments_axes(y, weight, None, False) for k, y in mvm.items()}


def _check_calibrated(variables, where: str) -> None:
    """Warn when a running-max activation quantizer was never trained (its clip is 0)."""
    flat = jax.tree_util.tree_flatten_with_path(variables.get("batch_stats", {}))[0]
    zeros = [jax.tree_util.keystr(p) for p, v in flat
             if str(p[-1]).find("act_max") >= 0 and float(jnp.min(v)) <= 0.0]
    if zeros:
        warnings.warn(
            f"{where}: activation quantizers {zeros[:3]}{'...' if len(zeros) > 3 else ''} have "
            "act_max = 0 (never trained), so they clip at each batch's max and results depend on "
            "how images are batched; train or calibrate the model first",
            stacklevel=3,
        )


def nominal_stats(model, variables, images, batch_size: int | None = 256) -> NominalStats:
    """Per-channel MVM statistics of the nominal chip (no variation) on calibration images."""
    images = jnp.asarray(images, jnp.float32)
    check_images(model, images, "calibration images")
    _check_calibrated(variables, "nominal_stats")
    xs, masks = _batches(images, batch_size)
    total = None
    for i in range(xs.shape[0]):
        m = _nominal_batch_moments(model, variables, xs[i], masks[i])
        total = m if total is None else jax.tree_util.tree_map(
            _combine, total, m, is_leaf=lambda t: isinstance(t, _Moments))
    return NominalStats(mean={k: v.mean for k, v in total.items()},
                        var={k: v.var for k, v in total.items()},
                        num_images=int(images.shape[0]))


def save_stats(path: str | os.PathLike, stats: NominalStats) -> Path:
    """Write nominal statistics to an ``.npz`` file (e.g. next to the checkpoint)."""
    path = Path(path)
    arrays = {}
    for name in stats.mean:
        arrays[f"mean:{name}"] = np.asarray(stats.mean[name])
        arrays[f"var:{name}"] = np.asarray(stats.var[name])
    arrays["__meta__"] = np.frombuffer(
        json.dumps({"num_images": stats.num_images}).encode(), np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def load_stats(path: str | os.PathLike) -> NominalStats:
    """Read statistics written by :func:`save_stats`."""
    with np.load(Path(path)) as z:
        meta = json.loads(bytes(z["__meta__"]).decode())
        mean = {k[5:]: jnp.asarray(z[k]) for k in z.files if k.startswith("mean:")}
        var = {k[4:]: jnp.asarray(z[k]) for k in z.files if k.startswith("var:")}
    return NominalStats(mean=mean, var=var, num_images=int(meta["num_images"]))


def check_stats(model, stats: NominalStats) -> None:
    """Raise ValueError unless ``stats`` has one entry of the right width per analog layer."""
    for layer in analog_layers(model):
        if layer.name not in stats.mean or layer.name not in stats.var:
            raise ValueError(
                f"nominal stats have no entry for layer {layer.name!r} (they hold "
                f"{sorted(stats.mean)}): compute them with nominal_stats() for this model")
        shape = tuple(np.shape(stats.mean[layer.name]))
        if shape != (layer.features,):
            raise ValueError(f"nominal stats for {layer.name!r} have shape {shape}, the layer "
                             f"has {layer.features} channels: stats belong to another model")


def check_images(model, images, what: str = "images") -> None:
    """Raise ValueError unless ``images`` is a non-empty float batch of the model's input shape."""
    shape = _input_shape(model)
    if images.ndim != 4 or tuple(images.shape[1:]) != shape:
        raise ValueError(f"{what} must be [n, {', '.join(map(str, shape))}] for "
                         f"{type(model).__name__}, got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError(f"{what} are empty: pass at least one image")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"{what} must be float (normalized, see pimjax.data.normalize), "
                         f"got {images.dtype}")


# ---------------------------------------------------------------------------------- solve


@dataclasses.dataclass(frozen=True)
class TuneCost:
    """What one chip's self-tuning costs: calibration images and forward passes over them.

    ``passes`` are the chip's passes over the calibration set (with ``batch_size`` below the
    set size, one per analog layer, each stopped after its layer); ``nominal_passes`` are
    the nominal model's (``paired`` only), shared by every chip of a call.
    """

    method: str
    images: int
    batches: int
    passes: int
    nominal_passes: int
    labels_used: bool = False

    def __str__(self) -> str:
        nominal = f" + {self.nominal_passes} nominal (shared)" if self.nominal_passes else ""
        return (f"{self.method}: {self.images} unlabeled images in {self.batches} batch(es), "
                f"{self.passes} pass(es) per chip{nominal}")


def tune_cost(model, method: str, num_images: int, batch_size: int | None = None) -> TuneCost:
    """The cost of :func:`self_tune` with these settings."""
    _check_method(method)
    nb = 1 if batch_size is None else -(-num_images // min(int(batch_size), num_images))
    passes = 1 if nb == 1 else len(analog_layers(model))
    return TuneCost(method, int(num_images), nb, passes, passes if method == "paired" else 0)


@flax.struct.dataclass
class TuneResult:
    """The solved ``"tune"`` collection (leaves ``[F]``, ``[C, F]`` for a chip batch), its cost."""

    tune: dict
    cost: TuneCost = flax.struct.field(pytree_node=False)


def _check_method(method):
    if method not in METHODS:
        raise ValueError(f"method={method!r} is unknown: use one of {METHODS}")


def _solve_layer(method, layer: LayerInfo, m: _Moments, target, batch_stats, params):
    """Gain and offset ``[C, F]`` of one layer from the chip's moments ``m`` (``[C, F]``)."""
    var_c, mean_c = m.var, m.mean
    ok = var_c > _TINY
    if method in ("gain", "gain_offset"):
        t_mean, t_var = target
        layer_mean_c = jnp.mean(mean_c, -1, keepdims=True)
        layer_var_c = jnp.mean(var_c, -1, keepdims=True) + jnp.mean(
            (mean_c - layer_mean_c) ** 2, -1, keepdims=True)
        layer_mean_t = jnp.mean(t_mean)
        layer_var_t = jnp.mean(t_var) + jnp.mean((t_mean - layer_mean_t) ** 2)
        lok = layer_var_c > _TINY
        g = jnp.where(lok, jnp.sqrt(layer_var_t / jnp.where(lok, layer_var_c, 1.0)), 1.0)
        g = jnp.broadcast_to(g, mean_c.shape)
        o = layer_mean_t - g * layer_mean_c if method == "gain_offset" else jnp.zeros_like(g)
        o = jnp.where(lok, jnp.broadcast_to(o, mean_c.shape), 0.0)
        return g, o
    if method == "channel":
        t_mean, t_var = target
        g = jnp.where(ok, jnp.sqrt(t_var / jnp.where(ok, var_c, 1.0)), 1.0)
        return g, jnp.where(ok, t_mean - g * mean_c, 0.0)
    if method == "paired":
        g = jnp.where(ok, m.cov / jnp.where(ok, var_c, 1.0), 1.0)
        return g, jnp.where(ok, m.nmean - g * mean_c, 0.0)
    # bn: z = mvm + bias feeds the batch norm; give it the chip's own mean/var of z.
    if layer.bn_path is None:
        return jnp.ones_like(mean_c), jnp.zeros_like(mean_c)
    bn = _get(batch_stats, layer.bn_path)
    bias = _get(params, layer.path)["bias"] if layer.bias else 0.0
    g = jnp.sqrt((bn["var"] + layer.bn_epsilon) / (var_c + layer.bn_epsilon))
    # (z - mean_z) * g + mu_bn = g * mvm + o + bias with mean_z = mean_c + bias
    return g, bn["mean"] - bias - g * mean_c


class _StopForward(Exception):  # noqa: N818 - control flow, not an error
    """Raised inside a forward pass once the layer being tuned has been reached."""


def _has_chip_axis(variables, factors) -> bool:
    """True for a chip batch (factors ``[C, *kernel]``), False for one chip."""
    f = jax.tree_util.tree_leaves(factors)[0]
    return f.ndim == jax.tree_util.tree_leaves(analog_kernels(variables))[0].ndim + 1


def solve_chips(model, method, batch_size, variables, factors, images, stats, mode="layers"):
    """Tune one chip or a chip batch; a batch with ``mode="map"`` tunes chip after chip.

    The nominal activations of ``paired`` are computed once for all chips, except with
    several calibration batches, where the solve runs on the chip axis (``layers``) instead.
    """
    one_batch = batch_size is None or batch_size >= images.shape[0]
    if mode == "map" and _has_chip_axis(variables, factors) and (one_batch or method != "paired"):
        nominal = None
        if method == "paired" and one_batch:
            nominal = _capture_mvm(model, with_chip(variables, None), images)
        return jax.lax.map(lambda f: _solve(model, method, batch_size, variables, f, images,
                                            stats, nominal), factors)
    return _solve(model, method, batch_size, variables, factors, images, stats)


def _solve(model, method, batch_size, variables, factors, images, stats, nominal=None):
    """The layer-by-layer solve: the tune tree with ``[F]`` leaves, ``[C, F]`` for a chip batch."""
    layers = analog_layers(model)
    chip_axis = _has_chip_axis(variables, factors)
    lead = (jax.tree_util.tree_leaves(factors)[0].shape[0],) if chip_axis else ()
    ident = with_tune(variables, identity_tune(model))
    chip_vars = with_chip(ident, factors)
    nominal_vars = with_chip(variables, None)
    xs, masks = _batches(images, batch_size)
    solved: dict = {}

    def target(layer):
        if method in NEEDS_STATS:
            return stats.mean[layer.name], stats.var[layer.name]
        return None

    def solve(layer, m):
        g, o = _solve_layer(method, layer, m, target(layer), variables.get("batch_stats"),
                            variables["params"])
        solved[layer.path] = (jnp.broadcast_to(g, (*lead, layer.features)),
                              jnp.broadcast_to(o, (*lead, layer.features)))

    def apply_known(y, path):
        g, o = solved[path]
        return y * perchip.broadcast_per_chip(g, y) + perchip.broadcast_per_chip(o, y)

    if xs.shape[0] == 1:  # one batch: solve every layer as the single pass reaches it
        x, w = xs[0], masks[0]
        nom = {}
        if method == "paired":
            nom = nominal if nominal is not None else _capture_mvm(model, nominal_vars, x)
        by_path = {layer.path: layer for layer in layers}

        def online(next_fun, args, kwargs, context):
            mod = context.module
            if context.method_name != _ANALOG_METHOD or not getattr(mod, "analog", False):
                return next_fun(*args, **kwargs)
            layer = by_path[tuple(mod.scope.path)]
            y = args[0]
            solve(layer, _moments_axes(y, w, nom.get(layer.name), chip_axis))
            return next_fun(apply_known(y, layer.path), *args[1:], **kwargs)

        with nn.intercept_methods(online):
            model.apply(chip_vars, x)
    else:  # one pass per layer over all batches, each stopped at its layer
        for layer in layers:
            def body(acc, batch, layer=layer):
                x, w = batch
                captured = {}

                def capture(next_fun, args, kwargs, context):
                    mod = context.module
                    if context.method_name != _ANALOG_METHOD or not getattr(mod, "analog", False):
                        return next_fun(*args, **kwargs)
                    path = tuple(mod.scope.path)
                    if path == layer.path:
                        captured["y"] = args[0]
                        raise _StopForward
                    return next_fun(apply_known(args[0], path), *args[1:], **kwargs)

                try:
                    with nn.intercept_methods(capture):
                        model.apply(chip_vars, x)
                except _StopForward:
                    pass
                y_nom = None
                if method == "paired":
                    y_nom = _capture_mvm(model, nominal_vars, x)[layer.name]
                m = _moments_axes(captured["y"], w, y_nom, chip_axis)
                return (m if acc is None else _combine(acc, m)), None

            first = body(None, (xs[0], masks[0]))[0]
            m, _ = jax.lax.scan(body, first, (xs[1:], masks[1:]))
            solve(layer, m)
    flat = {}
    for layer in layers:
        g, o = solved[layer.path]
        flat[(*layer.path, "gain")] = g
        flat[(*layer.path, "offset")] = o
    return _nest(flat)


_solve_jit = jax.jit(solve_chips, static_argnames=("model", "method", "batch_size", "mode"))


def check_tuning_args(model, method, images, stats, batch_size) -> None:
    """Validate self-tuning arguments before any work (ValueError naming the bad field)."""
    _check_method(method)
    check_images(model, images, "calibration images")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer or None")
    if method in NEEDS_STATS:
        if stats is None:
            raise ValueError(f"method={method!r} needs the nominal stats: pass "
                             "stats=nominal_stats(model, variables, images)")
        check_stats(model, stats)


def self_tune(model, variables, chip, images, method: str = "channel",
              stats: NominalStats | None = None, batch_size: int | None = None,
              mode: str | None = None) -> TuneResult:
    """Solve one chip's (or a chip batch's) digital gains/offsets, label-free, layer by layer.

    ``chip`` is one chip (factors shaped like the kernels) or a chip batch (``[C, *kernel]``);
    ``images`` are normalized calibration images ``[n, H, W, C]``; ``stats`` are the nominal
    statistics (:func:`nominal_stats`), needed by ``gain``, ``gain_offset`` and ``channel``.
    Returns the ``"tune"`` collection (apply with :func:`with_tune`) and the cost. Traceable:
    ``jax.vmap`` over single chips works (a chip batch is faster). ``mode`` (chip batches):
    ``"layers"`` or ``"map"``, default :func:`chip_mode`.
    """
    images = jnp.asarray(images)
    check_tuning_args(model, method, images, stats, batch_size)
    template = analog_kernels(variables)
    leaves, tleaves = jax.tree_util.tree_leaves(chip), jax.tree_util.tree_leaves(template)
    if len(leaves) != len(tleaves):
        raise ValueError(f"chip has {len(leaves)} factors, the model {len(tleaves)} analog kernels")
    if leaves[0].ndim not in (tleaves[0].ndim, tleaves[0].ndim + 1):
        raise ValueError(f"chip factors have shape {leaves[0].shape}, the kernel "
                         f"{tleaves[0].shape}: pass one chip or a chip batch [C, *kernel]")
    if mode is not None and mode not in CHIP_MODES:
        raise ValueError(f"mode={mode!r} is unknown: use one of {CHIP_MODES}")
    stats_arg = stats if method in NEEDS_STATS else None
    if isinstance(batch_size, int) and batch_size >= images.shape[0]:
        batch_size = None
    tune = _solve_jit(model, method, batch_size, variables, chip, images, stats_arg,
                      mode or chip_mode(model))
    return TuneResult(tune, tune_cost(model, method, images.shape[0], batch_size))


@dataclasses.dataclass(frozen=True, eq=False)
class SelfTune:
    """A self-tuning recipe for :func:`pimjax.montecarlo.evaluate_chips`: method, images, stats."""

    method: str
    images: jax.Array
    stats: NominalStats | None = None
    batch_size: int | None = None

    def check(self, model) -> None:
        """Raise ValueError if this recipe does not fit ``model``."""
        check_tuning_args(model, self.method, jnp.asarray(self.images), self.stats,
                          self.batch_size)

    def cost(self, model) -> TuneCost:
        """Calibration cost per chip."""
        return tune_cost(model, self.method, int(self.images.shape[0]), self._batch())

    def _batch(self):
        n = int(self.images.shape[0])
        return None if self.batch_size is None or self.batch_size >= n else int(self.batch_size)
