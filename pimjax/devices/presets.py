"""Named devices: ``ideal`` (no non-ideality), ``paper`` (Deng & Orshansky's model) and
``pcm`` (aihwkit 1.1's PCM with its default periphery)."""

from __future__ import annotations

from pimjax.devices.base import Device
from pimjax.devices.compensation import GlobalDriftCompensation
from pimjax.devices.faults import StuckAt
from pimjax.devices.pcm import PCM
from pimjax.devices.periphery import Periphery
from pimjax.devices.variability import VariabilityModel


def ideal() -> Device:
    """The ideal device: weights and MVMs exactly as computed digitally."""
    return Device(name="ideal")


def paper(sigma_within: float = 0.0, sigma_between: float = 0.0,
          between_granularity: str = "chip", distribution: str = "normal") -> Device:
    """The paper's device: a multiplicative within/between-chip factor on each weight."""
    vm = VariabilityModel(sigma_within, sigma_between, between_granularity, distribution)
    return from_variability(vm)


def from_variability(variability: VariabilityModel) -> Device:
    """The paper's device for a :class:`VariabilityModel` (ideal when it draws nothing)."""
    if variability.is_nominal:
        return ideal()
    return Device(weights=(variability,), name="paper")


def pcm(sigma_between: float = 0.0, between_granularity: str = "layer",
        distribution: str = "lognormal", per_column: bool = False,
        drift_compensation: bool = False, stuck_zero: float = 0.0, stuck_gmax: float = 0.0,
        periphery: bool = True) -> Device:
    """aihwkit 1.1's PCM (programming noise, drift, 1/f read noise) on differential pairs with
    its default periphery (7-bit DAC, 9-bit ADC, output noise 0.06, 512-row tiles).

    ``sigma_between``: a fab run's gain on each chip (or layer, or column) on top of the PCM
    cells; ``drift_compensation``: aihwkit's global drift compensation; ``stuck_zero`` /
    ``stuck_gmax``: fractions of devices stuck at 0 / g_max; ``periphery=False`` for a
    perfect periphery (programming, drift and read noise only).
    """
    stuck = StuckAt(stuck_zero, stuck_gmax, per_column) if stuck_zero or stuck_gmax else None
    parts = [PCM(per_column=per_column, stuck=stuck)]
    if sigma_between:
        parts.append(VariabilityModel(0.0, sigma_between, between_granularity, distribution))
    return Device(weights=tuple(parts),
                  periphery=Periphery(per_column=per_column) if periphery else None,
                  compensation=GlobalDriftCompensation() if drift_compensation else None,
                  name="pcm")
