"""Monte-Carlo sweep of a checkpoint over variability settings, with and without self-tuning.

For every setting of (sigma_within, sigma_between) -- a grid, or fixed totals split by a
between-chip fraction -- it evaluates N chips on the test set with no tuning and with each
self-tuning variant (the same chips for every variant and setting), then writes

* ``summary.csv``: one row per setting and variant (mean, std, min, p5/p50/p95, yields,
  drop against the nominal model, calibration cost, seconds);
* ``chips.csv``: every chip's accuracy and loss;
* ``distributions.png`` (accuracy per chip, per setting and variant) and
  ``accuracy_vs_sigma.png`` (mean and 5th percentile against total sigma);

and prints the table. Examples::

    python experiments/montecarlo.py --checkpoint runs/lenet5_qavat --chips 1000 \\
        --sigma-within 0,0.1,0.2,0.3 --sigma-between 0,0.1,0.2
    python experiments/montecarlo.py --checkpoint runs/lenet5_qavat --total 0.1,0.2,0.3 \\
        --between-fraction 0.5 --tune none,gain,channel,bn,paired
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import sys
from pathlib import Path

import jax
import numpy as np
from common import floats

from pimjax import data, montecarlo, selftune
from pimjax.variability import GRANULARITIES, VariabilityModel

TUNE_CHOICES = ("none", *selftune.METHODS)
STATS_FILE = "nominal_stats.npz"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="run directory or checkpoint directory")
    p.add_argument("--out", default=None, help="output directory (default: <checkpoint>/mc)")
    p.add_argument("--chips", type=int, default=100)
    p.add_argument("--sigma-within", type=floats, default=[0.0, 0.1, 0.2])
    p.add_argument("--sigma-between", type=floats, default=[0.0, 0.1])
    p.add_argument("--total", type=floats, default=None,
                   help="fixed total sigmas (overrides the grid); split by --between-fraction")
    p.add_argument("--between-fraction", type=floats, default=[0.5],
                   help="share(s) of the variance that is between-chip, with --total")
    p.add_argument("--granularity", default="layer", choices=GRANULARITIES)
    p.add_argument("--distribution", default="normal", choices=("normal", "lognormal"))
    p.add_argument("--tune", default="none,gain,gain_offset,channel,bn,paired",
                   help=f"comma-separated variants from {TUNE_CHOICES}")
    p.add_argument("--calib", type=int, default=256, help="unlabeled calibration images (train)")
    p.add_argument("--calib-batch", type=int, default=None,
                   help="calibration batch size (default: all in one batch = one pass)")
    p.add_argument("--limit-test", type=int, default=None, help="test images (default: all)")
    p.add_argument("--data-dir", default=None, help="dataset folder (default: the run's)")
    p.add_argument("--budget-mb", type=int, default=None, help="memory budget per device")
    p.add_argument("--thresholds", type=floats, default=[], help="absolute yield thresholds")
    p.add_argument("--seed", type=int, default=0, help="chip key (the same chips everywhere)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.tune = [t.strip() for t in args.tune.split(",") if t.strip()]
    bad = [t for t in args.tune if t not in TUNE_CHOICES]
    if bad:
        p.error(f"--tune {bad} unknown: use {TUNE_CHOICES}")
    if args.chips <= 0:
        p.error(f"--chips={args.chips} must be a positive integer")
    if args.calib <= 0:
        p.error(f"--calib={args.calib} must be a positive integer")
    return args


def settings(args) -> list[tuple[str, VariabilityModel]]:
    """The variability models to sweep, in order, each with its plot group."""
    kw = dict(between_granularity=args.granularity, distribution=args.distribution)
    if args.total is not None:
        return [(f"between fraction {f:g}", VariabilityModel.from_total(t, f, **kw))
                for f, t in itertools.product(args.between_fraction, args.total)]
    return [(f"sigma_between {b:g}", VariabilityModel(w, b, **kw))
            for b, w in itertools.product(args.sigma_between, args.sigma_within)]


def load(args):
    """Model, variables, config, test set and calibration images of the checkpoint."""
    from pimjax.checkpoint import load_model

    model, variables, config = load_model(args.checkpoint)
    try:
        montecarlo.check_variables(model, variables)
    except ValueError as e:
        raise SystemExit(f"checkpoint {args.checkpoint}: {e}") from None
    data_dir = args.data_dir or getattr(config, "data_dir", None)
    name = config.dataset
    test = data.load_dataset(name, "test", data_dir=data_dir, limit=args.limit_test)
    train = data.load_dataset(name, "train", data_dir=data_dir)
    pick = np.random.default_rng(args.seed).choice(len(train), args.calib, replace=False)
    calib = data.normalize(train.images[np.sort(pick)], name)
    return model, variables, config, test, calib


def nominal_stats(args, model, variables, calib, out: Path):
    """Load the stats saved with the checkpoint if they fit, else compute and save them."""
    for path in (Path(args.checkpoint) / STATS_FILE, out / STATS_FILE):
        if path.is_file():
            stats = selftune.load_stats(path)
            try:
                selftune.check_stats(model, stats)
            except ValueError:
                continue
            print(f"nominal stats: {path} ({stats.num_images} images)")
            return stats
    stats = selftune.nominal_stats(model, variables, calib)
    path = selftune.save_stats(out / STATS_FILE, stats)
    print(f"nominal stats: computed on {stats.num_images} calibration images, saved to {path}")
    return stats


def sigma_total(vm: VariabilityModel) -> float:
    return math.sqrt(vm.sigma_within**2 + vm.sigma_between**2)


def write_csv(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def plot(out: Path, rows: list[dict], chips: dict, variants: list[str]) -> None:
    """Accuracy distributions per setting, and mean/p5 against total sigma."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys((r["sigma_within"], r["sigma_between"]) for r in rows))
    cols = min(4, len(keys))
    nrows = -(-len(keys) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 3.0 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        vals = [100 * chips[(key, v)] for v in variants]
        ax.boxplot(vals, showfliers=True)
        ax.set_xticks(range(1, len(variants) + 1), variants, rotation=45, fontsize=7)
        ax.set_title(f"within {key[0]:g}, between {key[1]:g}", fontsize=9)
        ax.set_ylabel("accuracy (%)", fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "distributions.png", dpi=120)
    plt.close(fig)

    groups = list(dict.fromkeys(r["group"] for r in rows))
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, group in zip(axes.flat, groups, strict=True):
        for i, v in enumerate(variants):
            pts = sorted((r["sigma_total"], r["mean"], r["p5"]) for r in rows
                         if r["tune"] == v and r["group"] == group)
            s = [p[0] for p in pts]
            ax.plot(s, [100 * p[1] for p in pts], "-o", color=f"C{i}", ms=3, label=f"{v} mean")
            ax.plot(s, [100 * p[2] for p in pts], "--", color=f"C{i}", alpha=0.7,
                    label=f"{v} p5")
        ax.set_title(group, fontsize=10)
        ax.set_xlabel("total sigma")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_sigma.png", dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out) if args.out else Path(args.checkpoint) / "mc"
    out.mkdir(parents=True, exist_ok=True)
    model, variables, config, test, calib = load(args)
    needs_stats = any(t in selftune.NEEDS_STATS for t in args.tune)
    stats = nominal_stats(args, model, variables, calib, out) if needs_stats else None
    budget = None if args.budget_mb is None else args.budget_mb * 2**20
    key = jax.random.PRNGKey(args.seed)
    print(f"{config.model} {config.quant} ({config.method}) on {test.tag}: {len(test)} test "
          f"images, {args.chips} chips, {len(jax.local_devices())} device(s)")
    rows, per_chip, chip_acc = [], [], {}
    for group, vm in settings(args):
        for variant in args.tune:
            tuning = None if variant == "none" else selftune.SelfTune(
                variant, calib, stats, args.calib_batch)
            r = montecarlo.evaluate_chips(model, variables, vm, key, args.chips, test,
                                          tuning=tuning, budget_bytes=budget,
                                          progress=not args.no_progress)
            s = r.summary(thresholds=args.thresholds)
            cost = r.tune_cost
            row = dict(sigma_within=vm.sigma_within, sigma_between=vm.sigma_between,
                       sigma_total=sigma_total(vm), group=group,
                       granularity=vm.between_granularity,
                       distribution=vm.distribution, tune=variant, images=r.num_images, **s,
                       calib_images=cost.images if cost else 0,
                       passes=cost.passes if cost else 0,
                       nominal_passes=cost.nominal_passes if cost else 0,
                       seconds=round(r.seconds, 2))
            rows.append(row)
            chip_acc[((vm.sigma_within, vm.sigma_between), variant)] = r.accuracy
            for i, (a, lo) in enumerate(zip(r.accuracy, r.loss, strict=True)):
                per_chip.append(dict(sigma_within=vm.sigma_within,
                                     sigma_between=vm.sigma_between, tune=variant, chip=i,
                                     accuracy=a, loss=lo))
            print(f"  within {vm.sigma_within:.3f} between {vm.sigma_between:.3f} "
                  f"{variant:11s} mean {100 * s['mean']:6.2f}  p5 {100 * s['p5']:6.2f}  "
                  f"min {100 * s['min']:6.2f}  drop {100 * s['drop_mean']:6.2f}  "
                  f"({r.seconds:.1f}s)", flush=True)
    write_csv(out / "summary.csv", rows)
    write_csv(out / "chips.csv", per_chip)
    plot(out, rows, chip_acc, args.tune)
    print_table(rows)
    print(f"\nwrote {out / 'summary.csv'}, {out / 'chips.csv'}, {out / 'distributions.png'}, "
          f"{out / 'accuracy_vs_sigma.png'}")
    return rows


def print_table(rows: list[dict]) -> None:
    """The summary as an aligned text table (accuracies in %)."""
    head = ("within", "between", "tune", "mean", "std", "min", "p5", "p50", "p95", "drop",
            "calib", "passes")
    widths = (7, 7, 11, 6, 6, 6, 6, 6, 6, 6, 5, 6)
    print("\n" + " ".join(f"{h:>{w}s}" for h, w in zip(head, widths, strict=True)))
    for r in rows:
        vals = (f"{r['sigma_within']:.3f}", f"{r['sigma_between']:.3f}", r["tune"],
                *(f"{100 * r[k]:.2f}" for k in ("mean", "std", "min", "p5", "p50", "p95",
                                                  "drop_mean")),
                str(r["calib_images"]), str(r["passes"]))
        print(" ".join(f"{v:>{w}s}" for v, w in zip(vals, widths, strict=True)))


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
