"""Monte-Carlo evaluation of many simulated chips: per-chip accuracy and loss, chunked and sharded.

:func:`evaluate_chips` draws ``N`` chips of a device (chip ``i`` from ``fold_in(key, i)``, see
:func:`pimjax.devices.chip_keys`), optionally self-tunes each one
(:class:`pimjax.selftune.SelfTune`), and evaluates all of them on a dataset. Chips are
processed in chunks of ``chips x images`` sized to a memory budget (overridable); each chip
chunk is sharded over the devices on a ``"chips"`` mesh axis and computed as a *chip
batch* (:mod:`pimjax.perchip`): one forward pass for all chips of a device, not a vmap of
grouped convs.

Determinism: chip ``i`` depends only on its key and every chip is computed by the
same per-chip operations whatever the chunk, so its logits are bit-identical for any chips
per chunk and any device count. Its reductions (loss sum, self-tuning statistics and solve)
and, in the CPU's default ``"map"`` mode, its whole network after the first analog layer
run chip by chip in one compiled loop body (:func:`pimjax.perchip.chip_map`), so its accuracy, loss
and tune are the same bits too for any chips per chunk and any device or process count
(tested with gain and channel tuning and between-chip variation). Exceptions seen: XLA
compiles a one-device program apart from a sharded one, and in a 16-chip x 500-image LeNet-5
sweep 2 of 64 tuned chips differed between one device and several (any number of those
agreed); ``paired`` tuning (nominal activations shared by the chips, outside the loop)
moved by an ulp with one chip per device. Image chunks are at least
``MIN_IMAGES_PER_CHUNK`` images (padded and masked), because XLA's CPU GEMM rounds
differently for fewer rows; above that the logits are bit-identical too (tested). Correct
counts are exact; per-chip losses are float32 sums per image chunk added in float64: the
same bits for the same images per chunk, float tolerance (~1e-7 relative) across image
chunk sizes.

Several processes: in a multi-process run (:mod:`pimjax.distributed`) the default mesh spans
every device of every process, each process computes its devices' chips, and every process
gets all per-chip results (the same bits as one process with as many devices in total);
only process 0 shows progress.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from pimjax import data as pdata
from pimjax import devices, introspect, selftune
from pimjax.distributed import is_primary, make_mesh, replicate, shard_rows, to_host
from pimjax.introspect import CHIP_MODES, analog_kernels, chip_mode
from pimjax.layers import with_chip, with_tune
from pimjax.perchip import chip_map
from pimjax.progress import progress_bar

AXIS = "chips"
CPU_BUDGET_BYTES = 1 << 30  # default per-device budget on CPU
ACCEL_BUDGET_FRACTION = 0.5  # default on GPU/TPU: this share of the device memory
MAX_IMAGES_PER_CHUNK = 1000  # images per chunk when the budget leaves the choice open
# XLA's CPU backend runs GEMMs of fewer rows with other kernels (other rounding): chunks of
# at least this many images (padded if need be) keep every image's result bit-identical.
MIN_IMAGES_PER_CHUNK = 64
_ACTIVATION_COPIES = 4  # live copies of the largest activation per chip-image (measured)


# ------------------------------------------------------------------------------ validation


def check_variables(model, variables) -> None:
    """Raise ValueError unless ``variables`` have exactly the structure ``model.init`` makes."""
    if not isinstance(variables, dict) or "params" not in variables:
        raise ValueError("variables must be a dict with a 'params' collection (from model.init)")
    expected = introspect.abstract_variables(model)
    for col in ("params", "batch_stats", "tune"):
        want = expected.get(col, {})
        have = variables.get(col, {})
        flat_w = {jax.tree_util.keystr(p): v.shape
                  for p, v in jax.tree_util.tree_flatten_with_path(want)[0]}
        flat_h = {jax.tree_util.keystr(p): np.shape(v)
                  for p, v in jax.tree_util.tree_flatten_with_path(have)[0]}
        missing = sorted(set(flat_w) - set(flat_h))
        extra = sorted(set(flat_h) - set(flat_w))
        wrong = sorted(k for k in set(flat_w) & set(flat_h) if tuple(flat_w[k]) != flat_h[k])
        if missing or extra or wrong:
            detail = "; ".join(
                s for s in (
                    f"missing {missing[:3]}" if missing else "",
                    f"unexpected {extra[:3]}" if extra else "",
                    f"shape of {wrong[0]} is {flat_h[wrong[0]]}, the model needs "
                    f"{tuple(flat_w[wrong[0]])}" if wrong else "",
                ) if s)
            raise ValueError(
                f"variables do not match the model ({type(model).__name__}): in '{col}': "
                f"{detail}. Was the checkpoint saved from another model/width/quant config?")


def check_num_chips(num_chips) -> int:
    """``num_chips`` as an int, or ValueError unless it is a positive integer."""
    if isinstance(num_chips, bool) or not isinstance(num_chips, (int, np.integer)) \
            or num_chips <= 0:
        raise ValueError(f"num_chips={num_chips!r} must be a positive integer")
    return int(num_chips)


def dataset_arrays(model, dataset):
    """Normalized float images and int labels from a :class:`pimjax.data.Dataset` or a pair.

    A pair ``(images, labels)`` must already be float (normalized).
    """
    if isinstance(dataset, pdata.Dataset):
        if len(dataset) == 0:
            raise ValueError("the dataset is empty: pass at least one image")
        images = pdata.normalize(dataset.images, dataset.name)
        labels = np.asarray(dataset.labels)
    else:
        try:
            images, labels = dataset
        except (TypeError, ValueError):
            raise ValueError("dataset must be a pimjax.data.Dataset or a pair (images, labels)") \
                from None
        images, labels = jnp.asarray(images), np.asarray(labels)
    if images.shape[0] == 0:
        raise ValueError("the dataset is empty: pass at least one image")
    selftune.check_images(model, images, "dataset images")
    if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers [{images.shape[0]}], got {labels.dtype} "
                         f"{labels.shape}")
    num_classes = getattr(model, "num_classes", None)
    if num_classes is not None and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}) for this model, got "
                         f"[{labels.min()}, {labels.max()}]")
    return images.astype(jnp.float32), labels.astype(np.int32)


# -------------------------------------------------------------------------------- chunking


@dataclasses.dataclass(frozen=True)
class ChunkPlan:
    """How a sweep is split: chips and images per chunk, and the memory estimate behind it."""

    chips: int  # per chunk, all devices together (a multiple of the device count)
    images: int  # per chunk
    num_chip_chunks: int
    num_image_chunks: int
    num_devices: int
    mode: str  # how a chip batch is computed (see chip_logits)
    bytes_per_chip_image: int
    bytes_per_chip: int
    bytes_per_image: int  # chip-independent working set per image ("map": one chip's)
    budget_bytes: int  # per device

    @property
    def estimated_bytes(self) -> int:
        """Estimated peak bytes per device of one chunk."""
        per_dev = self.chips // self.num_devices
        return (per_dev * (self.bytes_per_chip + self.images * self.bytes_per_chip_image)
                + self.images * self.bytes_per_image)


def default_budget(device=None) -> int:
    """Default per-device memory budget: 1 GiB on CPU, half the memory of an accelerator."""
    device = device or jax.local_devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"] * ACCEL_BUDGET_FRACTION)
    return CPU_BUDGET_BYTES


@functools.lru_cache(maxsize=32)
def memory_per_chip(model, device: devices.Device, mode: str | None = None
                    ) -> tuple[int, int, int]:
    """Estimated bytes ``(per chip-image, per chip, per image)`` of a chip-batch forward.

    ``layers`` keeps a few live copies of the largest activation per chip-image; ``map``
    keeps the first analog layer's output (and its chip-major copy) per chip-image and one
    chip's working set per image. Per chip: the chip's state (its size from ``eval_shape`` of
    the device's sampler) and two copies of the effective weights. A device with a periphery
    also keeps the largest layer's crossbar inputs (a conv's im2col patches: output positions
    x kernel rows) per chip-image.
    """
    mode = mode or chip_mode(model)
    template = analog_kernels(introspect.abstract_variables(model))
    chip = jax.eval_shape(lambda k: devices.sample_chip(k, device, template),
                          jax.random.PRNGKey(0))
    state = sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree_util.tree_leaves(chip))
    weights = sum(math.prod(a.shape) for a in jax.tree_util.tree_leaves(template))
    per_chip = state + 2 * 4 * weights
    largest = max(introspect.activation_sizes(model))
    working = 4 * (_ACTIVATION_COPIES * largest + math.prod(introspect.input_shape(model)))
    if device.periphery is not None:
        kernels = {"/".join(getattr(p, "key", str(p)) for p in path[:-1]): leaf.shape
                   for path, leaf in jax.tree_util.tree_flatten_with_path(template)[0]}
        working += 4 * max(layer.out_size // layer.features * math.prod(kernels[layer.name][:-1])
                           for layer in introspect.analog_layers(model))
    if mode == "map":
        first = introspect.analog_layers(model)[0].out_size
        return int(2 * 4 * first), int(per_chip), int(working)
    return int(working), int(per_chip), 0


def sweep_mode(model, backend: str | None = None) -> str:
    """The sweeps' chip mode unless one is asked for: ``"map"`` on the CPU, else
    :func:`pimjax.introspect.chip_mode`.

    ``map`` runs each chip's network after its first analog layer as one compiled loop body
    (:func:`pimjax.perchip.chip_map`), the same for any number of chips per device. With
    ``layers`` XLA fuses a ``[C, ...]`` batch's elementwise ops differently for another
    ``C``, so it contracts other multiply-adds into FMAs: a tuned chip's loss moved by an ulp
    with the device count. On the CPU ``map`` was no slower for LeNet-5, the one model
    ``chip_mode`` gives ``layers`` (100 chips x 1000 images: 28.3-31.4k against 26.6-27.8k
    chip-images/s, 2 cores); on a GPU or TPU a loop over chips was not measured, so the
    faster rule stays there.
    """
    if (backend or jax.default_backend()) == "cpu":
        return "map"
    return chip_mode(model)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _balanced(total: int, most: int, multiple: int = 1) -> tuple[int, int]:
    """Split ``total`` into equal chunks of at most ``most`` (rounded to ``multiple``)."""
    most = max(multiple, most // multiple * multiple)
    chunks = -(-total // most)
    size = _round_up(-(-total // chunks), multiple)
    return size, -(-total // size)


def plan_chunks(model, num_chips: int, num_images: int, *,
                device: devices.Device | None = None, num_devices: int = 1,
                budget_bytes: int | None = None, chips_per_chunk: int | None = None,
                images_per_chunk: int | None = None, calib_images: int = 0,
                mode: str | None = None) -> ChunkPlan:
    """Choose chips x images per chunk so one chunk fits ``budget_bytes`` per device.

    ``device`` (default: the paper's) sizes the chip state; ``calib_images`` (self-tuning's
    calibration batch) must fit beside the chips too.
    Explicit ``chips_per_chunk``/``images_per_chunk`` override the choice (chips are rounded
    up to a multiple of the device count).
    """
    num_chips = check_num_chips(num_chips)
    if num_images <= 0:
        raise ValueError("the dataset is empty: pass at least one image")
    for name, value in (("chips_per_chunk", chips_per_chunk),
                        ("images_per_chunk", images_per_chunk), ("budget_bytes", budget_bytes)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value <= 0):
            raise ValueError(f"{name}={value!r} must be a positive integer or None")
    if mode is not None and mode not in CHIP_MODES:
        raise ValueError(f"mode={mode!r} is unknown: use one of {CHIP_MODES}")
    mode = mode or sweep_mode(model)
    budget = budget_bytes or default_budget()
    per_ci, per_c, per_i = memory_per_chip(model, device or devices.paper(0.1), mode)
    if images_per_chunk is None:
        fit = (budget - per_c) // (per_ci + per_i)  # images that fit beside one chip per device
        images_per_chunk = int(max(1, min(num_images, MAX_IMAGES_PER_CHUNK, fit)))
    images, n_img = _balanced(num_images, min(images_per_chunk, num_images))
    if images < MIN_IMAGES_PER_CHUNK:  # padded with masked images if need be
        images = MIN_IMAGES_PER_CHUNK
        n_img = -(-num_images // images)
    if chips_per_chunk is None:
        most = max(images, calib_images)
        per_chip = per_c + most * per_ci
        chips_per_chunk = max(1, (budget - most * per_i) // per_chip) * num_devices
    chips, n_chip = _balanced(num_chips, min(chips_per_chunk, _round_up(num_chips, num_devices)),
                              num_devices)
    return ChunkPlan(chips, images, n_chip, n_img, num_devices, mode, per_ci, per_c, per_i, budget)


# --------------------------------------------------------------------------- compiled steps


def _chip_vars(variables, chip, tune):
    v = with_chip(variables, chip)
    return v if tune is None else with_tune(v, tune)


def chip_logits(model, variables, chip, x, tune=None, mode: str | None = None):
    """Logits ``[C, B, classes]`` of a chip batch on ``x [B, ...]`` (tune: ``[C, F]`` leaves).

    ``mode="layers"``: every layer carries the chip axis (:mod:`pimjax.perchip`).
    ``mode="map"``: the first analog layer runs for all chips at once (its input is shared),
    the rest of the network one chip after another in a ``lax.map``. Default:
    :func:`pimjax.introspect.chip_mode`. Both give bit-identical logits.
    """
    mode = mode or chip_mode(model)
    if mode not in CHIP_MODES:
        raise ValueError(f"mode={mode!r} is unknown: use one of {CHIP_MODES}")
    if mode == "layers":
        return model.apply(_chip_vars(variables, chip, tune), x)
    first = introspect.analog_layers(model)[0].path
    y_first = introspect.layer_output(model, _chip_vars(variables, chip, tune), x, first)

    def one(args):
        c, t, y = args
        return introspect.apply_from_layer(model, _chip_vars(variables, c, t), x, first, y)

    return chip_map(one, (chip, tune, y_first))


def _metrics(logits, labels, mask, chip_mask=None):
    """Per-chip correct counts and loss sums ``[C]``; with ``chip_mask`` also the number of
    (unmasked) chips that got each image right, ``[1, B]``.

    Chip by chip (:func:`pimjax.perchip.chip_map`): each chip's loss sum is a reduction of
    the same shape ``[B]`` whatever the number of chips on the device, so the same bits."""
    def one(chip_logits):
        logp = jax.nn.log_softmax(chip_logits, axis=-1)
        nll = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
        right = (jnp.argmax(chip_logits, axis=-1) == labels) & (mask > 0)
        return jnp.sum(right, dtype=jnp.int32), jnp.sum(nll * mask), right

    count, loss, correct = chip_map(one, logits)
    out = (count, loss)
    if chip_mask is None:
        return out
    per_image = jnp.sum(correct & chip_mask[:, None], axis=0, dtype=jnp.int32)
    return (*out, per_image[None])


def _shard(fn, mesh, in_specs, out_specs):
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                                 check_vma=False))


@functools.lru_cache(maxsize=64)
def _sample_step(mesh: Mesh, device: devices.Device):
    """Jitted, chip-sharded sampling of chips (at read time ``t``) from their keys."""
    def sample(keys, template, t):
        chips = jax.vmap(lambda k: devices.sample_chip(k, device, template))(keys)
        return devices.at_time(chips, t)

    return _shard(sample, mesh, (P(AXIS), P(), P()), P(AXIS))


def _with_reads(chip, keys, first_image, num_images):
    """The chip batch with the evaluation read keys of images ``first_image ..`` if its device
    needs them."""
    if not devices.chip_device(chip).needs_key:
        return chip
    ids = first_image + jnp.arange(num_images, dtype=jnp.uint32)
    return devices.with_read_keys(chip, devices.read_keys(keys, ids, devices.EVAL_READS))


@functools.lru_cache(maxsize=32)
def _tune_step(model, mesh: Mesh, variant: str, batch_size):
    """Jitted, chip-sharded self-tuning of a chip batch, one chip after another.

    The solve runs chip by chip (``mode="map"``, a :func:`pimjax.perchip.chip_map` of the
    one-chip solve) whatever the sweep's chip mode, so that a chip's forward pass, statistics
    and solve are one compiled loop body, the same for any number of chips per device. With
    the chip axis through every layer (``"layers"``) XLA fuses the elementwise ops of a
    ``[C, ...]`` batch differently for another ``C``, so it contracts other multiply-adds into
    FMAs, and a tuned chip's gains moved by an ulp with the chips per device (at no measured
    cost to LeNet-5's sweep: tuning is one pass over the calibration images).
    """
    def tune(variables, chip, keys, images, stats):
        reads = None
        if devices.chip_device(chip).needs_key:  # chip c's calibration reads (TUNE_READS)
            ids = jnp.arange(images.shape[0], dtype=jnp.uint32)
            reads = devices.read_keys(keys, ids, devices.TUNE_READS)
        return selftune.solve_chips(model, variant, batch_size, variables, chip, images,
                                    stats, "map", reads)

    return _shard(tune, mesh, (P(), P(AXIS), P(AXIS), P(), P()), P(AXIS))


@functools.lru_cache(maxsize=32)
def _metrics_step(model, mesh: Mesh, mode: str):
    """Jitted, chip-sharded per-chip correct counts and loss sums on one image chunk."""
    def metrics(variables, chip, keys, valid, tune, xs, ys, ms, j):
        x, y, m = (jax.lax.dynamic_index_in_dim(a, j, keepdims=False) for a in (xs, ys, ms))
        chip = _with_reads(chip, keys, (j * x.shape[0]).astype(jnp.uint32), x.shape[0])
        return _metrics(chip_logits(model, variables, chip, x, tune, mode), y, m, valid)

    chips, rep = P(AXIS), P()
    return _shard(metrics, mesh, (rep, chips, chips, chips, chips, rep, rep, rep, rep),
                  (chips, chips, chips))


@functools.lru_cache(maxsize=32)
def _nominal_fn(model):
    @jax.jit
    def fn(variables, x, y, m):
        c, loss = _metrics(model.apply(variables, x)[None], y, m)
        return c[0], loss[0]

    return fn


# ---------------------------------------------------------------------------------- results


@dataclasses.dataclass(frozen=True, eq=False)
class ChipResults:
    """Per-chip accuracy and mean cross-entropy ``[N]`` of one sweep, with its settings."""

    accuracy: np.ndarray
    loss: np.ndarray
    num_images: int
    nominal_accuracy: float | None
    nominal_loss: float | None
    device: devices.Device
    plan: ChunkPlan
    tune_cost: selftune.TuneCost | None
    seconds: float
    image_accuracy: np.ndarray | None = None  # [M]: the share of chips right on each image
    nominal_tuned_accuracy: float | None = None  # the nominal model after the same tuning

    @property
    def chip_images_per_second(self) -> float:
        """Throughput of the sweep (chip-images evaluated per second, compile included)."""
        return len(self.accuracy) * self.num_images / max(self.seconds, 1e-9)

    @property
    def standard_error(self) -> float:
        """Standard error of the mean accuracy as an estimate over chips *and* test images.

        ``sqrt(Var_chips(acc) / N + Var_images(p) / M)``, the variance of a two-way (chips x
        images) sample mean, where ``p`` is each image's share of chips that got it right.
        """
        return paired_standard_error(self.accuracy, self.image_accuracy)

    def summary(self, thresholds=(), drops=(0.01, 0.05)) -> dict:
        """See :func:`summarize`; adds ``se`` and the drop against the tuned nominal model."""
        out = summarize(self.accuracy, self.nominal_accuracy, thresholds, drops,
                        loss=self.loss, nominal_loss=self.nominal_loss)
        if self.image_accuracy is not None:
            out["se"] = self.standard_error
        if self.nominal_tuned_accuracy is not None:
            out["nominal_tuned"] = float(self.nominal_tuned_accuracy)
            out["drop_mean_tuned"] = float(self.nominal_tuned_accuracy - out["mean"])
        return out


def paired_standard_error(chip_values, image_values=None) -> float:
    """``sqrt(Var(chip_values) / N + Var(image_values) / M)`` (sample variances).

    The standard error of a mean over N chips x M images; for the difference of two sweeps
    on the same chips and images pass the per-chip and per-image differences.
    """
    c = np.asarray(chip_values, np.float64)
    var = c.var(ddof=1) / c.size if c.size > 1 else 0.0
    if image_values is not None:
        m = np.asarray(image_values, np.float64)
        var += m.var(ddof=1) / m.size if m.size > 1 else 0.0
    return float(np.sqrt(var))


def paired_difference(a_chips, a_images, b_chips, b_images) -> tuple[float, float]:
    """Mean accuracy of sweep a minus sweep b and its standard error, for two sweeps of the
    same chips and test images (per-chip ``[N]`` and per-image ``[M]`` accuracies of each, or
    None for the images; a nominal model evaluated once has one chip, which pairs with every
    chip of the other)."""
    a_c, b_c = np.asarray(a_chips, np.float64), np.asarray(b_chips, np.float64)
    d = (a_c - b_c) if a_c.size == b_c.size else (a_c.mean() - b_c if a_c.size == 1
                                                   else a_c - b_c.mean())
    img = None
    if a_images is not None and b_images is not None:
        img = np.asarray(a_images, np.float64) - np.asarray(b_images, np.float64)
    return float(d.mean()), paired_standard_error(d, img)


def difference(a: ChipResults, b: ChipResults) -> tuple[float, float]:
    """Mean accuracy of ``a`` minus ``b`` and its standard error, for two sweeps of the same
    chips (key) and test images (e.g. two models, or a model before and after tuning)."""
    if a.accuracy.shape != b.accuracy.shape or a.num_images != b.num_images:
        raise ValueError("difference needs two sweeps of the same chips and images")
    return paired_difference(a.accuracy, a.image_accuracy, b.accuracy, b.image_accuracy)


def summarize(accuracy, nominal_accuracy=None, thresholds=(), drops=(0.01, 0.05), loss=None,
              nominal_loss=None) -> dict:
    """Mean, std, min, 5/50/95th percentiles and yields of per-chip accuracies.

    ``thresholds``: yield = share of chips with accuracy >= t. ``drops``: yield within ``d``
    of the nominal accuracy. With the nominal accuracy, ``drop_mean``/``drop_p5`` are the
    accuracy lost against it.
    """
    acc = np.asarray(accuracy, np.float64)
    if acc.size == 0:
        raise ValueError("accuracy is empty: no chips to summarize")
    out = {
        "chips": int(acc.size),
        "mean": float(acc.mean()),
        "std": float(acc.std(ddof=1)) if acc.size > 1 else 0.0,
        "min": float(acc.min()),
        "p5": float(np.percentile(acc, 5)),
        "p50": float(np.percentile(acc, 50)),
        "p95": float(np.percentile(acc, 95)),
    }
    for t in thresholds:
        out[f"yield@{t:g}"] = float(np.mean(acc >= t))
    if loss is not None:
        out["mean_loss"] = float(np.mean(loss))
    if nominal_accuracy is not None:
        out["nominal"] = float(nominal_accuracy)
        out["drop_mean"] = float(nominal_accuracy - out["mean"])
        out["drop_p5"] = float(nominal_accuracy - out["p5"])
        for d in drops:
            out[f"yield@nominal-{d:g}"] = float(np.mean(acc >= nominal_accuracy - d - 1e-12))
    if nominal_loss is not None:
        out["nominal_loss"] = float(nominal_loss)
    return out


# ------------------------------------------------------------------------------ evaluation


def _prepare_images(images, labels, per_chunk):
    n = images.shape[0]
    nb = -(-n // per_chunk)
    pad = nb * per_chunk - n
    xs = np.concatenate([np.asarray(images), np.zeros((pad, *images.shape[1:]), np.float32)])
    ys = np.concatenate([labels, np.zeros(pad, np.int32)])
    ms = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    return (xs.reshape(nb, per_chunk, *images.shape[1:]), ys.reshape(nb, per_chunk),
            ms.reshape(nb, per_chunk))


def _check_device(device) -> None:
    if not isinstance(device, devices.Device):
        raise ValueError(f"device must be a pimjax.devices.Device, got {type(device).__name__}: "
                         "build one with pimjax.devices.paper(...), pcm(...) or ideal()")


def _check_time(t) -> float:
    if isinstance(t, bool) or not isinstance(t, (int, float, np.number)) or not np.isfinite(t) \
            or t < 0:
        raise ValueError(f"t={t!r} must be a finite time >= 0 (seconds since programming)")
    return float(t)


def _tuning_inputs(model, tuning):
    """(variant, calibration batch size, images, stats) of a SelfTune recipe, checked."""
    if tuning is None:
        return None, None, None, None
    tuning.check(model)
    stats = tuning.stats if tuning.uses_stats else None
    return tuning.variant, tuning.batch, jnp.asarray(tuning.images, jnp.float32), stats


def evaluate_chips(model, variables, device: devices.Device, key, num_chips: int, dataset, *,
                   tuning: selftune.SelfTune | None = None, t: float = 0.0,
                   budget_bytes: int | None = None, chips_per_chunk: int | None = None,
                   images_per_chunk: int | None = None, mesh_devices=None, nominal: bool = True,
                   mode: str | None = None, progress: bool = True) -> ChipResults:
    """Per-chip accuracy and loss ``[N]`` of ``num_chips`` chips of ``device``, read at ``t``.

    ``dataset``: a :class:`pimjax.data.Dataset` or a pair (normalized float images, labels).
    ``tuning``: self-tune each chip on unlabeled calibration images first. The sweep is
    chunked to ``budget_bytes`` per device (or the given chunk sizes) and sharded over
    ``mesh_devices`` (default: all devices). ``nominal`` also evaluates the nominal model
    (no chip). ``mode``: how a chip batch is computed (see :func:`chip_logits`; default
    :func:`sweep_mode`, on the CPU one whose results do not depend on the chips per device).
    """
    num_chips = check_num_chips(num_chips)
    _check_device(device)
    t = _check_time(t)
    check_variables(model, variables)
    images, labels = dataset_arrays(model, dataset)
    variant, tune_batch, calib, stats = _tuning_inputs(model, tuning)
    selftune.check_calibrated(variables, "evaluate_chips")
    mesh = make_mesh(AXIS, mesh_devices)
    calib_batch = 0 if calib is None else (tune_batch or calib.shape[0])
    plan = plan_chunks(model, num_chips, images.shape[0], device=device,
                       num_devices=mesh.devices.size, budget_bytes=budget_bytes,
                       chips_per_chunk=chips_per_chunk, images_per_chunk=images_per_chunk,
                       calib_images=calib_batch, mode=mode)
    start = time.perf_counter()
    xs, ys, ms = _prepare_images(images, labels, plan.images)
    template = analog_kernels(variables)
    var_r, tmpl_r, xs_r, ys_r, ms_r = replicate((variables, template, xs, ys, ms), mesh)
    calib_r = stats_r = None  # the mesh's copies (the nominal tuning below uses the host's)
    if calib is not None:
        calib_r, stats_r = replicate((calib, stats), mesh)
    sample_fn = _sample_step(mesh, device)
    tune_fn = None if variant is None else _tune_step(model, mesh, variant, tune_batch)
    metrics_fn = _metrics_step(model, mesh, plan.mode)
    bar = progress_bar(plan.num_chip_chunks * (plan.num_image_chunks + (tune_fn is not None)),
                       "chips", progress and is_primary(mesh), unit="chunk")
    correct = np.zeros(plan.num_chip_chunks * plan.chips, np.int64)
    loss = np.zeros(plan.num_chip_chunks * plan.chips, np.float64)
    per_image = np.zeros(plan.num_image_chunks * plan.images, np.int64)
    for c in range(plan.num_chip_chunks):
        keys = shard_rows(devices.chip_keys(key, plan.chips, start=c * plan.chips), mesh)
        valid = shard_rows(c * plan.chips + np.arange(plan.chips) < num_chips, mesh)
        chip = sample_fn(keys, tmpl_r, np.float32(t))
        tune = None
        if tune_fn is not None:
            tune = tune_fn(var_r, chip, keys, calib_r, stats_r)
            bar.update(1)
        parts = []
        for j in range(plan.num_image_chunks):
            parts.append(metrics_fn(var_r, chip, keys, valid, tune, xs_r, ys_r, ms_r,
                                    np.int32(j)))
            bar.update(1)
        sl = slice(c * plan.chips, (c + 1) * plan.chips)
        for j, (cc, ll, pi) in enumerate(to_host(parts)):
            correct[sl] += cc
            loss[sl] += np.asarray(ll, np.float64)
            per_image[j * plan.images:(j + 1) * plan.images] += pi.sum(axis=0)
    bar.close()
    seconds = time.perf_counter() - start
    n = images.shape[0]
    nominal_acc = nominal_loss = nominal_tuned = None
    if nominal:
        nominal_acc, nominal_loss = _nominal_metrics(model, variables, xs, ys, ms, n)
        if tuning is not None:  # the same tuning solved on the ideal chip, in each process
            ideal = devices.sample_chip(key, devices.ideal(), template)
            tuned = selftune.self_tune(model, variables, ideal, calib, variant,
                                       stats, tune_batch, mode="layers").tune
            nominal_tuned = _nominal_metrics(model, with_tune(variables, tuned), xs, ys, ms,
                                             n)[0]
    cost = tuning.cost(model) if tuning is not None else None
    return ChipResults(correct[:num_chips] / n, loss[:num_chips] / n, n, nominal_acc,
                       nominal_loss, device, plan, cost, seconds, per_image[:n] / num_chips,
                       nominal_tuned)


def _nominal_metrics(model, variables, xs, ys, ms, n):
    """Accuracy and mean loss of the nominal model (no chip) on the chunked images."""
    fn = _nominal_fn(model)
    tot_c, tot_l = 0, 0.0
    for j in range(xs.shape[0]):
        cc, ll = fn(variables, xs[j], ys[j], ms[j])
        tot_c += int(cc)
        tot_l += float(ll)
    return tot_c / n, tot_l / n


def tune_chips(model, variables, device: devices.Device, key, num_chips: int,
               tuning: selftune.SelfTune, *, t: float = 0.0, budget_bytes: int | None = None,
               chips_per_chunk: int | None = None, mesh_devices=None, mode: str | None = None,
               progress: bool = False) -> selftune.TuneResult:
    """Self-tune chips ``0..N-1`` of ``key``: the stacked ``"tune"`` collection ``[N, F]`` and cost.

    The same chips as :func:`evaluate_chips` with the same key; chunked and sharded alike.
    """
    num_chips = check_num_chips(num_chips)
    _check_device(device)
    t = _check_time(t)
    check_variables(model, variables)
    variant, tune_batch, calib, stats = _tuning_inputs(model, tuning)
    if variant is None:
        raise ValueError("tuning must be a pimjax.selftune.SelfTune recipe")
    mesh = make_mesh(AXIS, mesh_devices)
    calib_batch = tune_batch or calib.shape[0]
    plan = plan_chunks(model, num_chips, calib_batch, device=device,
                       num_devices=mesh.devices.size, budget_bytes=budget_bytes,
                       chips_per_chunk=chips_per_chunk, calib_images=calib_batch, mode=mode)
    template = analog_kernels(variables)
    var_r, tmpl_r, calib, stats = replicate((variables, template, calib, stats), mesh)
    sample_fn = _sample_step(mesh, device)
    tune_fn = _tune_step(model, mesh, variant, tune_batch)
    bar = progress_bar(plan.num_chip_chunks, "tune", progress and is_primary(mesh), unit="chunk")
    outs = []
    for c in range(plan.num_chip_chunks):
        keys = shard_rows(devices.chip_keys(key, plan.chips, start=c * plan.chips), mesh)
        outs.append(tune_fn(var_r, sample_fn(keys, tmpl_r, np.float32(t)), keys, calib, stats))
        bar.update(1)
    bar.close()
    outs = to_host(outs)
    tune = jax.tree_util.tree_map(lambda *a: np.concatenate(a)[:num_chips], *outs)
    return selftune.TuneResult(tune, tuning.cost(model))


def evaluate_loop(model, variables, device: devices.Device, key, num_chips: int, dataset, *,
                  t: float = 0.0, batch_size: int = 1000) -> np.ndarray:
    """Reference: per-chip accuracy by a Python loop of single-chip jitted forwards (slow)."""
    num_chips = check_num_chips(num_chips)
    _check_device(device)
    images, labels = dataset_arrays(model, dataset)
    template = analog_kernels(variables)

    @jax.jit
    def correct(variables, k, x, y, first):
        chip = devices.at_time(devices.sample_chip(k, device, template), t)
        if device.needs_key:
            ids = first + jnp.arange(x.shape[0], dtype=jnp.uint32)
            chip = devices.with_read_keys(chip, devices.read_keys(k[None], ids,
                                                                  devices.EVAL_READS)[0])
        logits = model.apply(with_chip(variables, chip), x)
        return jnp.sum(jnp.argmax(logits, -1) == y)

    keys = devices.chip_keys(key, num_chips)
    out = np.zeros(num_chips)
    for i in range(num_chips):
        total = 0
        for s in range(0, images.shape[0], batch_size):
            sl = slice(s, s + batch_size)
            total += int(correct(variables, keys[i], images[sl], labels[sl], np.uint32(s)))
        out[i] = total / images.shape[0]
    return out
