"""Claim 3: label-free self-tuning recovers the accuracy between-chip variation costs.

The claim-2 sweep (a qavat model on chips whose fixed total sigma is split between within-
and between-chip components, granularity ``chip`` and ``layer``), evaluated untuned and
after each self-tuning variant of pimjax.selftune (gain, gain_offset, channel, bn, paired),
with the calibration cost per chip (unlabeled images, forward passes). The model is the
claim-2 model: with the same --runs folder it is trained once for both claims.

    python experiments/claim3_selftune.py --smoke          # seconds (tests)
    python experiments/claim3_selftune.py                  # LeNet-5/MNIST, CPU-sized
    python experiments/claim3_selftune.py --tunes none channel bn --calib-images 128

Writes claim3.json/.csv, claim3_table.txt and claim3.png into --out, and one JSON per
evaluation into <out>/evals/. --shard I/N and --merge split the cells over jobs as in
claim 2 (experiments/grid.py).
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
    """Claim 3's flags."""

    claim: Annotated[claims.Claim3, common.FLAT]
    output: Annotated[common.Output, common.FLAT] = common.Output()


def run(args: Args) -> list[dict] | None:
    """Train (or reuse) the qavat model, sweep fractions x variants; write and return rows."""
    c = args.claim
    return common.run_between(c, args.output, "claim3", c.tunes,
                              f"self-tuning with {c.calib_images} calibration images, ",
                              c.calib_images)


def main(argv=None) -> list[dict] | None:
    """Run claim 3 from the command line (``argv``: default sys.argv) and print its table."""
    return cli.run(run, Args, argv, default=common.claim_defaults(Args, claims.claim3),
                   description=__doc__, interrupted=grid.interrupted)


if __name__ == "__main__":
    main()
