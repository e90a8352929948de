"""One optax training loop for every method: fp, qat, vat, ptq and qavat.

* ``fp``    float model, no variation (sigma forced to 0).
* ``qat``   quantized model, no variation (variability-oblivious QAT).
* ``vat``   float model trained under weight-variation injection.
* ``qavat`` quantized model trained under variation (the paper's method): every step draws a
  fresh chip from ``fold_in(chip_key, step)`` and uses it for the forward and the backward pass.
* ``ptq``   no gradient step: the float parameters of a trained ``vat`` (or ``fp``) checkpoint
  are loaded into the quantized model, whose activation clips and batch-norm statistics are
  then recalibrated by train-mode forward passes under sampled chips.

Options beyond the paper: K chips per step (the loss is vmapped over K chips and averaged, or
the worst of K is taken), and a between-chip component in the training variability.

Everything random is a pure function of the seed: the data order of epoch ``e`` is a
permutation seeded by ``(seed, e)``, the chip and augmentation of step ``s`` come from
``fold_in(key, s)``. So a run resumed from a checkpoint ends with the same parameters as an
uninterrupted one.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pimjax import checkpoint as ckpt_lib
from pimjax.data import DATASETS, Dataset, augment, load_dataset, normalize
from pimjax.layers import CHIP, TUNE, analog_kernels
from pimjax.models import INPUT_SHAPES, MODELS, ModelConfig, get_model
from pimjax.quant import ACT_CLIP_METHODS, WEIGHT_SCALE_METHODS, QuantConfig
from pimjax.variability import (
    DISTRIBUTIONS,
    GRANULARITIES,
    VariabilityModel,
    chip_keys,
    sample_chip,
)

METHODS = ("fp", "qat", "vat", "ptq", "qavat")
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "step", "constant")
LOSSES = ("mean", "worst")
NUM_CLASSES = {"mnist": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100}
TRAIN_SIZES = {"mnist": 60000, "fashion_mnist": 60000, "cifar10": 50000, "cifar100": 50000}
DATASET_SHAPES = {"mnist": (28, 28, 1), "fashion_mnist": (28, 28, 1),
                  "cifar10": (32, 32, 3), "cifar100": (32, 32, 3)}
BATCH_AXIS = "batch"

# PRNG streams split from the seed (fold_in tags).
_INIT, _CHIPS, _AUGMENT, _EVAL_CHIPS = 0, 1, 2, 3


class TrainingDivergedError(FloatingPointError):
    """Raised when a training loss becomes NaN or infinite."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (validated before any data load or compile).

    Method semantics are enforced here: ``fp`` forces ``quant='fp'`` and both sigmas to 0,
    ``qat`` forces the sigmas to 0, ``vat`` forces ``quant='fp'``; ``qat``, ``qavat`` and
    ``ptq`` need a quantized ``quant``; ``ptq`` needs ``from_checkpoint``.
    """

    model: str = "lenet5"
    dataset: str = "mnist"
    quant: str = "fp"
    method: str = "fp"
    sigma_within: float = 0.0
    sigma_between: float = 0.0
    between_granularity: str = "chip"
    distribution: str = "normal"
    chips_per_step: int = 1
    loss: str = "mean"
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    grad_clip: float | None = None
    epochs: int = 10
    batch_size: int = 128
    eval_batch_size: int = 1000
    seed: int = 0
    width: float = 1.0
    digital_first_last: bool = False
    weight_scale: str = "mse"
    weight_per_channel: bool = False
    act_clip: str = "ema"
    augment: bool | None = None  # None: random crop + flip for CIFAR, nothing for MNIST
    data_dir: str | None = None
    limit_train: int | None = None
    limit_test: int | None = None
    from_checkpoint: str | None = None  # ptq: the trained vat run (or checkpoint) to quantize
    calib_batches: int = 50  # ptq: train-mode forward passes that recalibrate the statistics
    eval_chips: int = 0  # sampled chips evaluated on the test set after each epoch

    def __post_init__(self):
        _check_choice("method", self.method, METHODS)
        _check_choice("model", self.model, tuple(sorted(MODELS)))
        _check_choice("dataset", self.dataset, DATASETS)
        if tuple(INPUT_SHAPES[self.model]) != DATASET_SHAPES[self.dataset]:
            ok = [d for d, s in DATASET_SHAPES.items() if s == tuple(INPUT_SHAPES[self.model])]
            raise ValueError(
                f"model={self.model!r} takes {INPUT_SHAPES[self.model]} inputs and cannot train "
                f"on dataset={self.dataset!r}: use one of {ok}"
            )
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("loss", self.loss, LOSSES)
        _check_choice("weight_scale", self.weight_scale, WEIGHT_SCALE_METHODS)
        _check_choice("act_clip", self.act_clip, ACT_CLIP_METHODS)
        _check_choice("between_granularity", self.between_granularity, GRANULARITIES)
        _check_choice("distribution", self.distribution, DISTRIBUTIONS)
        quant = QuantConfig.parse(self.quant)  # raises on bad bits or a malformed spec
        VariabilityModel(self.sigma_within, self.sigma_between)  # raises on a bad sigma
        for name in ("epochs", "batch_size", "eval_batch_size", "chips_per_step",
                     "calib_batches"):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("eval_chips", self.eval_chips, minimum=0)
        _check_int("seed", self.seed, minimum=0)
        for name in ("limit_train", "limit_test"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1)
        for name in ("lr", "width"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value!r} must be a finite number > 0")
        for name in ("momentum", "weight_decay", "warmup_epochs"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}={value!r} must be a finite number >= 0")
        if self.momentum >= 1:
            raise ValueError(f"momentum={self.momentum!r} must be in [0, 1)")
        if self.warmup_epochs >= self.epochs and self.warmup_epochs > 0:
            raise ValueError(f"warmup_epochs={self.warmup_epochs!r} must be < epochs={self.epochs}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip={self.grad_clip!r} must be > 0 or None")

        # Method semantics: fp/vat train the float model, fp/qat train without variation.
        object.__setattr__(self, "quant", "fp" if self.method in ("fp", "vat") else quant.name)
        if self.method in ("fp", "qat"):
            object.__setattr__(self, "sigma_within", 0.0)
            object.__setattr__(self, "sigma_between", 0.0)
        if self.method in ("qat", "qavat", "ptq") and quant.is_float:
            raise ValueError(
                f"method={self.method!r} trains a quantized model: quant={self.quant!r} must "
                "name weight/activation bits, e.g. 'W2A4'"
            )
        if self.method == "ptq" and not self.from_checkpoint:
            raise ValueError("method='ptq' needs from_checkpoint: the path of a trained vat run")
        if self.method != "ptq" and self.from_checkpoint:
            raise ValueError(f"from_checkpoint is only used by method='ptq', not {self.method!r}")
        if self.chips_per_step > 1 and self.variability.is_nominal:
            raise ValueError(
                f"chips_per_step={self.chips_per_step} needs variation: use method 'vat' or "
                "'qavat' with sigma_within or sigma_between > 0"
            )
        if self.loss == "worst" and self.chips_per_step < 2:
            raise ValueError("loss='worst' takes the worst of K chips: set chips_per_step >= 2")

    @property
    def variability(self) -> VariabilityModel:
        """The training (and calibration) variability model."""
        return VariabilityModel(self.sigma_within, self.sigma_between,
                                self.between_granularity, self.distribution)

    @property
    def quant_config(self) -> QuantConfig:
        """The model's quantizer settings."""
        return QuantConfig.parse(self.quant, weight_scale=self.weight_scale,
                                 weight_per_channel=self.weight_per_channel,
                                 act_clip=self.act_clip)

    @property
    def num_classes(self) -> int:
        """Number of classes of the dataset."""
        return NUM_CLASSES[self.dataset]

    @property
    def use_augment(self) -> bool:
        """Whether training batches get random crops and flips."""
        return self.dataset.startswith("cifar") if self.augment is None else bool(self.augment)

    def model_config(self) -> ModelConfig:
        """The architecture as a :class:`pimjax.models.ModelConfig` (quant by name only)."""
        return ModelConfig(self.model, self.num_classes, self.quant, self.width,
                           self.digital_first_last)

    def to_dict(self) -> dict:
        """A JSON-ready dict of the fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Build a config from :meth:`to_dict` output (unknown keys raise ValueError)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}: allowed {sorted(names)}")
        return cls(**d)


def _check_choice(field: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is unknown: use one of {tuple(allowed)}")


def _check_int(field: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{field}={value!r} must be an integer >= {minimum}")


def build_model(config: TrainConfig) -> nn.Module:
    """The Flax model a config trains."""
    return get_model(config.model, config.num_classes, config.quant_config, config.width,
                     config.digital_first_last)


# --------------------------------------------------------------------------- state


class TrainState(struct.PyTreeNode):
    """Step counter, variables and optimizer state; config, model and optimizer are static."""

    step: jax.Array
    params: Any
    batch_stats: Any
    tune: Any
    opt_state: Any
    config: TrainConfig = struct.field(pytree_node=False)
    model: nn.Module = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    schedule: optax.Schedule | None = struct.field(pytree_node=False, default=None)

    @property
    def variables(self) -> dict:
        """The model variables (params, batch_stats, tune) without a chip."""
        out = {"params": self.params, "tune": self.tune}
        if self.batch_stats:
            out["batch_stats"] = self.batch_stats
        return out


def steps_per_epoch(config: TrainConfig, num_train: int | None = None) -> int:
    """Optimizer steps per epoch (the last partial batch is dropped)."""
    n = num_train if num_train is not None else TRAIN_SIZES[config.dataset]
    if config.limit_train is not None:
        n = min(n, config.limit_train)
    if n < config.batch_size:
        raise ValueError(f"batch_size={config.batch_size} exceeds the {n} training examples")
    return n // config.batch_size


@functools.lru_cache(maxsize=64)
def make_schedule(config: TrainConfig, num_steps_per_epoch: int) -> optax.Schedule:
    """Learning-rate schedule: cosine to 0, step (x0.1 at 50% and 75%), or constant."""
    total = config.epochs * num_steps_per_epoch
    warmup = int(round(config.warmup_epochs * num_steps_per_epoch))
    if config.schedule == "cosine":
        if warmup:
            return optax.warmup_cosine_decay_schedule(0.0, config.lr, warmup, total)
        return optax.cosine_decay_schedule(config.lr, total)
    if config.schedule == "step":
        main = optax.piecewise_constant_schedule(
            config.lr, {int(total * 0.5): 0.1, int(total * 0.75): 0.1})
    else:
        main = optax.constant_schedule(config.lr)
    if warmup:
        return optax.join_schedules([optax.linear_schedule(0.0, config.lr, warmup), main],
                                    [warmup])
    return main


@functools.lru_cache(maxsize=64)  # one object per config, so compiled steps are reused
def make_optimizer(config: TrainConfig, num_steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD with momentum (coupled L2 decay) or AdamW; decay applies to kernels only."""
    schedule = make_schedule(config, num_steps_per_epoch)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
    parts = []
    if config.grad_clip is not None:
        parts.append(optax.clip_by_global_norm(config.grad_clip))
    if config.optimizer == "sgd":
        if config.weight_decay:
            parts.append(optax.add_decayed_weights(config.weight_decay, decay_mask))
        parts.append(optax.sgd(schedule, config.momentum or None, config.nesterov))
    else:
        parts.append(optax.adamw(schedule, weight_decay=config.weight_decay, mask=decay_mask))
    return optax.chain(*parts)


@functools.lru_cache(maxsize=32)  # equal models share one compiled init
def _jit_init(model: nn.Module):
    return jax.jit(model.init)


@functools.lru_cache(maxsize=32)
def _jit_opt_init(tx: optax.GradientTransformation):
    return jax.jit(tx.init)


def create_train_state(config: TrainConfig, key, sample_input,
                       num_train: int | None = None) -> TrainState:
    """Initialise the model and optimizer (``num_train`` sizes the schedule's epochs)."""
    model = build_model(config)
    variables = _jit_init(model)(key, jnp.asarray(sample_input, jnp.float32))
    n = steps_per_epoch(config, num_train)
    tx = make_optimizer(config, n)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params,
        batch_stats=variables.get("batch_stats", {}), tune=variables.get(TUNE, {}),
        opt_state=_jit_opt_init(tx)(params), config=config, model=model, tx=tx,
        schedule=make_schedule(config, n))


# --------------------------------------------------------------------------- steps


def _prepare(config: TrainConfig, images, step, aug_key):
    """uint8 batch -> normalized float32, with random crop/flip when the config asks for it."""
    if config.use_augment and aug_key is not None:
        images = augment(jax.random.fold_in(aug_key, step), images)
    return normalize(images, config.dataset)


def _apply_train(state: TrainState, params, x, labels, chip):
    """Train-mode forward under one chip: (loss, (acc, new batch_stats))."""
    variables = {"params": params, "batch_stats": state.batch_stats, "tune": state.tune}
    if chip is not None:
        variables[CHIP] = chip
    logits, updates = state.model.apply(variables, x, train=True, mutable=["batch_stats"])
    # one-hot labels: the integer-label form's gradient is a scatter, slow on XLA's CPU
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    loss = optax.softmax_cross_entropy(logits, onehot).mean()
    acc = jnp.mean(jnp.argmax(logits, -1) == labels)
    return loss, (acc, updates.get("batch_stats", {}))


def step_chips(config: TrainConfig, params, tune, chip_key, step):
    """The chip(s) of one step: None (nominal), one chip, or K stacked chips."""
    vm = config.variability
    if vm.is_nominal:
        return None
    template = analog_kernels({"params": params, TUNE: tune})
    key = jax.random.fold_in(chip_key, step)
    if config.chips_per_step == 1:
        return sample_chip(key, vm, template)
    keys = chip_keys(key, config.chips_per_step)
    return jax.vmap(lambda k: sample_chip(k, vm, template))(keys)


def _train_step(state: TrainState, batch, chip_key, aug_key=None):
    config = state.config
    images, labels = batch
    x = _prepare(config, images, state.step, aug_key)
    chip = step_chips(config, state.params, state.tune, chip_key, state.step)

    def loss_fn(params):
        if chip is None or config.chips_per_step == 1:
            loss, (acc, stats) = _apply_train(state, params, x, labels, chip)
            return loss, (loss, acc, stats)
        losses, (accs, stats) = jax.vmap(
            lambda c: _apply_train(state, params, x, labels, c))(chip)
        # Batch statistics (BN and activation running max) averaged over the K chips.
        stats = jax.tree.map(lambda s: jnp.mean(s, axis=0), stats)
        loss = jnp.max(losses) if config.loss == "worst" else jnp.mean(losses)
        return loss, (jnp.mean(losses), jnp.mean(accs), stats)

    (objective, (loss, acc, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=stats,
                              opt_state=opt_state)
    # loss/acc: means over the step's chips; objective: what was minimised (worst-of-K or mean).
    metrics = {"loss": loss, "acc": acc, "objective": objective}
    if state.schedule is not None:
        metrics["lr"] = state.schedule(state.step)
    return new_state, metrics


train_step = jax.jit(_train_step)
train_step.__doc__ = """One optimizer step under the step's chip(s): ``(state, metrics)``.

``batch`` is ``(uint8 images, int32 labels)``; the chip of step ``s`` is drawn from
``fold_in(chip_key, s)`` (K chips: ``chip_keys(fold_in(chip_key, s), K)``); ``aug_key``
drives the random crop/flip of augmented datasets."""


def eval_step(state: TrainState, images, labels, mask, chip=None):
    """Sum of correct predictions and of losses over the unmasked examples of a batch."""
    variables = dict(state.variables)
    if chip is not None:
        variables[CHIP] = chip
    return _eval_sums(state.model, state.config.dataset, variables, images, labels, mask)


# Keyed on the model and dataset only, so runs of any method with the same net share programs.
@functools.partial(jax.jit, static_argnames=("model", "dataset"))
def _eval_sums(model, dataset, variables, images, labels, mask):
    logits = model.apply(variables, normalize(images, dataset), train=False)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return jnp.sum(correct * mask), jnp.sum(losses * mask)


def calibration_step(state: TrainState, images, chip_key, index):
    """One train-mode forward pass under chip ``index``: updates batch_stats, not params."""
    stats = _calibration_stats(state.model, state.config.dataset, state.config.variability,
                               state.variables, images, chip_key, index)
    return state.replace(batch_stats=stats)


@functools.partial(jax.jit, static_argnames=("model", "dataset", "variability"))
def _calibration_stats(model, dataset, variability, variables, images, chip_key, index):
    variables = dict(variables)
    if not variability.is_nominal:
        variables[CHIP] = sample_chip(jax.random.fold_in(chip_key, index), variability,
                                      analog_kernels(variables))
    _, updates = model.apply(variables, normalize(images, dataset), train=True,
                             mutable=["batch_stats"])
    return updates["batch_stats"]


# --------------------------------------------------------------------------- data


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh with axis 'batch' over the first ``num_devices`` local devices (None: all)."""
    devices = jax.local_devices()
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(f"num_devices={num_devices} must be in 1..{len(devices)} "
                             "(the local devices)")
        devices = devices[:num_devices]
    return Mesh(np.array(devices), (BATCH_AXIS,))


def shard_batch(mesh: Mesh, *arrays):
    """Place arrays on the mesh, split along their leading (batch) axis."""
    sharding = NamedSharding(mesh, P(BATCH_AXIS))
    return tuple(jax.device_put(a, sharding) for a in arrays)


def replicate(mesh: Mesh, tree):
    """Place a pytree on every device of the mesh."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The training order of ``epoch``: a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def train_batches(dataset: Dataset, batch_size: int, seed: int, epoch: int) -> Iterator:
    """(images, labels) batches of one epoch in its seeded order, last partial batch dropped."""
    perm = epoch_permutation(seed, epoch, len(dataset))
    for i in range(len(dataset) // batch_size):
        idx = np.sort(perm[i * batch_size:(i + 1) * batch_size])
        yield dataset.images[idx], dataset.labels[idx]


def evaluate(state: TrainState, dataset: Dataset, chip=None, batch_size: int | None = None,
             mesh: Mesh | None = None) -> dict:
    """Test loss and accuracy of the state's model on ``dataset`` under ``chip`` (None: nominal)."""
    bs = batch_size or state.config.eval_batch_size
    n = len(dataset)
    bs = min(bs, n)
    if mesh is not None:
        bs = -(-bs // mesh.size) * mesh.size
    correct = total_loss = 0.0
    sums = []
    for start in range(0, n, bs):
        images = dataset.images[start:start + bs]
        labels = dataset.labels[start:start + bs]
        mask = np.ones(len(labels), np.float32)
        pad = bs - len(labels)
        if pad:  # pad the last batch so one compiled program serves every batch
            images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
            labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
            mask = np.concatenate([mask, np.zeros(pad, np.float32)])
        if mesh is not None:
            images, labels, mask = shard_batch(mesh, images, labels, mask)
        sums.append(eval_step(state, images, labels, mask, chip))
    for c, loss in jax.device_get(sums):
        correct += float(c)
        total_loss += float(loss)
    return {"loss": total_loss / n, "acc": correct / n}


_sample_chip_jit = jax.jit(sample_chip, static_argnums=1)


def evaluate_chips(state: TrainState, dataset: Dataset, key, num_chips: int,
                   mesh: Mesh | None = None) -> np.ndarray:
    """Test accuracy on each of ``num_chips`` chips from ``chip_keys(key, num_chips)``."""
    vm = state.config.variability
    template = analog_kernels(state.variables)
    accs = []
    for k in chip_keys(key, num_chips):
        chip = _sample_chip_jit(k, vm, template)
        if mesh is not None:
            chip = replicate(mesh, chip)
        accs.append(evaluate(state, dataset, chip, mesh=mesh)["acc"])
    return np.asarray(accs)


# --------------------------------------------------------------------------- ptq


def init_from_float(state: TrainState, float_variables: dict) -> TrainState:
    """Copy a float model's params and BN statistics into a (quantized) state of the same net.

    Variables the float model lacks (quantizer clips, learned scales) keep their initial values.
    """
    def overlay(dst, src, path=""):
        if not hasattr(dst, "items"):
            if src is None:
                return dst
            if jnp.shape(src) != jnp.shape(dst):
                raise ValueError(f"{path}: checkpoint shape {jnp.shape(src)} != model "
                                 f"{jnp.shape(dst)}; is it the same model and width?")
            return jnp.asarray(src, dst.dtype)
        src = src if hasattr(src, "items") else {}
        return {k: overlay(v, src.get(k), f"{path}/{k}") for k, v in dst.items()}

    params = overlay(state.params, float_variables["params"])
    stats = overlay(state.batch_stats, float_variables.get("batch_stats", {}))
    return state.replace(params=params, batch_stats=stats,
                         opt_state=_jit_opt_init(state.tx)(params))


def calibrate(state: TrainState, dataset: Dataset, key, num_batches: int,
              mesh: Mesh | None = None) -> TrainState:
    """Recalibrate activation clips and BN statistics by train-mode passes under sampled chips."""
    done = 0
    epoch = 0
    while done < num_batches:
        for images, _ in train_batches(dataset, state.config.batch_size, state.config.seed,
                                       epoch):
            if mesh is not None:
                (images,) = shard_batch(mesh, images)
            state = calibration_step(state, images, key, done)
            done += 1
            if done == num_batches:
                break
        epoch += 1
    return state


# --------------------------------------------------------------------------- loop


def train(config: TrainConfig, workdir: str | os.PathLike, resume: bool = False,
          stop_after: int | None = None, num_devices: int | None = None,
          progress: bool = True, log_every: int = 20) -> dict:
    """Train (or, for ptq, calibrate) and return the final epoch's metrics.

    Writes ``config.json``, ``metrics.json``/``metrics.csv`` and orbax checkpoints
    (``checkpoints/<epoch>`` every epoch, ``best/<epoch>`` by test accuracy) into ``workdir``.
    ``resume`` continues from the last checkpoint; ``stop_after`` ends this call after that
    many epochs (as if interrupted). A NaN/inf loss raises :class:`TrainingDivergedError`.
    """
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
    workdir = Path(workdir).absolute()
    mesh = make_mesh(num_devices)
    for name in ("batch_size", "eval_batch_size"):
        if getattr(config, name) % mesh.size:
            raise ValueError(f"{name}={getattr(config, name)} must be divisible by the "
                             f"{mesh.size} devices of the data-parallel mesh")
    float_source = None
    if config.method == "ptq":
        float_source = _load_float_source(config)
    store = ckpt_lib.CheckpointStore(workdir)
    if not resume and store.latest_epoch() is not None:
        raise ValueError(f"{workdir} already holds checkpoints: pass resume=True (--resume) "
                         "to continue, or choose a new output directory")

    train_ds = load_dataset(config.dataset, "train", config.data_dir, limit=config.limit_train)
    test_ds = load_dataset(config.dataset, "test", config.data_dir, limit=config.limit_test)
    root = jax.random.PRNGKey(config.seed)
    init_key, chip_key, aug_key, eval_key = (jax.random.fold_in(root, i)
                                             for i in (_INIT, _CHIPS, _AUGMENT, _EVAL_CHIPS))
    sample = normalize(train_ds.images[:1], config.dataset)
    state = create_train_state(config, init_key, sample, len(train_ds))
    workdir.mkdir(parents=True, exist_ok=True)

    history: list[dict] = []
    start_epoch = 0
    if resume and store.latest_epoch() is not None:
        state, meta = store.restore(state)
        _check_resume_config(config, meta["config"], workdir)
        start_epoch = int(meta["epoch"])
        history = [m for m in meta.get("history", []) if m["epoch"] <= start_epoch]
    _write_json(workdir / "config.json", config.to_dict())
    state = replicate(mesh, state)

    if config.method == "ptq":
        return _run_ptq(config, state, float_source, train_ds, test_ds, chip_key, eval_key,
                        mesh, store, workdir)

    best_acc = max((m["test_acc"] for m in history), default=-1.0)
    n_steps = len(train_ds) // config.batch_size
    first_step = True
    first_step_s = 0.0
    epochs_run = 0
    for epoch in range(start_epoch + 1, config.epochs + 1):
        if stop_after is not None and epochs_run >= stop_after:
            break
        t0 = time.perf_counter()
        pending: list = []
        sums = {"loss": 0.0, "acc": 0.0}
        last_lr = float("nan")
        bar = _progress(n_steps, f"epoch {epoch}/{config.epochs}", progress)
        for i, (images, labels) in enumerate(train_batches(train_ds, config.batch_size,
                                                           config.seed, epoch)):
            batch = shard_batch(mesh, images, labels)
            if first_step:  # the first call compiles: time it apart from the epoch
                tc = time.perf_counter()
                state, metrics = train_step(state, batch, chip_key, aug_key)
                jax.block_until_ready(metrics)
                first_step_s = time.perf_counter() - tc
                first_step = False
            else:
                state, metrics = train_step(state, batch, chip_key, aug_key)
            pending.append(metrics)
            if len(pending) >= log_every or i == n_steps - 1:
                fetched = jax.device_get(pending)
                _check_finite(fetched, epoch, (i + 1 - len(pending)), n_steps, store)
                for m in fetched:
                    sums["loss"] += float(m["loss"])
                    sums["acc"] += float(m["acc"])
                last_lr = float(m.get("lr", float("nan")))
                bar.update(len(pending))
                pending = []
                seen = i + 1
                bar.set_postfix(loss=f"{sums['loss'] / seen:.4f}", acc=f"{sums['acc'] / seen:.4f}")
        bar.close()
        train_time = time.perf_counter() - t0 - (first_step_s if epochs_run == 0 else 0.0)
        te = time.perf_counter()
        test = evaluate(state, test_ds, mesh=mesh)
        row = {
            "epoch": epoch, "step": int(state.step),
            "lr": last_lr,  # of the epoch's last step
            "train_loss": sums["loss"] / n_steps, "train_acc": sums["acc"] / n_steps,
            "test_loss": test["loss"], "test_acc": test["acc"],
        }
        if config.eval_chips:
            accs = evaluate_chips(state, test_ds, eval_key, config.eval_chips, mesh)
            row.update(test_acc_chips_mean=float(accs.mean()), test_acc_chips_min=float(accs.min()))
        row.update(
            epoch_time_s=train_time, eval_time_s=time.perf_counter() - te,
            images_per_s=(n_steps - (epochs_run == 0)) * config.batch_size / max(train_time, 1e-9),
            first_step_s=first_step_s if epochs_run == 0 else 0.0,  # includes the compile
        )
        history.append(row)
        is_best = row["test_acc"] > best_acc
        best_acc = max(best_acc, row["test_acc"])
        _save(store, state, config, epoch, history, is_best)
        _write_metrics(workdir, history)
        epochs_run += 1
        if progress:
            print(_format_row(row), flush=True)
    final = dict(history[-1]) if history else {}
    final.update(best_test_acc=best_acc, best_epoch=_best_epoch(history),
                 workdir=str(workdir), num_devices=mesh.size)
    return final


def _run_ptq(config, state, float_source, train_ds, test_ds, chip_key, eval_key, mesh, store,
             workdir) -> dict:
    """ptq: load the float weights, recalibrate under sampled chips, evaluate, save."""
    _, float_vars = float_source
    state = replicate(mesh, init_from_float(state, float_vars))
    t0 = time.perf_counter()
    state = calibrate(state, train_ds, chip_key, config.calib_batches, mesh)
    jax.block_until_ready(state.batch_stats)
    calib_s = time.perf_counter() - t0
    test = evaluate(state, test_ds, mesh=mesh)
    row = {"epoch": 0, "step": 0, "lr": 0.0, "train_loss": None, "train_acc": None,
           "test_loss": test["loss"], "test_acc": test["acc"]}
    if config.eval_chips:
        accs = evaluate_chips(state, test_ds, eval_key, config.eval_chips, mesh)
        row.update(test_acc_chips_mean=float(accs.mean()), test_acc_chips_min=float(accs.min()))
    row.update(calib_time_s=calib_s,
               calib_images=config.calib_batches * config.batch_size)
    history = [row]
    _save(store, state, config, 0, history, True)
    _write_metrics(workdir, history)
    final = dict(row)
    final.update(best_test_acc=row["test_acc"], best_epoch=0, workdir=str(workdir),
                 num_devices=mesh.size)
    return final


def _load_float_source(config: TrainConfig):
    """Restore the float checkpoint ptq quantizes, checking it is the same architecture."""
    path = Path(config.from_checkpoint)
    if not path.exists():
        raise ValueError(f"from_checkpoint={config.from_checkpoint!r} does not exist")
    src_config, variables = ckpt_lib.restore(path)
    if not QuantConfig.parse(src_config.quant).is_float:
        raise ValueError(f"from_checkpoint holds a {src_config.quant} model: ptq quantizes a "
                         "float (vat or fp) model")
    for field in ("model", "dataset", "width", "digital_first_last"):
        if getattr(src_config, field) != getattr(config, field):
            raise ValueError(f"from_checkpoint has {field}={getattr(src_config, field)!r}, the "
                             f"ptq config {field}={getattr(config, field)!r}: they must match")
    return src_config, variables


_RESUME_FREE = ("data_dir",)  # fields that may change between a run and its resumption


def _check_resume_config(config: TrainConfig, saved: dict, workdir: Path) -> None:
    now = config.to_dict()
    diff = sorted(k for k in set(now) | set(saved)
                  if k not in _RESUME_FREE and now.get(k) != saved.get(k))
    if diff:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in diff)
        raise ValueError(f"cannot resume {workdir}: the config differs from the checkpoint's "
                         f"({details})")


def _check_finite(fetched, epoch, first_step, n_steps, store) -> None:
    for j, m in enumerate(fetched):
        loss = float(m["loss"])
        if not math.isfinite(loss):
            last = store.latest_epoch()
            where = (f"the last good checkpoint is {store.last_dir / str(last)} (epoch {last})"
                     if last is not None else "no checkpoint was written yet")
            raise TrainingDivergedError(
                f"training loss is {loss} at epoch {epoch}, step {first_step + j + 1}/{n_steps}: "
                f"stopped without saving; {where}. Lower the lr or set grad_clip, then rerun")


def _save(store, state, config, epoch, history, is_best) -> None:
    leaves = jax.device_get(jax.tree.leaves((state.params, state.batch_stats, state.opt_state)))
    if not all(np.isfinite(x).all() for x in leaves if np.issubdtype(x.dtype, np.floating)):
        raise TrainingDivergedError(
            f"non-finite parameters after epoch {epoch}: not saved; the last good checkpoint is "
            f"{store.last_dir / str(store.latest_epoch())}")
    meta = {"epoch": epoch, "config": config.to_dict(), "history": history,
            "metrics": history[-1]}
    store.save(epoch, state, meta, best=is_best)


def _best_epoch(history):
    return max(history, key=lambda m: m["test_acc"])["epoch"] if history else None


def _progress(total, desc, enabled):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False,
                mininterval=1.0)


def _format_row(row: dict) -> str:
    parts = [f"epoch {row['epoch']}", f"train_loss {row['train_loss']:.4f}",
             f"train_acc {row['train_acc']:.4f}", f"test_acc {row['test_acc']:.4f}"]
    if "test_acc_chips_mean" in row:
        parts.append(f"chips_mean {row['test_acc_chips_mean']:.4f}")
    parts += [f"{row['images_per_s']:.0f} img/s", f"{row['epoch_time_s']:.1f}s"]
    return " | ".join(parts)


def _write_json(path: Path, obj) -> None:
    """Write JSON atomically (temp file, then rename)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _write_metrics(workdir: Path, history: list[dict]) -> None:
    _write_json(workdir / "metrics.json", history)
    keys = list(dict.fromkeys(k for row in history for k in row))
    fd, tmp = tempfile.mkstemp(dir=workdir, prefix="metrics.csv.", suffix=".tmp")
    with os.fdopen(fd, "w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, workdir / "metrics.csv")
