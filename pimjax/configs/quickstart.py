"""The quickstart's settings (``experiments/quickstart.py``) and their presets."""

from __future__ import annotations

import dataclasses
from typing import Literal

from pimjax import selftune
from pimjax.configs import checks, claims, setups
from pimjax.devices import DISTRIBUTIONS, GRANULARITIES, DeviceConfig
from pimjax.quant import QuantConfig
from pimjax.train import TrainConfig
from pimjax.train.config import check_int


@dataclasses.dataclass(frozen=True)
class Quickstart:
    """qat vs qavat LeNet-5 on bundled MNIST, on many chips, before and after self-tuning."""

    quant: str = "W2A4"
    """weight/activation bits of both models"""
    epochs: int = 3
    train_images: int | None = 20000
    """the first N training images (None: all 60,000)"""
    test_images: int | None = 200
    """the first N test images, scored on every chip (None: all 10,000)"""
    chips: int = 1000
    batch_size: int = 128
    train_sigma: float = 0.3
    """qavat's training sigma_within"""
    sigma_within: float = 0.2
    """the chips' within-chip sigma"""
    sigma_between: float = 0.3
    """the chips' between-chip sigma"""
    granularity: Literal[GRANULARITIES] = "layer"
    """between-chip granularity"""
    distribution: Literal[DISTRIBUTIONS] = "normal"
    tune: Literal[selftune.TUNE_VARIANTS] = "channel"
    """self-tuning variant"""
    calib_images: int = 256
    """unlabeled calibration images: the first N of the training split"""
    seed: int = 0
    smoke: bool = False
    """seconds-long run on tiny data (tests); changes only the defaults of flags not given"""

    def __post_init__(self):
        if QuantConfig.parse(self.quant).is_float:
            raise ValueError(f"--quant {self.quant} is float: the quickstart compares quantized "
                             "models (e.g. --quant W2A4)")
        for field in ("epochs", "chips", "batch_size", "calib_images"):
            checks.positive(field, getattr(self, field))
        for field in ("train_images", "test_images"):
            checks.positive(field, getattr(self, field), allow_none=True)
        check_int("--seed", self.seed, 0)
        if self.train_images is not None and self.train_images < self.batch_size:
            raise ValueError(f"--train-images {self.train_images} is below --batch-size "
                             f"{self.batch_size}: an epoch would have no step")
        checks.sigmas("train_sigma", (self.train_sigma,))
        if self.train_sigma <= 0:
            raise ValueError("--train-sigma must be > 0: qavat trains under variation")
        if self.device.is_ideal:
            raise ValueError("--sigma-within and --sigma-between are both 0: every chip would "
                             "be the nominal model; set one > 0")

    @property
    def device(self) -> DeviceConfig:
        """The chips' device."""
        return DeviceConfig(sigma_within=self.sigma_within, sigma_between=self.sigma_between,
                            between_granularity=self.granularity,
                            distribution=self.distribution)

    def train_config(self, train_method: str) -> TrainConfig:
        """The TrainConfig of the ``qat`` or ``qavat`` model."""
        sigma = self.train_sigma if train_method == "qavat" else 0.0
        return setups.lenet5().train_config(
            train_method, self.quant, sigma, epochs=self.epochs, train_images=self.train_images,
            test_images=self.test_images, batch_size=self.batch_size, seed=self.seed)


def quickstart(smoke: bool = False) -> Quickstart:
    """The quickstart's defaults: under 5 minutes on two CPU cores (smoke: seconds, the claim
    experiments' smoke sizes, so that their compiled programs are shared)."""
    if smoke:
        s = claims.SMOKE
        return Quickstart(epochs=s["epochs"], train_images=s["train_images"],
                          test_images=s["test_images"], chips=s["chips"],
                          batch_size=s["batch_size"], train_sigma=0.2, calib_images=64,
                          smoke=True)
    return Quickstart()
