"""Analog devices: frozen dataclasses of pure parts; a chip is one sample, a pytree.

See :mod:`pimjax.devices.base` for the part protocol and the chip layout.
"""

from pimjax.devices.base import (
    EVAL_READS,
    TUNE_READS,
    ChipLayer,
    Device,
    at_time,
    chip_device,
    chip_keys,
    fold_keys,
    is_chip_layer,
    num_chips,
    part_key,
    read_keys,
    sample_chip,
    sample_chips,
    stored_read_keys,
    with_read_keys,
)
from pimjax.devices.compensation import GlobalDriftCompensation
from pimjax.devices.config import PRESETS, DeviceConfig
from pimjax.devices.faults import StuckAt
from pimjax.devices.pcm import PCM
from pimjax.devices.periphery import Periphery
from pimjax.devices.presets import from_variability, ideal, paper, pcm
from pimjax.devices.variability import (
    DISTRIBUTIONS,
    GRANULARITIES,
    VariabilityModel,
    between_factors,
)

__all__ = [
    "DISTRIBUTIONS", "EVAL_READS", "GRANULARITIES", "PCM", "PRESETS", "TUNE_READS", "ChipLayer",
    "Device", "DeviceConfig", "GlobalDriftCompensation", "Periphery", "StuckAt",
    "VariabilityModel", "at_time", "between_factors", "chip_device", "chip_keys", "fold_keys",
    "from_variability", "ideal", "is_chip_layer", "num_chips", "paper", "part_key", "pcm",
    "read_keys", "sample_chip", "sample_chips", "stored_read_keys",
    "with_read_keys",
]
