"""A device as configuration: a preset name and its settings, turned into a Device by build()."""

from __future__ import annotations

import dataclasses
from typing import Literal

from pimjax.devices.base import Device
from pimjax.devices.presets import ideal, paper
from pimjax.devices.variability import VariabilityModel

PRESETS = ("ideal", "paper")


@dataclasses.dataclass(frozen=True)
class DeviceConfig:
    """Which device a run simulates: a preset and the paper's variability settings.

    ``paper`` with both sigmas 0 is the ideal device. ``ideal`` takes no sigma.
    """

    preset: Literal["ideal", "paper"] = "paper"
    sigma_within: float = 0.0
    sigma_between: float = 0.0
    between_granularity: Literal["chip", "layer", "column"] = "chip"
    distribution: Literal["normal", "lognormal"] = "normal"

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"device.preset={self.preset!r} is unknown: use one of {PRESETS}")
        vm = self.variability  # validates the sigmas, granularity and distribution
        for field in ("sigma_within", "sigma_between"):
            object.__setattr__(self, field, getattr(vm, field))
        if self.preset == "ideal" and not vm.is_nominal:
            raise ValueError("device.preset='ideal' has no variation: set the sigmas to 0 or "
                             "use preset 'paper'")

    @property
    def variability(self) -> VariabilityModel:
        """The paper's variability part of this device."""
        return VariabilityModel(self.sigma_within, self.sigma_between, self.between_granularity,
                                self.distribution)

    @property
    def is_ideal(self) -> bool:
        """True when the device draws no non-ideality at all."""
        return self.build().is_ideal

    def build(self) -> Device:
        """The :class:`pimjax.devices.Device` this configuration describes."""
        if self.preset == "ideal":
            return ideal()
        return paper(self.sigma_within, self.sigma_between, self.between_granularity,
                     self.distribution)
