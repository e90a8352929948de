"""Training configuration: nested frozen dataclasses, validated before any data load or compile.

A :class:`TrainConfig` is the whole description of a run: which training method, which model
and dataset, the quantizers, the device trained under (its variability), the optimizer, the
per-epoch chip evaluation and the ptq source. Contradictions are errors, never silently
rewritten: ``qat`` with a training sigma, ``fp`` with a quantized model, ...
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from pimjax import data
from pimjax.devices import DeviceConfig
from pimjax.models import ModelConfig
from pimjax.quant import QuantConfig

TRAIN_METHODS = ("fp", "qat", "vat", "ptq", "qavat")
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "step", "constant")
LOSSES = ("mean", "worst")


def check_choice(field: str, value, allowed) -> None:
    """Raise ValueError unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is unknown: use one of {tuple(allowed)}")


def check_int(field: str, value, minimum: int) -> None:
    """Raise ValueError unless ``value`` is an integer >= ``minimum``."""
    import numpy as np

    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{field}={value!r} must be an integer >= {minimum}")


def check_number(field: str, value, minimum: float = 0.0, strict: bool = False) -> None:
    """Raise ValueError unless ``value`` is a finite number >= (or > with strict) ``minimum``."""
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and (value > minimum if strict else value >= minimum))
    if not ok:
        raise ValueError(f"{field}={value!r} must be a finite number {'>' if strict else '>='} "
                         f"{minimum:g}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The dataset and how much of it a run uses."""

    name: str = "mnist"
    data_dir: str | None = None  # default: $PIMJAX_DATA_DIR (MNIST is bundled)
    train_images: int | None = None  # the first N training images (default: all)
    test_images: int | None = None  # the first N test images (default: all)
    augment: bool | None = None  # None: random crop + flip for CIFAR, nothing for MNIST

    def __post_init__(self):
        check_choice("data.name", self.name, data.DATASETS)
        for field in ("train_images", "test_images"):
            if getattr(self, field) is not None:
                check_int(f"data.{field}", getattr(self, field), 1)

    @property
    def info(self):
        """The dataset's registry entry (shape, classes, sizes)."""
        return data.info(self.name)

    @property
    def use_augment(self) -> bool:
        """Whether training batches get random crops and flips."""
        return self.name.startswith("cifar") if self.augment is None else bool(self.augment)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer, learning-rate schedule, epochs and batch size."""

    optimizer: Literal["sgd", "adam"] = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0  # on kernels only
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = 0.0
    grad_clip: float | None = None  # global-norm clip
    epochs: int = 10
    batch_size: int = 128

    def __post_init__(self):
        check_choice("optim.optimizer", self.optimizer, OPTIMIZERS)
        check_choice("optim.schedule", self.schedule, SCHEDULES)
        check_int("optim.epochs", self.epochs, 1)
        check_int("optim.batch_size", self.batch_size, 1)
        check_number("optim.lr", self.lr, 0.0, strict=True)
        for field in ("momentum", "weight_decay", "warmup_epochs"):
            check_number(f"optim.{field}", getattr(self, field))
        if self.momentum >= 1:
            raise ValueError(f"optim.momentum={self.momentum!r} must be in [0, 1)")
        if self.warmup_epochs > 0 and self.warmup_epochs >= self.epochs:
            raise ValueError(f"optim.warmup_epochs={self.warmup_epochs!r} must be < "
                             f"optim.epochs={self.epochs}")
        if self.grad_clip is not None:
            check_number("optim.grad_clip", self.grad_clip, 0.0, strict=True)
        if self.nesterov and (self.optimizer != "sgd" or not self.momentum):
            raise ValueError("optim.nesterov needs optimizer 'sgd' with momentum > 0")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """The test-set evaluation after each epoch: the nominal model, and optionally chips."""

    chips: int = 0  # chips sampled from `device` and evaluated after each epoch
    device: DeviceConfig = DeviceConfig()  # the evaluation device (its own variability)
    batch_size: int = 1000

    def __post_init__(self):
        check_int("eval.chips", self.chips, 0)
        check_int("eval.batch_size", self.batch_size, 1)
        if self.chips and self.device.is_ideal:
            raise ValueError(f"eval.chips={self.chips} would score identical ideal chips: set "
                             "the evaluation device's variation (e.g. --eval.device.sigma-within "
                             "0.3) or eval.chips 0")


@dataclasses.dataclass(frozen=True)
class PTQConfig:
    """Post-training quantization of a trained float (vat or fp) run."""

    from_checkpoint: str | None = None  # the float run (or checkpoint) to quantize
    calib_batches: int = 50  # train-mode passes that recalibrate clips and BN statistics

    def __post_init__(self):
        check_int("ptq.calib_batches", self.calib_batches, 1)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run."""

    train_method: Literal["fp", "qat", "vat", "ptq", "qavat"] = "fp"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    quant: QuantConfig = QuantConfig()
    device: DeviceConfig = DeviceConfig()  # what training (and ptq calibration) samples chips of
    optim: OptimConfig = OptimConfig()
    eval: EvalConfig = EvalConfig()
    ptq: PTQConfig = PTQConfig()
    chips_per_step: int = 1  # K chips per step, the loss averaged (or the worst taken)
    loss: Literal["mean", "worst"] = "mean"
    seed: int = 0
    max_loss_ratio: float | None = 100.0  # stop when the loss exceeds this x its first value

    def __post_init__(self):
        check_choice("train_method", self.train_method, TRAIN_METHODS)
        check_choice("loss", self.loss, LOSSES)
        check_int("chips_per_step", self.chips_per_step, 1)
        check_int("seed", self.seed, 0)
        if self.max_loss_ratio is not None:
            check_number("max_loss_ratio", self.max_loss_ratio, 1.0, strict=True)
        for field, kind in (("model", ModelConfig), ("data", DataConfig), ("quant", QuantConfig),
                            ("device", DeviceConfig), ("optim", OptimConfig),
                            ("eval", EvalConfig), ("ptq", PTQConfig)):
            if not isinstance(getattr(self, field), kind):
                raise ValueError(f"{field} must be a {kind.__name__}, got "
                                 f"{type(getattr(self, field)).__name__}")
        shape = self.model.input_shape
        if tuple(shape) != tuple(self.data.info.image_shape):
            ok = [d for d in data.DATASETS if tuple(data.info(d).image_shape) == tuple(shape)]
            raise ValueError(f"model {self.model.name!r} takes {shape} inputs and cannot train on "
                             f"dataset {self.data.name!r}: use one of {ok}")
        method, ideal = self.train_method, self.device.is_ideal
        if method in ("fp", "vat") and not self.quant.is_float:
            raise ValueError(f"train_method={method!r} trains a float model: drop the quantizer "
                             f"(quant is {self.quant.name}) or use "
                             f"{'qat' if method == 'fp' else 'qavat'}")
        if method in ("qat", "qavat", "ptq") and self.quant.is_float:
            raise ValueError(f"train_method={method!r} trains a quantized model: set the weight "
                             "and activation bits (e.g. --quant.weight-bits 2 "
                             "--quant.act-bits 4)")
        if method in ("fp", "qat") and not ideal:
            raise ValueError(f"train_method={method!r} trains without variation: set the "
                             f"training device's sigmas to 0, or use "
                             f"{'vat' if method == 'fp' else 'qavat'}")
        if method in ("vat", "qavat") and ideal:
            raise ValueError(f"train_method={method!r} trains under variation: set "
                             "--device.sigma-within (or sigma-between) > 0, or use "
                             f"{'fp' if method == 'vat' else 'qat'}")
        if method == "ptq" and not self.ptq.from_checkpoint:
            raise ValueError("train_method='ptq' needs ptq.from_checkpoint: the trained vat run")
        if method != "ptq" and self.ptq.from_checkpoint:
            raise ValueError(f"ptq.from_checkpoint is only used by train_method='ptq', not "
                             f"{method!r}")
        if self.chips_per_step > 1 and ideal:
            raise ValueError(f"chips_per_step={self.chips_per_step} needs variation: use "
                             "train_method 'vat' or 'qavat'")
        if self.loss == "worst" and self.chips_per_step < 2:
            raise ValueError("loss='worst' takes the worst of K chips: set chips_per_step >= 2")

    @property
    def num_classes(self) -> int:
        """Number of classes of the dataset."""
        return self.data.info.num_classes

    def to_dict(self) -> dict:
        """A JSON-ready nested dict of the fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Build a config from :meth:`to_dict` output (unknown keys raise ValueError)."""
        return from_dict(cls, d)


def from_dict(cls, d: dict):
    """A (nested) frozen dataclass from a dict of its fields; unknown keys raise ValueError."""
    if not isinstance(d, dict):
        raise ValueError(f"{cls.__name__} must be given as a dict, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}: allowed {sorted(fields)}")
    kwargs = {}
    for name, value in d.items():
        default = fields[name].default
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            value = from_dict(type(default), value)
        kwargs[name] = value
    return cls(**kwargs)
