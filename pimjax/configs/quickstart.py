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

PTQ_CALIB_BATCHES = 50  # ptq's calibration batches (as in claim 1)


@dataclasses.dataclass(frozen=True)
class Quickstart:
    """The paper's three claims on LeNet-5 / bundled MNIST, on the same chips for every row.

    qat, ptq (of a float vat model) and qavat on chips with within-chip variation (claim 1);
    the qavat model on chips that add between-chip variation (claim 2); the same chips after
    label-free self-tuning (claim 3).
    """

    quant: str = "W2A4"
    """weight/activation bits of the quantized models"""
    epochs: int = 3
    train_images: int | None = 20000
    """the first N training images (None: all 60,000)"""
    test_images: int | None = 1000
    """the first N test images, scored on every chip (None: all 10,000)"""
    chips: int = 200
    batch_size: int = 128
    sigma_within: float = 0.5
    """the chips' within-chip sigma"""
    sigma_between: float = 0.3
    """the between-chip sigma added for claims 2 and 3"""
    train_sigma: float | None = None
    """the training sigma_within of qavat and of ptq's vat model (default: --sigma-within)"""
    ptq: bool = True
    """also train ptq (a float vat model, quantized and recalibrated; --no-ptq: skip)"""
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
        checks.sigmas("sigma_within", (self.sigma_within,))
        checks.sigmas("sigma_between", (self.sigma_between,))
        if self.sigma_within <= 0:
            raise ValueError("--sigma-within must be > 0: claim 1 compares the methods under "
                             "within-chip variation")
        if self.sigma_between <= 0:
            raise ValueError("--sigma-between must be > 0: claims 2 and 3 add between-chip "
                             "variation")
        if self.train_sigma is not None:
            checks.positive_sigma("train_sigma", self.train_sigma, "qavat trains under variation")

    @property
    def qavat_sigma(self) -> float:
        """The training sigma_within of qavat (and of ptq's vat model) in effect."""
        return self.sigma_within if self.train_sigma is None else self.train_sigma

    @property
    def methods(self) -> tuple[str, ...]:
        """The training methods compared under within-chip variation."""
        return ("qat", "ptq", "qavat") if self.ptq else ("qat", "qavat")

    @property
    def within(self) -> DeviceConfig:
        """Claim 1's chips: within-chip variation only."""
        return DeviceConfig(sigma_within=self.sigma_within, distribution=self.distribution)

    @property
    def device(self) -> DeviceConfig:
        """Claims 2 and 3's chips: the same within-chip variation plus between-chip."""
        return DeviceConfig(sigma_within=self.sigma_within, sigma_between=self.sigma_between,
                            between_granularity=self.granularity,
                            distribution=self.distribution)

    def train_config(self, train_method: str, source: str | None = None) -> TrainConfig:
        """The TrainConfig of the ``qat``, ``qavat``, ``vat`` or ``ptq`` model (``ptq``:
        ``source`` is the vat model's run directory)."""
        quant = "fp" if train_method == "vat" else self.quant
        sigma = 0.0 if train_method == "qat" else self.qavat_sigma
        return setups.lenet5().train_config(
            train_method, quant, sigma, epochs=self.epochs, train_images=self.train_images,
            test_images=self.test_images, batch_size=self.batch_size, seed=self.seed,
            ptq_from=source, calib_batches=self.ptq_calib_batches)

    @property
    def ptq_calib_batches(self) -> int:
        """ptq's calibration batches: 50 (as in claim 1), at most the training batches."""
        n = 60000 if self.train_images is None else self.train_images
        return max(1, min(PTQ_CALIB_BATCHES, n // self.batch_size))


def quickstart(smoke: bool = False) -> Quickstart:
    """The quickstart's defaults: about 100 s on two idle CPU cores (smoke: seconds, the claim
    experiments' smoke sizes, so that their compiled programs are shared)."""
    if smoke:
        s = claims.SMOKE
        return Quickstart(epochs=s["epochs"], train_images=s["train_images"],
                          test_images=s["test_images"], chips=s["chips"],
                          batch_size=s["batch_size"], sigma_within=0.2, calib_images=64,
                          smoke=True)
    return Quickstart()
