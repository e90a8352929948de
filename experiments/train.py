"""Train a model with one of the methods fp, qat, vat, ptq, qavat.

Examples::

    python experiments/train.py --model lenet5 --dataset mnist --method qavat --quant W2A4 \\
        --sigma_within 0.3 --epochs 10 --out runs/lenet5_qavat_w2a4_s0.3
    python experiments/train.py --model lenet5 --method ptq --quant W2A4 --sigma_within 0.3 \\
        --from_checkpoint runs/lenet5_vat_s0.3 --out runs/lenet5_ptq_w2a4_s0.3

Writes config.json, metrics.json/metrics.csv and orbax checkpoints (checkpoints/, best/) into
--out; --resume continues an interrupted run from its last checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from pimjax.train import TrainConfig, train


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if text.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def _optional(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "null", "") else kind(text)
    parse.__name__ = kind.__name__
    return parse


def _arg_type(annotation: str):
    """argparse type of a TrainConfig field from its annotation (``"int | None"`` etc.)."""
    text = str(annotation).replace(" ", "")
    optional = text.endswith("|None")
    kind = {"bool": _parse_bool, "int": int, "float": float, "str": str}[text.removesuffix("|None")]
    return _optional(kind) if optional else kind


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags: one per TrainConfig field, plus the run options."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in dataclasses.fields(TrainConfig):
        parser.add_argument(f"--{field.name}", type=_arg_type(field.type), default=field.default,
                            help=f"(default: {field.default})")
    parser.add_argument("--out", required=True, help="output directory of the run")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("--stop_after", type=int, default=None,
                        help="stop after this many epochs in this call (resume later)")
    parser.add_argument("--devices", type=int, default=None,
                        help="local devices for data parallelism (default: all)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def main(argv=None) -> dict:
    """Parse flags, train, print the final metrics."""
    args = build_parser().parse_args(argv)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    try:
        config = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    except ValueError as e:
        sys.exit(f"error: {e}")
    final = train(config, args.out, resume=args.resume, stop_after=args.stop_after,
                  num_devices=args.devices, progress=not args.no_progress)
    print(f"\n{config.model} / {config.dataset} / {config.method} {config.quant} "
          f"sigma_within={config.sigma_within} sigma_between={config.sigma_between}")
    width = max(len(k) for k in final)
    for key, value in final.items():
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"  {key:<{width}}  {text}")
    return final


if __name__ == "__main__":
    main()
