"""The claim experiments' settings (``experiments/claim*.py``) and their presets.

Each preset takes the setup (:mod:`pimjax.configs.setups`), which sets the epochs, the
number of chips and of test images, and ``smoke`` (seconds-long sizes for tests).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from pimjax import data, selftune
from pimjax.configs import checks, setups
from pimjax.devices import GRANULARITIES
from pimjax.quant import QuantConfig, check_bits
from pimjax.train import TrainConfig
from pimjax.train.config import check_int

CLAIM1_METHODS = ("qat", "ptq", "qavat")
DatasetName = Literal[data.DATASETS]
TuneName = Literal[("none", *selftune.TUNE_VARIANTS)]


@dataclasses.dataclass(frozen=True)
class ClaimRun:
    """What every claim experiment trains and evaluates on: the setup, the data and the sizes."""

    setup: setups.SetupName = "lenet5"
    """model, dataset and recipe; also sets the defaults of the size flags below"""
    dataset: DatasetName | None = None
    """the dataset (default: the setup's), e.g. fashion_mnist for lenet5"""
    data_dir: str | None = None
    """dataset folder (default: $PIMJAX_DATA_DIR; MNIST is bundled)"""
    epochs: int = 3
    train_images: int | None = None
    """the first N training images (default: all)"""
    test_images: int | None = 1000
    """the first N test images, scored on every chip (None: all)"""
    chips: int = 200
    """Monte-Carlo chips per evaluation"""
    batch_size: int = 128
    seed: int = 0
    """training seed; chip i of every evaluation is fold_in(key(seed + 1), i)"""
    width: float | None = None
    """channel width multiplier of the model (default: the setup's, e.g. 0.25 for vgg11-narrow)"""
    digital_first_last: bool = False
    """keep the first and last layers digital (no variation)"""
    smoke: bool = False
    """seconds-long run on tiny data (tests); changes only the defaults of flags not given"""

    def __post_init__(self):
        setup = setups.get(self.setup)
        for field in ("epochs", "chips", "batch_size"):
            checks.positive(field, getattr(self, field))
        for field in ("train_images", "test_images"):
            checks.positive(field, getattr(self, field), allow_none=True)
        check_int("--seed", self.seed, 0)
        if self.width is not None and not (isinstance(self.width, (int, float))
                                           and math.isfinite(self.width) and self.width > 0):
            raise ValueError(f"--width {self.width} must be a number > 0: it multiplies the "
                             "channel counts (e.g. --width 0.5)")
        if self.train_images is not None and self.train_images < self.batch_size:
            raise ValueError(f"--train-images {self.train_images} is below --batch-size "
                             f"{self.batch_size}: an epoch would have no step")
        shape, want = data.info(self.dataset_name).image_shape, setup.model.input_shape
        if tuple(shape) != tuple(want):
            ok = [d for d in data.DATASETS if tuple(data.info(d).image_shape) == tuple(want)]
            raise ValueError(f"--dataset {self.dataset_name} has {tuple(shape)} images but setup "
                             f"{self.setup!r} takes {tuple(want)}: use one of {ok}")

    @property
    def dataset_name(self) -> str:
        """The dataset in effect (the setup's unless --dataset is given)."""
        return self.dataset or setups.get(self.setup).dataset

    def train_config(self, train_method: str, quant: str = "fp", sigma_within: float = 0.0,
                     ptq_from: str | None = None, calib_batches: int = 50) -> TrainConfig:
        """The TrainConfig of one of the experiment's models."""
        return setups.get(self.setup).train_config(
            train_method, quant, sigma_within, dataset=self.dataset_name,
            data_dir=self.data_dir, epochs=self.epochs, train_images=self.train_images,
            test_images=self.test_images, batch_size=self.batch_size, seed=self.seed,
            width=self.width, digital_first_last=self.digital_first_last, ptq_from=ptq_from,
            calib_batches=calib_batches)


@dataclasses.dataclass(frozen=True)
class Claim1(ClaimRun):
    """Claim 1: qat, ptq (of a vat model) and qavat x weight bits x training sigma."""

    methods: tuple[Literal[CLAIM1_METHODS], ...] = CLAIM1_METHODS
    bits: tuple[int, ...] = (1, 2, 3, 4)
    """weight bits"""
    act_bits: int = 4
    """activation bits"""
    sigmas: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
    """training sigma_within of vat and qavat"""
    eval_sigmas: tuple[float, ...] | None = None
    """evaluation sigma_within (default: --sigmas)"""
    matched_only: bool = False
    """evaluate ptq/qavat models only at their training sigma"""

    def __post_init__(self):
        super().__post_init__()
        checks.choices("methods", self.methods, CLAIM1_METHODS)
        if not self.bits:
            raise ValueError("--bits is empty: give at least one weight bit width")
        for b in self.bits:
            check_bits(b, "--bits")
        check_bits(self.act_bits, "--act-bits")
        if len(set(self.bits)) != len(self.bits):
            raise ValueError(f"--bits repeats a value: {self.bits}")
        checks.sigmas("sigmas", self.sigmas)
        if self.eval_sigmas is not None:
            checks.sigmas("eval_sigmas", self.eval_sigmas)

    @property
    def evaluated_sigmas(self) -> tuple[float, ...]:
        """The evaluation sigmas in effect."""
        return self.sigmas if self.eval_sigmas is None else self.eval_sigmas


@dataclasses.dataclass(frozen=True)
class Between(ClaimRun):
    """Claim 2: a qavat model on chips whose fixed total sigma is split within/between."""

    quant: str = "W2A4"
    """weight/activation bits of the qavat model"""
    sigma_total: float = 0.3
    """total sigma split between the within- and the between-chip components"""
    fractions: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    """between-chip share of the variance"""
    granularities: tuple[Literal[GRANULARITIES], ...] = ("chip", "layer")
    """between-chip granularities"""
    train_sigma: float | None = None
    """qavat's training sigma_within (default: --sigma-total)"""

    def __post_init__(self):
        super().__post_init__()
        if QuantConfig.parse(self.quant).is_float:
            raise ValueError(f"--quant {self.quant} is float: qavat trains a quantized model "
                             "(e.g. --quant W2A4)")
        checks.positive_sigma("sigma_total", self.sigma_total,
                              "it is the variation the sweep splits")
        checks.fractions("fractions", self.fractions)
        checks.choices("granularities", self.granularities, GRANULARITIES)
        if self.train_sigma is not None:
            checks.positive_sigma("train_sigma", self.train_sigma, "qavat trains under variation")

    @property
    def qavat_sigma(self) -> float:
        """qavat's training sigma_within in effect."""
        return self.sigma_total if self.train_sigma is None else self.train_sigma


@dataclasses.dataclass(frozen=True)
class Claim3(Between):
    """Claim 3: the claim-2 sweep after each label-free self-tuning variant."""

    tunes: tuple[TuneName, ...] = ("none", *selftune.TUNE_VARIANTS)
    """self-tuning variants ("none": untuned)"""
    calib_images: int = 256
    """unlabeled calibration images: the first N of the training split"""

    def __post_init__(self):
        super().__post_init__()
        checks.choices("tunes", self.tunes, ("none", *selftune.TUNE_VARIANTS))
        checks.positive("calib_images", self.calib_images)


SMOKE = dict(epochs=1, train_images=256, test_images=64, chips=4, batch_size=32, smoke=True)


def _sizes(setup: str, smoke: bool) -> dict:
    if smoke:
        return dict(SMOKE, setup=setup)
    s = setups.get(setup)
    return dict(setup=setup, epochs=s.optim.epochs, train_images=s.train_images,
                test_images=s.test_images, chips=s.chips, batch_size=s.optim.batch_size)


def claim1(setup: str = "lenet5", smoke: bool = False) -> Claim1:
    """Claim 1's defaults for ``setup``: its activation bits; a paper-size setup evaluates
    each ptq/qavat model at its own training sigma only (the tables' cells; qat at every
    sigma), a fifth of the evaluations. Smoke: W2, sigma 0.2, evaluated at 0 and 0.2."""
    s = setups.get(setup)
    config = Claim1(**_sizes(setup, smoke), act_bits=s.act_bits,
                    matched_only=s.paper_size and not smoke)
    if smoke:
        config = dataclasses.replace(config, bits=(2,), sigmas=(0.2,), eval_sigmas=(0.0, 0.2))
    return config


def claim2(setup: str = "lenet5", smoke: bool = False) -> Between:
    """Claim 2's defaults for ``setup`` (smoke: fractions 0 and 1, layer granularity)."""
    config = Between(**_sizes(setup, smoke))
    if smoke:
        config = dataclasses.replace(config, fractions=(0.0, 1.0), granularities=("layer",),
                                     train_sigma=0.2)
    return config


def claim3(setup: str = "lenet5", smoke: bool = False) -> Claim3:
    """Claim 3's defaults for ``setup`` (smoke: claim 2's, none/channel/bn, 64 images)."""
    config = Claim3(**_sizes(setup, smoke))
    if smoke:
        config = dataclasses.replace(config, fractions=(0.0, 1.0), granularities=("layer",),
                                     train_sigma=0.2, tunes=("none", "channel", "bn"),
                                     calib_images=64)
    return config
