"""The Monte-Carlo sweep's settings (``experiments/montecarlo.py``) and their presets."""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Literal

from pimjax import data, selftune
from pimjax.configs import checks
from pimjax.devices import DISTRIBUTIONS, GRANULARITIES, VariabilityModel
from pimjax.train.config import check_int

TuneName = Literal[("none", *selftune.TUNE_VARIANTS)]


@dataclasses.dataclass(frozen=True)
class Setting:
    """One point of a sweep: its variability and the plot group it belongs to."""

    group: str
    variability: VariabilityModel

    @property
    def sigma_total(self) -> float:
        """sqrt(within^2 + between^2)."""
        return math.hypot(self.variability.sigma_within, self.variability.sigma_between)


@dataclasses.dataclass(frozen=True)
class MonteCarlo:
    """A sweep of a trained model over variability settings, untuned and self-tuned."""

    chips: int = 100
    sigma_within: tuple[float, ...] = (0.0, 0.1, 0.2)
    """within-chip sigmas of the grid"""
    sigma_between: tuple[float, ...] = (0.0,)
    """between-chip sigmas of the grid"""
    total: tuple[float, ...] | None = None
    """fixed total sigmas, each split by --between-fraction (instead of the grid)"""
    between_fraction: tuple[float, ...] = (0.5,)
    """between-chip share(s) of the variance, with --total"""
    granularity: Literal[GRANULARITIES] = "layer"
    """between-chip granularity"""
    distribution: Literal[DISTRIBUTIONS] = "normal"
    tune: tuple[TuneName, ...] = ("none",)
    """evaluations: "none" (untuned) and/or self-tuning variants"""
    calib_images: int = 256
    """unlabeled calibration images: the first N of the training split"""
    calib_batch: int | None = None
    """calibration batch size (default: all images in one batch, one pass)"""
    test_images: int | None = None
    """the first N test images (default: all)"""
    dataset: Literal[data.DATASETS] | None = None
    """the test and calibration data (default: the checkpoint's)"""
    data_dir: str | None = None
    """dataset folder (default: the checkpoint's, else $PIMJAX_DATA_DIR)"""
    budget_mb: int | None = None
    """memory budget per device in MiB (default: 1 GiB on CPU, half an accelerator's)"""
    thresholds: tuple[float, ...] = ()
    """absolute accuracy thresholds of the reported yields"""
    seed: int = 0
    """chip i is fold_in(key(seed + 1), i), the same chips for every setting and variant"""
    smoke: bool = False
    """seconds-long run on tiny data (tests); changes only the defaults of flags not given"""

    def __post_init__(self):
        for field in ("chips", "calib_images"):
            checks.positive(field, getattr(self, field))
        for field in ("calib_batch", "test_images", "budget_mb"):
            checks.positive(field, getattr(self, field), allow_none=True)
        check_int("--seed", self.seed, 0)
        checks.sigmas("sigma_within", self.sigma_within)
        checks.sigmas("sigma_between", self.sigma_between)
        if self.total is not None:
            checks.sigmas("total", self.total)
        checks.fractions("between_fraction", self.between_fraction)
        checks.fractions("thresholds", self.thresholds or (0.0,))
        checks.choices("tune", self.tune, ("none", *selftune.TUNE_VARIANTS))

    @property
    def tunes_chips(self) -> bool:
        """Whether any evaluation self-tunes (and so needs calibration images)."""
        return any(t != "none" for t in self.tune)

    def settings(self) -> list[Setting]:
        """The variability settings of the sweep, in order."""
        kw = dict(between_granularity=self.granularity, distribution=self.distribution)
        if self.total is not None:
            return [Setting(f"between fraction {f:g}", VariabilityModel.from_total(t, f, **kw))
                    for f, t in itertools.product(self.between_fraction, self.total)]
        return [Setting(f"sigma_between {b:g}", VariabilityModel(w, b, **kw))
                for b, w in itertools.product(self.sigma_between, self.sigma_within)]


def montecarlo(smoke: bool = False) -> MonteCarlo:
    """The sweep's defaults (smoke: 4 chips, 64 test and 32 calibration images)."""
    if smoke:
        return MonteCarlo(chips=4, sigma_within=(0.0, 0.2), test_images=64, calib_images=32,
                          smoke=True)
    return MonteCarlo()
