"""Checks shared by the experiment configs: each raises ValueError naming the flag and the fix."""

from __future__ import annotations

import math

from pimjax.train.config import check_int


def flag(field: str) -> str:
    """The command-line flag of a config field: ``test_images`` -> ``--test-images``."""
    return "--" + field.replace("_", "-")


def positive(field: str, value, allow_none: bool = False) -> None:
    """Raise unless ``value`` is an integer >= 1 (or None when allowed)."""
    if value is None and allow_none:
        return
    check_int(flag(field), value, 1)


def sigmas(field: str, values, allow_empty: bool = False) -> None:
    """Raise unless ``values`` are finite numbers >= 0 (and, unless allowed, not empty)."""
    if not values and not allow_empty:
        raise ValueError(f"{flag(field)} is empty: give at least one value")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{flag(field)} has {v!r}: sigmas are finite numbers >= 0")


def positive_sigma(field: str, value, why: str) -> None:
    """Raise unless ``value`` is a finite sigma > 0; ``why`` says what needs it positive."""
    sigmas(field, (value,))
    if value <= 0:
        raise ValueError(f"{flag(field)} must be > 0: {why}")


def fractions(field: str, values) -> None:
    """Raise unless ``values`` are numbers in [0, 1] (and not empty)."""
    if not values:
        raise ValueError(f"{flag(field)} is empty: give at least one value")
    bad = [v for v in values if not (isinstance(v, (int, float)) and 0 <= v <= 1)]
    if bad:
        raise ValueError(f"{flag(field)} has {bad}: values must be in [0, 1]")


def choices(field: str, values, allowed) -> None:
    """Raise unless ``values`` is a non-empty list of distinct members of ``allowed``."""
    if not values:
        raise ValueError(f"{flag(field)} is empty: use some of {tuple(allowed)}")
    bad = [v for v in values if v not in allowed]
    if bad:
        raise ValueError(f"{flag(field)} has {bad}: use some of {tuple(allowed)}")
    if len(set(values)) != len(values):
        raise ValueError(f"{flag(field)} repeats a value: {tuple(values)}")
