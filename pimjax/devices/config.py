"""A device as configuration: a preset name and its settings, turned into a Device by build()."""

from __future__ import annotations

import dataclasses
from typing import Literal

from pimjax.devices.base import Device
from pimjax.devices.presets import ideal, paper, pcm
from pimjax.devices.variability import VariabilityModel

PRESETS = ("ideal", "paper", "pcm")


@dataclasses.dataclass(frozen=True)
class DeviceConfig:
    """Which device a run simulates: a preset and its settings.

    ``paper``: the paper's within/between-chip factor (both sigmas 0: the ideal device).
    ``pcm``: aihwkit's PCM and periphery; ``sigma_between`` adds a fab-run gain (with
    ``between_granularity`` and ``distribution``), ``sigma_within`` must be 0 (the PCM model
    is the cells' variation). ``ideal`` takes no sigma.
    """

    preset: Literal["ideal", "paper", "pcm"] = "paper"
    sigma_within: float = 0.0
    sigma_between: float = 0.0
    between_granularity: Literal["chip", "layer", "column"] = "chip"
    distribution: Literal["normal", "lognormal"] = "normal"
    drift_compensation: bool = False  # pcm: aihwkit's global drift compensation
    stuck_zero: float = 0.0  # pcm: fraction of devices stuck at 0
    stuck_gmax: float = 0.0  # pcm: fraction of devices stuck at g_max
    periphery: bool = True  # pcm: DAC/ADC/output noise/tiles (False: a perfect periphery)

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"device.preset={self.preset!r} is unknown: use one of {PRESETS}")
        vm = self.variability  # validates the sigmas, granularity and distribution
        for field in ("sigma_within", "sigma_between"):
            object.__setattr__(self, field, getattr(vm, field))
        if self.preset == "ideal" and not vm.is_nominal:
            raise ValueError("device.preset='ideal' has no variation: set the sigmas to 0 or "
                             "use preset 'paper'")
        if self.preset == "pcm" and self.sigma_within:
            raise ValueError("device.preset='pcm' models the cells' variation itself: set "
                             "sigma_within to 0 (sigma_between adds a fab-run gain)")
        pcm_only = {"drift_compensation": False, "stuck_zero": 0.0, "stuck_gmax": 0.0,
                    "periphery": True}
        for field, default in pcm_only.items():
            if self.preset != "pcm" and getattr(self, field) != default:
                raise ValueError(f"device.{field} is a pcm setting: use preset 'pcm' or leave it "
                                 f"at {default}")
        self.build()  # validates the pcm settings

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
        if self.preset == "pcm":
            return pcm(self.sigma_between, self.between_granularity, self.distribution,
                       drift_compensation=self.drift_compensation, stuck_zero=self.stuck_zero,
                       stuck_gmax=self.stuck_gmax, periphery=self.periphery)
        return paper(self.sigma_within, self.sigma_between, self.between_granularity,
                     self.distribution)
