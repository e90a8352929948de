"""Label-free self-tuning of chips: per-layer digital gains/offsets solved layer by layer.

Every analog layer applies a digital gain and offset to its MVM output, ``g * mvm + o``
(the ``"tune"`` collection, identity by default). After training, the nominal model's
per-channel output statistics on calibration images are recorded once
(:func:`nominal_stats`) and stored with the model (:func:`save_stats`). On a chip,
:func:`self_tune` solves ``g``/``o`` of one layer after another, in execution order, with
the earlier layers already tuned, so that the chip's statistics match the stored ones. The
variants (:data:`TUNE_VARIANTS`):

=============== ============================================================================
``gain``        one gain per layer: ``g = std_nominal / std_chip`` (over channels and positions)
``gain_offset`` one gain and one offset per layer, matching the layer's mean and std
``channel``     a gain and an offset per output channel, matching each channel's mean and std
``bn``          batch-norm re-estimation: the batch norm reading the layer gets the chip's own
                calibration mean/var (expressed exactly as a per-channel gain/offset on the MVM
                output; layers not followed by a batch norm keep g = 1, o = 0; a model
                with no batch norm after an analog layer raises a ValueError)
``paired``      per-channel least squares against the nominal model's activations on the same
                images: ``g, o = argmin ||g y_chip + o - y_nominal||^2``
=============== ============================================================================

The solve is one jitted function of (variables, chip, calibration images); a chip batch
(:func:`pimjax.devices.sample_chips`) tunes all C chips at once and ``jax.vmap`` over single
chips works too. With the calibration set as a single batch the
solve is **one forward pass** (each layer's statistics are taken as the pass reaches it);
with ``batch_size`` smaller than the set it makes one pass per analog layer over the
batches (each stopped after its layer), accumulating exact streaming moments. The cost
(images, passes) comes back with every result (:class:`TuneCost`).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import os
import warnings
import zipfile
from pathlib import Path

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from pimjax import devices, files, introspect, perchip
from pimjax.devices import num_chips
from pimjax.introspect import CHIP_MODES, LayerInfo, analog_layers, chip_mode
from pimjax.layers import with_chip, with_tune

TUNE_VARIANTS = ("gain", "gain_offset", "channel", "bn", "paired")
NEEDS_STATS = ("gain", "gain_offset", "channel")
_TINY = 1e-12  # variances below this are treated as a dead channel: left untuned


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
    if y.shape[b_axis] != weight.shape[0]:
        # a converted layer (pimjax.analog) with several batch axes ([B, tokens, K]) computes
        # a chip batch on [C, B * tokens, K]: restore the image axis the weights mask
        y = y.reshape((*y.shape[:b_axis], weight.shape[0], -1, y.shape[-1]))
    if y_nom is not None and y_nom.shape != y.shape[b_axis:]:
        y_nom = y_nom.reshape(y.shape[b_axis:])
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


@functools.partial(jax.jit, static_argnames="model")
def _nominal_batch_moments(model, variables, x, weight):
    mvm = introspect.capture_mvm(model, with_chip(variables, None), x)
    return {k: _moments_axes(y, weight, None, False) for k, y in mvm.items()}


def check_calibrated(variables, where: str) -> None:
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
    check_calibrated(variables, "nominal_stats")
    xs, masks = _batches(images, batch_size)
    total = None
    for i in range(xs.shape[0]):
        m = _nominal_batch_moments(model, variables, xs[i], masks[i])
        total = m if total is None else jax.tree_util.tree_map(
            _combine, total, m, is_leaf=lambda t: isinstance(t, _Moments))
    return NominalStats(mean={k: v.mean for k, v in total.items()},
                        var={k: v.var for k, v in total.items()},
                        num_images=int(images.shape[0]))


class StatsFileError(ValueError):
    """A nominal-statistics file that is damaged, truncated or not written by :func:`save_stats`."""

    def __init__(self, path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"nominal stats file {path} is damaged or not written by save_stats "
                         f"({reason}): delete it and compute the stats again (nominal_stats, "
                         "save_stats)")


def save_stats(path: str | os.PathLike, stats: NominalStats) -> Path:
    """Write nominal statistics to an ``.npz`` file atomically (e.g. next to the checkpoint)."""
    arrays = {}
    for name in stats.mean:
        arrays[f"mean:{name}"] = np.asarray(stats.mean[name])
        arrays[f"var:{name}"] = np.asarray(stats.var[name])
    arrays["__meta__"] = np.frombuffer(
        json.dumps({"num_images": stats.num_images}).encode(), np.uint8)
    buf = io.BytesIO()  # written whole, then renamed into place: readers never see a torn file
    np.savez(buf, **arrays)
    return files.write_bytes(path, buf.getvalue())


# What reading a damaged .npz raises (a zip's CRC check catches flipped bits in the arrays).
_DAMAGED = (OSError, ValueError, KeyError, EOFError, NotImplementedError, zipfile.BadZipFile)


def load_stats(path: str | os.PathLike) -> NominalStats:
    """Read statistics written by :func:`save_stats`; :class:`StatsFileError` if the file is
    damaged, truncated or holds something else (FileNotFoundError if it is missing)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no nominal stats file {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["__meta__"]).decode())
            mean = {k[5:]: np.asarray(z[k]) for k in z.files if k.startswith("mean:")}
            var = {k[4:]: np.asarray(z[k]) for k in z.files if k.startswith("var:")}
    except _DAMAGED as e:
        raise StatsFileError(path, f"{type(e).__name__}: {e}") from e
    num = meta.get("num_images") if isinstance(meta, dict) else None
    if type(num) is not int or num < 1:
        raise StatsFileError(path, f"its image count is {num!r}, not a positive integer")
    if not mean or sorted(mean) != sorted(var):
        raise StatsFileError(path, f"it holds means of {sorted(mean)} and variances of "
                                   f"{sorted(var)}: one of each per layer needed")
    for name in mean:
        m, v = mean[name], var[name]
        if (m.ndim != 1 or m.shape != v.shape or not np.issubdtype(m.dtype, np.floating)
                or not np.issubdtype(v.dtype, np.floating)):
            raise StatsFileError(path, f"layer {name!r} has {m.dtype} {m.shape} means and "
                                       f"{v.dtype} {v.shape} variances, not two float vectors")
        if not (np.all(np.isfinite(m)) and np.all(np.isfinite(v)) and np.all(v >= 0)):
            raise StatsFileError(path, f"layer {name!r} has non-finite means or variances, or "
                                       "negative variances")
    return NominalStats(mean={k: jnp.asarray(x) for k, x in mean.items()},
                        var={k: jnp.asarray(x) for k, x in var.items()}, num_images=num)


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
    """Raise ValueError unless ``images`` is a non-empty, finite float batch of the model's
    input shape."""
    shape = introspect.input_shape(model)
    if images.ndim != 4 or tuple(images.shape[1:]) != shape:
        raise ValueError(f"{what} must be [n, {', '.join(map(str, shape))}] for "
                         f"{type(model).__name__}, got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError(f"{what} are empty: pass at least one image")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"{what} must be float (normalized, see pimjax.data.normalize), "
                         f"got {images.dtype}")
    if not bool(jnp.all(jnp.isfinite(images))):
        raise ValueError(f"{what} contain NaN or infinite values: check the data (normalized "
                         "images are finite)")


# ---------------------------------------------------------------------------------- solve


@dataclasses.dataclass(frozen=True)
class TuneCost:
    """What one chip's self-tuning costs: calibration images and forward passes over them.

    ``passes`` are the chip's passes over the calibration set (with ``batch_size`` below the
    set size, one per analog layer, each stopped after its layer); ``nominal_passes`` are
    the nominal model's (``paired`` only), shared by every chip of a call.
    """

    variant: str
    images: int
    batches: int
    passes: int
    nominal_passes: int
    labels_used: bool = False

    def __str__(self) -> str:
        nominal = f" + {self.nominal_passes} nominal (shared)" if self.nominal_passes else ""
        return (f"{self.variant}: {self.images} unlabeled images in {self.batches} batch(es), "
                f"{self.passes} pass(es) per chip{nominal}")


def tune_cost(model, variant: str, num_images: int, batch_size: int | None = None) -> TuneCost:
    """The cost of :func:`self_tune` with these settings."""
    check_variant(variant)
    nb = 1 if batch_size is None else -(-num_images // min(int(batch_size), num_images))
    passes = 1 if nb == 1 else len(analog_layers(model))
    return TuneCost(variant, int(num_images), nb, passes, passes if variant == "paired" else 0)


@flax.struct.dataclass
class TuneResult:
    """The solved ``"tune"`` collection (leaves ``[F]``, ``[C, F]`` for a chip batch), its cost."""

    tune: dict
    cost: TuneCost = flax.struct.field(pytree_node=False)


def check_variant(variant) -> None:
    """Raise ValueError unless ``variant`` is one of :data:`TUNE_VARIANTS`."""
    if variant not in TUNE_VARIANTS:
        raise ValueError(f"tune={variant!r} is unknown: use one of {TUNE_VARIANTS}")


def _solve_layer(variant, layer: LayerInfo, m: _Moments, target, batch_stats, params):
    """Gain and offset ``[C, F]`` of one layer from the chip's moments ``m`` (``[C, F]``)."""
    var_c, mean_c = m.var, m.mean
    ok = var_c > _TINY
    if variant in ("gain", "gain_offset"):
        t_mean, t_var = target
        layer_mean_c = jnp.mean(mean_c, -1, keepdims=True)
        layer_var_c = jnp.mean(var_c, -1, keepdims=True) + jnp.mean(
            (mean_c - layer_mean_c) ** 2, -1, keepdims=True)
        layer_mean_t = jnp.mean(t_mean)
        layer_var_t = jnp.mean(t_var) + jnp.mean((t_mean - layer_mean_t) ** 2)
        lok = layer_var_c > _TINY
        g = jnp.where(lok, jnp.sqrt(layer_var_t / jnp.where(lok, layer_var_c, 1.0)), 1.0)
        g = jnp.broadcast_to(g, mean_c.shape)
        o = layer_mean_t - g * layer_mean_c if variant == "gain_offset" else jnp.zeros_like(g)
        o = jnp.where(lok, jnp.broadcast_to(o, mean_c.shape), 0.0)
        return g, o
    if variant == "channel":
        t_mean, t_var = target
        g = jnp.where(ok, jnp.sqrt(t_var / jnp.where(ok, var_c, 1.0)), 1.0)
        return g, jnp.where(ok, t_mean - g * mean_c, 0.0)
    if variant == "paired":
        g = jnp.where(ok, m.cov / jnp.where(ok, var_c, 1.0), 1.0)
        return g, jnp.where(ok, m.nmean - g * mean_c, 0.0)
    # bn: z = mvm + bias feeds the batch norm; give it the chip's own mean/var of z.
    if layer.bn_path is None:
        return jnp.ones_like(mean_c), jnp.zeros_like(mean_c)
    bn = _get(batch_stats, layer.bn_path)
    bias = _get(params, layer.path)["bias"].reshape(-1) if layer.bias else 0.0
    g = jnp.sqrt((bn["var"] + layer.bn_epsilon) / (var_c + layer.bn_epsilon))
    # (z - mean_z) * g + mu_bn = g * mvm + o + bias with mean_z = mean_c + bias
    return g, bn["mean"] - bias - g * mean_c


def solve_chips(model, variant, batch_size, variables, chip, images, stats, mode="layers",
                reads=None):
    """Tune one chip or a chip batch; a batch with ``mode="map"`` tunes chip after chip.

    ``reads``: the per-read keys of the calibration images (``[n]``, or ``[C, n]`` for a chip
    batch) when the chip's device draws read noise, else None. The nominal activations of
    ``paired`` are computed once for all chips, except with several calibration batches, where
    the solve runs on the chip axis (``layers``) instead.
    """
    one_batch = batch_size is None or batch_size >= images.shape[0]
    if mode == "map" and num_chips(chip) is not None and (one_batch or variant != "paired"):
        nominal = None
        if variant == "paired" and one_batch:
            nominal = introspect.capture_mvm(model, with_chip(variables, None), images)
        return perchip.chip_map(lambda a: _solve(model, variant, batch_size, variables, a[0],
                                                 images, stats, nominal, a[1]), (chip, reads))
    return _solve(model, variant, batch_size, variables, chip, images, stats, reads=reads)


def _batched_reads(reads, nb: int, bs: int):
    """Read keys ``[..., n]`` split like :func:`_batches`: ``[nb, ..., bs]`` (padding reuses
    the last key: padded images are masked out)."""
    n = reads.shape[-1]
    if nb * bs > n:
        pad = jnp.broadcast_to(reads[..., -1:], (*reads.shape[:-1], nb * bs - n))
        reads = jnp.concatenate([reads, pad], axis=-1)
    reads = reads.reshape((*reads.shape[:-1], nb, bs))
    return jnp.moveaxis(reads, -2, 0)


def _solve(model, variant, batch_size, variables, chip, images, stats, nominal=None,
           reads=None):
    """The layer-by-layer solve: the tune tree with ``[F]`` leaves, ``[C, F]`` for a chip batch."""
    layers = analog_layers(model)
    count = num_chips(chip)
    lead = () if count is None else (count,)
    untuned = with_tune(variables, identity_tune(model))
    nominal_vars = with_chip(variables, None)
    xs, masks = _batches(images, batch_size)
    if reads is not None:
        reads = _batched_reads(reads, xs.shape[0], xs.shape[1])

    def chip_vars(keys):
        """The untuned variables with the chip, reading with ``keys`` (None: no read noise)."""
        return with_chip(untuned, chip if keys is None else devices.with_read_keys(chip, keys))

    by_path = {layer.path: layer for layer in layers}
    solved: dict = {}

    def target(layer):
        if variant in NEEDS_STATS:
            return stats.mean[layer.name], stats.var[layer.name]
        return None

    # A chip batch's statistics and solve run chip by chip (perchip.chip_map): each chip's
    # reductions then have the same shapes, so the same bits, for any number of chips.
    def moments(y, w, y_nom):
        if count is None:
            return _moments_axes(y, w, y_nom, False)

        def one(y_chip):
            m = _moments_axes(y_chip, w, y_nom, False)
            return m.replace(n=m.n[None])  # stacked [C, 1]: broadcasts against [C, F]

        return perchip.chip_map(one, y)

    def combine(a, b):
        return _combine(a, b) if count is None else perchip.chip_map(
            lambda ab: _combine(*ab), (a, b))

    def solve(layer, m):
        def one(m):
            return _solve_layer(variant, layer, m, target(layer), variables.get("batch_stats"),
                                variables["params"])

        g, o = one(m) if count is None else perchip.chip_map(one, m)
        solved[layer.path] = (jnp.broadcast_to(g, (*lead, layer.features)),
                              jnp.broadcast_to(o, (*lead, layer.features)))

    def apply_known(path, y):
        g, o = solved[path]
        return y * perchip.broadcast_per_chip(g, y) + perchip.broadcast_per_chip(o, y)

    if xs.shape[0] == 1:  # one batch: solve every layer as the single pass reaches it
        x, w = xs[0], masks[0]
        nom = {}
        if variant == "paired":
            nom = nominal if nominal is not None else introspect.capture_mvm(
                model, nominal_vars, x)

        def online(path, y):
            layer = by_path[path]
            solve(layer, moments(y, w, nom.get(layer.name)))
            return apply_known(path, y)

        introspect.apply_with_mvm(model, chip_vars(None if reads is None else reads[0]), x,
                                  online)
    else:  # one pass per layer over all batches, each stopped at its layer
        rest = None if reads is None else reads[1:]
        for layer in layers:
            def body(acc, batch, layer=layer):
                x, w, r = batch
                y = introspect.run_to_layer(model, chip_vars(r), x, layer.path, apply_known)
                y_nom = None
                if variant == "paired":
                    y_nom = introspect.run_to_layer(model, nominal_vars, x, layer.path)
                m = moments(y, w, y_nom)
                return (m if acc is None else combine(acc, m)), None

            first = body(None, (xs[0], masks[0], None if reads is None else reads[0]))[0]
            m, _ = jax.lax.scan(body, first, (xs[1:], masks[1:], rest))
            solve(layer, m)
    flat = {}
    for layer in layers:
        g, o = solved[layer.path]
        flat[(*layer.path, "gain")] = g
        flat[(*layer.path, "offset")] = o
    return _nest(flat)


_solve_jit = jax.jit(solve_chips, static_argnames=("model", "variant", "batch_size", "mode"))


def check_tuning_args(model, variant, images, stats, batch_size) -> None:
    """Validate self-tuning arguments before any work (ValueError naming the bad field)."""
    check_variant(variant)
    if variant == "bn" and all(layer.bn_path is None for layer in analog_layers(model)):
        user = getattr(model, "model", model)  # a converted model's own module
        raise ValueError(f"tune='bn' cannot apply to {type(user).__name__}: no batch norm reads "
                         "an analog layer's output (e.g. LayerNorm only): use 'channel' or "
                         "'paired'")
    check_images(model, images, "calibration images")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer or None")
    if variant in NEEDS_STATS:
        if stats is None:
            raise ValueError(f"tune={variant!r} needs the nominal stats: pass "
                             "stats=nominal_stats(model, variables, images)")
        check_stats(model, stats)


def calibration_reads(chip, key, num_images: int):
    """The read keys of ``num_images`` calibration images on ``chip`` (None if its device
    draws no read noise).

    ``key`` is the chip's key (one chip) or the key the chip batch was sampled from (chip
    ``c`` reads with ``fold_in(key, c)``, see :func:`pimjax.devices.chip_keys`); the keys are
    :func:`pimjax.devices.read_keys` of stream ``TUNE_READS``, the ones
    :func:`pimjax.montecarlo.tune_chips` uses for the same chips.
    """
    if not devices.chip_device(chip).needs_key:
        return None
    if key is None:
        raise ValueError("the chip's device draws read noise (output noise) at every read: pass "
                         "key= (the chip's key, or the key its chip batch was sampled from)")
    count = num_chips(chip)
    ids = jnp.arange(num_images, dtype=jnp.uint32)
    chips = devices.chip_keys(key, count) if count is not None else jnp.asarray(key)[None]
    reads = devices.read_keys(chips, ids, devices.TUNE_READS)
    return reads if count is not None else reads[0]


def self_tune(model, variables, chip, images, variant: str = "channel",
              stats: NominalStats | None = None, batch_size: int | None = None,
              mode: str | None = None, key=None) -> TuneResult:
    """Solve one chip's (or a chip batch's) digital gains/offsets, label-free, layer by layer.

    ``chip`` is one chip or a chip batch (:mod:`pimjax.devices`); ``images`` are normalized
    calibration images ``[n, H, W, C]``; ``stats`` are the nominal statistics
    (:func:`nominal_stats`), needed by ``gain``, ``gain_offset`` and ``channel``. ``key``: for
    a device that draws per-read noise, the chip's key (a chip batch: the key it was sampled
    from), from which every calibration image gets its read key (:func:`calibration_reads`).
    Returns the ``"tune"`` collection (apply with :func:`pimjax.layers.with_tune`) and the
    cost. Traceable: ``jax.vmap`` over single chips works (a chip batch is faster). ``mode``
    (chip batches): ``"layers"`` or ``"map"``, default :func:`pimjax.introspect.chip_mode`.
    """
    images = jnp.asarray(images)
    check_tuning_args(model, variant, images, stats, batch_size)
    num_chips(chip)  # raises unless chip is a chip
    if mode is not None and mode not in CHIP_MODES:
        raise ValueError(f"mode={mode!r} is unknown: use one of {CHIP_MODES}")
    if devices.stored_read_keys(chip) is not None:
        raise ValueError("the chip carries read keys (with_read_keys): pass the chip without "
                         "them and key=, which gives every calibration image its own read key")
    reads = calibration_reads(chip, key, images.shape[0])
    stats_arg = stats if variant in NEEDS_STATS else None
    if isinstance(batch_size, int) and batch_size >= images.shape[0]:
        batch_size = None
    tune = _solve_jit(model, variant, batch_size, variables, chip, images, stats_arg,
                      mode or chip_mode(model), reads)
    return TuneResult(tune, tune_cost(model, variant, images.shape[0], batch_size))


@dataclasses.dataclass(frozen=True, eq=False)
class SelfTune:
    """A self-tuning recipe for :func:`pimjax.montecarlo.evaluate_chips`: variant, images,
    stats and calibration batch size."""

    variant: str
    images: jax.Array
    stats: NominalStats | None = None
    batch_size: int | None = None

    def check(self, model) -> None:
        """Raise ValueError if this recipe does not fit ``model``."""
        check_tuning_args(model, self.variant, jnp.asarray(self.images), self.stats,
                          self.batch_size)

    @property
    def batch(self) -> int | None:
        """The calibration batch size in effect: None when the set is one batch."""
        n = int(self.images.shape[0])
        return None if self.batch_size is None or self.batch_size >= n else int(self.batch_size)

    @property
    def uses_stats(self) -> bool:
        """Whether the variant needs the nominal statistics."""
        return self.variant in NEEDS_STATS

    def cost(self, model) -> TuneCost:
        """Calibration cost per chip."""
        return tune_cost(model, self.variant, int(self.images.shape[0]), self.batch)
