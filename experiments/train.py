"""Train a model with one of the methods fp, qat, vat, ptq, qavat.

Every field of pimjax.train.TrainConfig is a flag (nested ones as --optim.lr, --quant.weight-bits,
--device.sigma-within, ...); --setup picks the model, dataset and training recipe the other
flags start from (see pimjax.configs.setups).

    python experiments/train.py --out runs/lenet5_qavat --train-method qavat \\
        --quant.weight-bits 2 --quant.act-bits 4 --device.sigma-within 0.3 --optim.epochs 10
    python experiments/train.py --out runs/lenet5_ptq --train-method ptq \\
        --quant.weight-bits 2 --quant.act-bits 4 --device.sigma-within 0.3 \\
        --ptq.from-checkpoint runs/lenet5_vat
    python experiments/train.py --setup vgg11 --out runs/vgg11_qat --train-method qat \\
        --quant.weight-bits 4 --quant.act-bits 8      # the paper's recipe (a GPU job)

Writes config.json, metrics.json/metrics.csv and orbax checkpoints (checkpoints/, best/) into
--out; --resume continues an interrupted run from its last checkpoint.

Data-parallel over every device of every process: started once per process with
--coordinator HOST:PORT --num-processes N --process-id I (or under SLURM / on a Cloud TPU
slice, without them), each process reads its own rows of every batch; --out must be a
folder every process sees. Process 0 writes the files and prints (docs/distributed.md).
"""

from __future__ import annotations

import sys

from pimjax import cli

if __name__ == "__main__":  # a locked --out is refused now, not after the imports of JAX below
    cli.lock_early(sys.argv[1:])

import dataclasses
import errno
from pathlib import Path
from typing import Annotated

import common
import tyro

from pimjax import distributed
from pimjax.configs import setups
from pimjax.train import TrainConfig, train


@dataclasses.dataclass(frozen=True)
class Args:
    """The training run's config and how to run it."""

    config: Annotated[TrainConfig, common.FLAT]
    out: Path
    """output directory of the run"""
    setup: setups.SetupName = "lenet5"
    """model, dataset and training recipe the other flags' defaults come from"""
    resume: bool = False
    """continue from the last checkpoint in --out"""
    restart: bool = False
    """discard the checkpoints and metrics in --out and train from the start"""
    stop_after: int | None = None
    """stop after this many epochs in this call (continue later with --resume)"""
    devices: int | None = None
    """devices per process for data parallelism (default: all)"""
    progress: bool = True
    """progress bars and per-epoch lines (--no-progress: quiet)"""
    smoke: bool = False
    """seconds-long run on tiny data (tests); changes only the defaults of flags not given"""

    def __post_init__(self):
        if isinstance(self.out, Path) and self.out.exists() and not self.out.is_dir():
            raise FileExistsError(errno.EEXIST, "--out is a file, not a folder", str(self.out))
        for field in ("stop_after", "devices"):
            value = getattr(self, field)
            if value is not None and (isinstance(value, bool) or value < 1):
                raise ValueError(f"--{field.replace('_', '-')}={value} must be an integer >= 1")
        n, batch = self.config.data.train_images, self.config.optim.batch_size
        if n is not None and n < batch:
            raise ValueError(f"--data.train-images {n} is below --optim.batch-size {batch}: an "
                             "epoch would have no step")


def defaults(argv: list[str]) -> Args:
    """The defaults: a float run of --setup (with --smoke, tiny sizes)."""
    setup = cli.flag_value(argv, "--setup") or "lenet5"
    smoke = cli.has_flag(argv, "--smoke")
    return Args(setups.train(setup, smoke), tyro.MISSING, setup=setup, smoke=smoke)


def run(args: Args) -> dict:
    """Train, print and return the final metrics."""
    config = args.config
    setup = setups.get(args.setup)
    primary = distributed.is_primary()
    if setup.paper_size and primary:
        model = config.model.build(config.num_classes, config.quant)
        n = config.data.train_images or config.data.info.train_size
        print(common.estimate(model, 1, n * config.optim.epochs, 0), flush=True)
    result = train(config, workdir=args.out, resume=args.resume, restart=args.restart,
                   stop_after=args.stop_after, num_devices=args.devices, progress=args.progress)
    final = result.summary
    if not primary:
        return final
    print(f"\n{config.model.name} / {config.data.name} / {config.train_method} "
          f"{config.quant.name} sigma_within={config.device.sigma_within} "
          f"sigma_between={config.device.sigma_between}")
    width = max(len(k) for k in final)
    for key, value in final.items():
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"  {key:<{width}}  {text}")
    return final


def main(argv=None) -> dict:
    """Train from the command line (``argv``: default sys.argv)."""
    return cli.run(run, Args, argv, default=defaults, description=__doc__,
                   interrupted=interrupted)


def interrupted(args: Args) -> str:
    """What a Ctrl-C leaves, and how to continue."""
    return (f"{args.out} keeps the checkpoints of the epochs finished so far: continue with "
            "the same command and --resume")


if __name__ == "__main__":
    main()
