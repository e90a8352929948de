"""Analog devices: frozen dataclasses of pure parts; a chip is one sample, a pytree.

See :mod:`pimjax.devices.base` for the part protocol and the chip layout.
"""

from pimjax.devices.base import (
    ChipLayer,
    Device,
    at_time,
    chip_keys,
    is_chip_layer,
    num_chips,
    part_key,
    sample_chip,
    sample_chips,
)
from pimjax.devices.config import PRESETS, DeviceConfig
from pimjax.devices.presets import from_variability, ideal, paper
from pimjax.devices.variability import (
    DISTRIBUTIONS,
    GRANULARITIES,
    VariabilityModel,
    between_factors,
    sign_flipped,
)

__all__ = [
    "DISTRIBUTIONS", "GRANULARITIES", "PRESETS", "ChipLayer", "Device", "DeviceConfig",
    "VariabilityModel", "at_time", "between_factors", "chip_keys", "from_variability", "ideal",
    "is_chip_layer", "num_chips", "paper", "part_key", "sample_chip", "sample_chips",
    "sign_flipped",
]
