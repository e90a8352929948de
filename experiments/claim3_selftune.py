"""Claim 3: label-free self-tuning recovers the accuracy between-chip variation costs.

The claim-2 sweep (a qavat model on chips whose fixed total sigma is split between within-
and between-chip components, granularity ``chip`` and ``layer``), evaluated untuned and
after each self-tuning variant of :mod:`pimjax.selftune` (gain, gain_offset, channel, bn,
paired), with the calibration cost per chip (unlabeled images, forward passes).

    python experiments/claim3_selftune.py --smoke          # seconds (tests)
    python experiments/claim3_selftune.py                  # LeNet-5/MNIST, CPU-sized
    python experiments/claim3_selftune.py --tunes channel,bn --calib-images 128

Writes ``claim3.json``/``claim3.csv``, ``claim3_table.txt`` and ``claim3.png`` into
``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time

import common

from pimjax import selftune


def parse_args(argv=None):
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_between_args(p, "results/claim3")
    p.add_argument("--tunes", type=lambda s: tuple(s.split(",")),
                   default=("none", *selftune.METHODS),
                   help=f"self-tuning variants: none and/or {selftune.METHODS}")
    args = p.parse_args(argv)
    bad = [t for t in args.tunes if t != "none" and t not in selftune.METHODS]
    if bad:
        p.error(f"--tunes {bad} unknown: use none and/or {selftune.METHODS}")
    if args.smoke and "--tunes" not in (sys.argv[1:] if argv is None else argv):
        args.tunes = ("none", "channel", "bn")
    return common.finish_between_args(p, args)


def run(args, progress: bool = True) -> list[dict]:
    """Train (or reuse) the qavat model, sweep fractions x tune variants; write and return rows."""
    return common.run_between(args, "claim3", args.tunes,
                              f"self-tuning with {args.calib_images} calibration images, ",
                              progress)


def main(argv=None) -> None:
    """Run claim 3 and print its table."""
    args = parse_args(argv)
    start = time.perf_counter()
    rows = run(args, progress=not args.smoke)
    common.report_between(args, rows, "claim3", time.perf_counter() - start,
                          f", {args.calib_images} calibration images")


if __name__ == "__main__":
    main()
