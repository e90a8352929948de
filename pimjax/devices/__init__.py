"""Devices: the analog weight and periphery non-idealities of a chip (see docs/devices.md)."""
