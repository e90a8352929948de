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
        try:
            vm = self.variability  # validates the sigmas, granularity and distribution
        except ValueError as e:  # name the field as the config spells it
            raise ValueError(f"device.{e}") from None
        for field in ("drift_compensation", "periphery"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"device.{field}={getattr(self, field)!r} must be True or False")
        for field in ("stuck_zero", "stuck_gmax"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"device.{field}={v!r} must be a fraction of the devices in "
                                 "[0, 1]")
        if self.stuck_zero + self.stuck_gmax > 1.0:
            raise ValueError(f"device.stuck_zero + device.stuck_gmax = "
                             f"{self.stuck_zero + self.stuck_gmax:g} must be <= 1: lower one")
        for field in ("sigma_within", "sigma_between"):
            object.__setattr__(self, field, getattr(vm, field))
        if self.preset == "ideal" and not vm.is_nominal:
            raise ValueError("device.preset='ideal' has no variation: set the sigmas to 0 or "
                             "use preset 'paper'")
        if self.preset == "pcm" and self.sigma_within:
            raise ValueError(f"device.sigma_within={self.sigma_within:g} does not apply to "
                             "preset 'pcm', whose cells vary by the PCM model: set it to 0 "
                             "(sigma_between adds a fab-run gain)")
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
