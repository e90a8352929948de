"""Named devices: ``ideal`` (no non-ideality) and ``paper`` (Deng & Orshansky's model)."""

from __future__ import annotations

from pimjax.devices.base import Device
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
