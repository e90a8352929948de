"""Accuracy against read time: chips read seconds to years after programming, uncompensated,
with aihwkit's global drift compensation, or self-tuned on the drifted chip.

A *compensation* (:data:`COMPENSATIONS`) is what a chip does about conductance drift:

========== ==========================================================================
``none``   nothing: the drifted chip as it reads
``drift``  aihwkit 1.1's global drift compensation (``devices.GlobalDriftCompensation``):
           each layer rescales its outputs by ``baseline / readout`` of a reference read
``gain``,  label-free self-tuning (:mod:`pimjax.selftune`) of the *uncompensated* chip at its
``...``    read time, on unlabeled calibration images (``selftune.TUNE_VARIANTS``)
========== ==========================================================================

:func:`evaluate_drift` scores one (compensation, read time) point on N chips with
:func:`pimjax.montecarlo.evaluate_chips`. Chip ``i`` is drawn from ``fold_in(key, i)`` at every
point, so all points see the same physical chips (common random numbers): a difference
between compensations or times is not a different draw of chips.
"""

from __future__ import annotations

import dataclasses
import math

from pimjax import devices, montecarlo, selftune

COMPENSATIONS = ("none", "drift", *selftune.TUNE_VARIANTS)
YEAR = 365 * 86400.0
TIMES = {"1 s": 1.0, "1 h": 3600.0, "1 day": 86400.0, "1 month": 30 * 86400.0, "1 year": YEAR,
         "10 years": 10 * YEAR}  # the default read times (seconds since programming)


def check_compensation(name: str) -> None:
    """Raise ValueError unless ``name`` is one of :data:`COMPENSATIONS`."""
    if name not in COMPENSATIONS:
        raise ValueError(f"compensation={name!r} is unknown: use one of {COMPENSATIONS}")


def time_label(seconds: float) -> str:
    """A read time as text: ``"1 day"``, ``"10 years"``, ``"2.5 h"``, ``"0.5 s"``."""
    for label, value in TIMES.items():
        if math.isclose(seconds, value):
            return label
    for unit, size in (("years", YEAR), ("days", 86400.0), ("h", 3600.0)):
        if seconds >= size:
            return f"{seconds / size:g} {unit}"
    return f"{seconds:g} s"


def compensated(device: devices.Device, compensation: str, calib=None,
                stats: selftune.NominalStats | None = None
                ) -> tuple[devices.Device, selftune.SelfTune | None]:
    """The device and self-tuning recipe of a compensation of ``device``'s chips.

    ``none`` and the self-tuning variants use ``device`` without a compensation part; ``drift``
    adds :class:`pimjax.devices.GlobalDriftCompensation`. A self-tuning variant needs the
    calibration images ``calib`` (and ``stats`` for ``gain``, ``gain_offset``, ``channel``).
    """
    check_compensation(compensation)
    if compensation == "drift":
        return dataclasses.replace(device, compensation=devices.GlobalDriftCompensation()), None
    plain = dataclasses.replace(device, compensation=None)
    if compensation == "none":
        return plain, None
    if calib is None:
        raise ValueError(f"compensation={compensation!r} self-tunes each chip: pass the "
                         "calibration images (calib=)")
    return plain, selftune.SelfTune(compensation, calib, stats)


def evaluate_drift(model, variables, device: devices.Device, compensation: str, t: float, key,
                   num_chips: int, dataset, *, calib=None,
                   stats: selftune.NominalStats | None = None, **kwargs
                   ) -> tuple[dict, montecarlo.ChipResults]:
    """One point of the drift table: ``num_chips`` chips of ``device`` read at ``t`` seconds
    with ``compensation``. Returns a row (the summary of :meth:`ChipResults.summary`: mean,
    std, min, p5, ..., ``se``; with the compensation, the read time, the calibration cost and
    the seconds it took) and the sweep's :class:`pimjax.montecarlo.ChipResults` (per-chip and
    per-image accuracies, for paired differences between points).

    ``kwargs`` go to :func:`pimjax.montecarlo.evaluate_chips` (chunk sizes, ``progress``, ...).
    """
    dev, tuning = compensated(device, compensation, calib, stats)
    res = montecarlo.evaluate_chips(model, variables, dev, key, num_chips, dataset,
                                    tuning=tuning, t=t, **kwargs)
    cost = res.tune_cost
    row = {"compensation": compensation, "t": float(t), "time": time_label(t),
           **res.summary(),
           "calib_images": cost.images if cost else 0,
           "calib_passes": cost.passes if cost else 0,
           "seconds": res.seconds}
    return row, res
