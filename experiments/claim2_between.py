"""Claim 2: between-chip variation costs a variability-aware (qavat) model accuracy.

A qavat model (trained with within-chip variation ``--train-sigma``) is evaluated on chips
whose fixed total sigma is split between a within-chip and a between-chip component
(``VariabilityModel.from_total``: the between fraction is the between share of the
variance, 0 -> 1), for between granularity ``chip`` and ``layer``. Reports the mean and p5
accuracy drop against the nominal (variation-free) model.

    python experiments/claim2_between.py --smoke          # seconds (tests)
    python experiments/claim2_between.py                  # LeNet-5/MNIST, CPU-sized
    python experiments/claim2_between.py --setup vgg11-narrow --sigma-total 0.3

Writes ``claim2.json``/``claim2.csv``, ``claim2_table.txt`` and ``claim2.png`` into
``--out``.
"""

from __future__ import annotations

import argparse
import time

import common


def parse_args(argv=None):
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_between_args(p, "results/claim2")
    return common.finish_between_args(p, p.parse_args(argv))


def run(args, progress: bool = True) -> list[dict]:
    """Train (or reuse) the qavat model, sweep the between fraction; write and return rows."""
    return common.run_between(args, "claim2", ("none",), "", progress)


def main(argv=None) -> None:
    """Run claim 2 and print its table."""
    args = parse_args(argv)
    start = time.perf_counter()
    rows = run(args, progress=not args.smoke)
    common.report_between(args, rows, "claim2", time.perf_counter() - start)


if __name__ == "__main__":
    main()
