"""The drift experiment's settings (``experiments/drift.py``) and their presets."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from pimjax import drift
from pimjax.configs import checks, setups
from pimjax.devices import DeviceConfig
from pimjax.quant import QuantConfig
from pimjax.train import TrainConfig
from pimjax.train.config import check_int

MODELS = ("qat", "qavat-paper", "qavat-pcm")
ModelName = Literal[MODELS]
CompensationName = Literal[drift.COMPENSATIONS]


@dataclasses.dataclass(frozen=True)
class Drift:
    """LeNet-5 trained three ways, on PCM chips read from 1 s to 10 years after programming."""

    models: tuple[ModelName, ...] = MODELS
    """qat (no device in training), qavat-paper (the paper's variability), qavat-pcm (the
    PCM device: aihwkit's hardware-aware training)"""
    quant: str = "W4A8"
    """weight/activation bits of every model"""
    paper_sigma: float = 0.1
    """qavat-paper's training sigma_within"""
    epochs: int = 3
    train_images: int | None = 20000
    """the first N training images (None: all 60,000)"""
    test_images: int | None = 1000
    """the first N test images, scored on every chip (None: all 10,000)"""
    batch_size: int = 128
    chips: int = 50
    """PCM chips per point (chip i is the same at every point)"""
    times: tuple[float, ...] = tuple(drift.TIMES.values())
    """read times, seconds after programming"""
    compensations: tuple[CompensationName, ...] = drift.COMPENSATIONS
    """none, drift (global drift compensation) and/or self-tuning variants"""
    calib_images: int = 256
    """self-tuning's unlabeled calibration images: the first N training images"""
    seed: int = 0
    """training seed; chip i of every point is fold_in(key(seed + 1), i)"""
    data_dir: str | None = None
    """dataset folder (default: $PIMJAX_DATA_DIR; MNIST is bundled)"""
    smoke: bool = False
    """seconds-long run on tiny data (tests); changes only the defaults of flags not given"""

    def __post_init__(self):
        if QuantConfig.parse(self.quant).is_float:
            raise ValueError(f"--quant {self.quant} is float: give weight and activation bits "
                             "(e.g. --quant W4A8)")
        for field in ("epochs", "chips", "calib_images", "batch_size"):
            checks.positive(field, getattr(self, field))
        for field in ("train_images", "test_images"):
            checks.positive(field, getattr(self, field), allow_none=True)
        if self.train_images is not None and self.train_images < self.batch_size:
            raise ValueError(f"--train-images {self.train_images} is below --batch-size "
                             f"{self.batch_size}: an epoch would have no step")
        check_int("--seed", self.seed, 0)
        checks.positive_sigma("paper_sigma", self.paper_sigma,
                              "qavat-paper trains under variation")
        if not self.times:
            raise ValueError("--times is empty: give at least one read time (seconds)")
        bad = [t for t in self.times if not (math.isfinite(t) and t >= 0)]
        if bad:
            raise ValueError(f"--times has {bad}: read times are finite seconds >= 0")
        checks.choices("models", self.models, MODELS)
        checks.choices("compensations", self.compensations, drift.COMPENSATIONS)

    def train_config(self, model: str) -> TrainConfig:
        """The TrainConfig of ``qat``, ``qavat-paper`` or ``qavat-pcm`` (LeNet-5, MNIST)."""
        checks.choices("models", (model,), MODELS)
        method, sigma = ("qat", 0.0) if model == "qat" else ("qavat", self.paper_sigma)
        config = setups.lenet5().train_config(
            method, self.quant, sigma, data_dir=self.data_dir, epochs=self.epochs,
            train_images=self.train_images, test_images=self.test_images,
            batch_size=self.batch_size, seed=self.seed)
        if model == "qavat-pcm":
            config = dataclasses.replace(config, device=DeviceConfig(preset="pcm"))
        return config


def drift_config(smoke: bool = False) -> Drift:
    """The experiment's defaults (smoke: qat and qavat-pcm, 1 s and 1 year, none/drift/channel,
    seconds of work)."""
    if smoke:
        return Drift(models=("qat", "qavat-pcm"), epochs=1, train_images=256, test_images=64,
                     batch_size=32, chips=3, times=(1.0, drift.YEAR),
                     compensations=("none", "drift", "channel"), calib_images=32, smoke=True)
    return Drift()
