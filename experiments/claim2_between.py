"""Claim 2: between-chip variation costs a variability-aware (qavat) model accuracy.

A qavat model (trained with within-chip variation ``--train-sigma``) is evaluated on chips
whose fixed total sigma is split between a within-chip and a between-chip component
(``VariabilityModel.from_total``: the between fraction is the between share of the
variance, 0 -> 1), for between granularity ``chip`` and ``layer``. Reports the mean and p5
accuracy drop against the nominal (variation-free) model.

    python experiments/claim2_between.py --smoke          # seconds (tests)
    python experiments/claim2_between.py                  # LeNet-5/MNIST, CPU-sized
    python experiments/claim2_between.py --dataset fashion_mnist
    python experiments/claim2_between.py --setup vgg11-narrow --sigma-total 0.3

Writes claim2.json/.csv, claim2_table.txt and claim2.png into --out, and one JSON per
evaluation into <out>/evals/. The training and the evaluations are independent cells
(experiments/grid.py): --shard I/N computes every N-th of them, and the shard that finishes
last, or a later --merge, writes the tables.
"""

from __future__ import annotations

import sys

import grid

from pimjax import cli

if __name__ == "__main__":  # a locked --out is refused now, not after the imports of JAX below
    grid.lock_early(sys.argv[1:])

import dataclasses
from typing import Annotated

import common

from pimjax.configs import claims


@dataclasses.dataclass(frozen=True)
class Args:
    """Claim 2's flags."""

    claim: Annotated[claims.Between, common.FLAT]
    output: Annotated[common.Output, common.FLAT] = common.Output()


def run(args: Args) -> list[dict] | None:
    """Train (or reuse) the qavat model, sweep the between fraction; write and return rows."""
    return common.run_between(args.claim, args.output, "claim2", ("none",), "")


def main(argv=None) -> list[dict] | None:
    """Run claim 2 from the command line (``argv``: default sys.argv) and print its table."""
    return cli.run(run, Args, argv, default=common.claim_defaults(Args, claims.claim2),
                   description=__doc__, interrupted=grid.interrupted)


if __name__ == "__main__":
    main()
