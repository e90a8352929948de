"""Monte-Carlo sweep of a trained model over variability settings, untuned and self-tuned.

For every setting of (sigma_within, sigma_between) -- a grid, or fixed totals split by a
between-chip fraction -- it evaluates N chips on the test set (the same chips for every
setting and variant), untuned and/or after each self-tuning variant asked for with --tune.
A setting with no variation is the nominal model: it is evaluated once, not on N identical
chips. It writes into --out

* summary.csv / summary.json: one row per setting and variant (mean, std, min,
  p5/p50/p95, yields, drop against the nominal model, calibration cost, seconds);
* chips.csv: every chip's accuracy and loss;
* distributions.png (accuracy per chip, per setting and variant) and
  accuracy_vs_sigma.png (mean and 5th percentile against total sigma);

and prints the table. Calibration images are the first --calib-images training images.

    python experiments/montecarlo.py --checkpoint runs/x --chips 1000 \\
        --sigma-within 0 0.1 0.2 0.3 --sigma-between 0 0.1 0.2
    python experiments/montecarlo.py --checkpoint runs/x --total 0.1 0.2 0.3 \\
        --between-fraction 0.5 --tune none gain channel bn paired

Started once per process (--coordinator HOST:PORT --num-processes N --process-id I, or under
SLURM / on a Cloud TPU slice without them), the chips are split over every device of every
process; chip i is the same chip whatever the split, so the per-chip results are the same
as one process's. Process 0 writes the files and prints (docs/distributed.md).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Annotated

import common
import tyro

from pimjax import cli, data, distributed, files, montecarlo, selftune
from pimjax.configs import montecarlo as presets
from pimjax.train import load_model


@dataclasses.dataclass(frozen=True)
class Args:
    """The sweep's flags."""

    sweep: Annotated[presets.MonteCarlo, common.FLAT]
    checkpoint: Path
    """a run directory (or one of its checkpoint directories)"""
    out: Path | None = None
    """output folder (default: <checkpoint>/mc)"""
    progress: bool = True
    """progress bars (--no-progress: quiet)"""


def load(args: Args):
    """Model, variables, training config, test set and calibration images of the run."""
    sweep = args.sweep
    model, variables, config = load_model(args.checkpoint)
    montecarlo.check_variables(model, variables)
    name = sweep.dataset or config.data.name
    info, trained_on = data.info(name), data.info(config.data.name)
    if (tuple(info.image_shape), info.num_classes) != (tuple(trained_on.image_shape),
                                                        trained_on.num_classes):
        raise ValueError(f"--dataset {name} has {tuple(info.image_shape)} images in "
                         f"{info.num_classes} classes, the model was trained on "
                         f"{config.data.name} ({tuple(trained_on.image_shape)}, "
                         f"{trained_on.num_classes} classes): choose a compatible dataset")
    data_dir = sweep.data_dir or config.data.data_dir
    test = common.load_split(name, "test", data_dir, sweep.test_images)
    calib = (common.calibration_images(name, sweep.calib_images, data_dir)
             if sweep.tunes_chips else None)
    return model, variables, config, test, calib


def nominal_stats(args: Args, model, variables, calib, out: Path, dataset: str,
                  say=print):
    """The nominal statistics of these calibration images: read from a file saved with the
    checkpoint or by an earlier sweep if one fits, else computed and saved in ``out`` (by
    the primary process)."""
    filename = f"nominal_stats_{dataset}_{len(calib)}.npz"
    for path in (Path(args.checkpoint) / filename, out / filename):
        if path.is_file():
            stats = selftune.load_stats(path)
            try:
                selftune.check_stats(model, stats)
            except ValueError:
                continue
            say(f"nominal stats: {path} ({stats.num_images} images)")
            return stats
    stats = selftune.nominal_stats(model, variables, calib)
    if distributed.is_primary():
        path = selftune.save_stats(out / filename, stats)
        say(f"nominal stats: computed on {stats.num_images} calibration images, saved to {path}")
    return stats


def _quiet(*args, **kwargs) -> None:
    """print() of the processes other than process 0."""


def run(args: Args) -> list[dict]:
    """Sweep the settings and variants; write and return the summary rows."""
    sweep = args.sweep
    out = args.out or Path(args.checkpoint) / "mc"
    progress = args.progress and not sweep.smoke
    primary = distributed.is_primary()
    say = print if primary else _quiet
    with distributed.shared_run_lock(out):
        model, variables, config, test, calib = load(args)
        stats = None
        if any(t in selftune.NEEDS_STATS for t in sweep.tune):
            stats = nominal_stats(args, model, variables, calib, out, test.name, say)
        budget = None if sweep.budget_mb is None else sweep.budget_mb * 2**20
        key = common.chip_key(sweep.seed)
        say(f"{config.model.name} {config.quant.name} ({config.train_method}) on {test.tag}: "
              f"{len(test)} test images, {sweep.chips} chips")
        rows, per_chip, chip_acc = [], [], {}
        for setting in sweep.settings():
            vm = setting.variability
            for variant in sweep.tune:
                if vm.is_nominal and variant != "none":
                    continue  # the nominal model has nothing to tune
                tuning = None if variant == "none" else selftune.SelfTune(
                    variant, calib, stats, sweep.calib_batch)
                start = time.perf_counter()
                ev = common.evaluate(model, variables, vm, key, sweep.chips, test,
                                     tuning=tuning, budget_bytes=budget,
                                     thresholds=sweep.thresholds, progress=progress)
                s, cost = ev.summary, ev.tune_cost
                rows.append(dict(
                    sigma_within=vm.sigma_within, sigma_between=vm.sigma_between,
                    sigma_total=setting.sigma_total, group=setting.group,
                    granularity=vm.between_granularity, distribution=vm.distribution,
                    tune=variant, images=ev.num_images, **s,
                    calib_images=cost.images if cost else 0, passes=cost.passes if cost else 0,
                    nominal_passes=cost.nominal_passes if cost else 0,
                    seconds=round(time.perf_counter() - start, 2)))
                chip_acc[((vm.sigma_within, vm.sigma_between), variant)] = ev.accuracy
                per_chip += [dict(sigma_within=vm.sigma_within, sigma_between=vm.sigma_between,
                                  tune=variant, chip=i, accuracy=a, loss=lo)
                             for i, (a, lo) in enumerate(zip(ev.accuracy, ev.loss, strict=True))]
                say(f"  within {vm.sigma_within:.3f} between {vm.sigma_between:.3f} "
                      f"{variant:11s} mean {100 * s['mean']:6.2f}  p5 {100 * s['p5']:6.2f}  "
                      f"min {100 * s['min']:6.2f}  drop {100 * s['drop_mean']:6.2f}  "
                      f"({rows[-1]['seconds']:.1f}s)", flush=True)
        if not primary:
            return rows
        files.write_csv(out / "summary.csv", rows)
        files.write_json(out / "summary.json", {
            "meta": common.meta(sweep, checkpoint=args.checkpoint, dataset=test.name,
                                test_images=len(test), calib_images=0 if calib is None
                                else len(calib), model=config.to_dict()),
            "rows": rows})
        files.write_csv(out / "chips.csv", per_chip)
        plot(out, rows, chip_acc, list(sweep.tune))
    print(format_table(rows))
    print(f"\nwrote {out}/summary.csv, summary.json, chips.csv, distributions.png, "
          "accuracy_vs_sigma.png")
    return rows


def plot(out: Path, rows: list[dict], chips: dict, variants: list[str]) -> None:
    """Accuracy distributions per setting, and mean/p5 against total sigma."""
    plt = common.pyplot()
    keys = list(dict.fromkeys((r["sigma_within"], r["sigma_between"]) for r in rows))
    cols = min(4, len(keys))
    nrows = -(-len(keys) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 3.0 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        shown = [v for v in variants if (key, v) in chips]
        ax.boxplot([100 * chips[(key, v)] for v in shown], showfliers=True)
        ax.set_xticks(range(1, len(shown) + 1), shown, rotation=45, fontsize=7)
        ax.set_title(f"within {key[0]:g}, between {key[1]:g}", fontsize=9)
        ax.set_ylabel("accuracy (%)", fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    files.save_figure(fig, out / "distributions.png", dpi=120)
    plt.close(fig)

    groups = list(dict.fromkeys(r["group"] for r in rows))
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, group in zip(axes.flat, groups, strict=True):
        for i, v in enumerate(variants):
            pts = sorted((r["sigma_total"], r["mean"], r["p5"]) for r in rows
                         if r["group"] == group and (r["tune"] == v or r["sigma_total"] == 0))
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
    files.save_figure(fig, out / "accuracy_vs_sigma.png", dpi=120)
    plt.close(fig)


def format_table(rows: list[dict]) -> str:
    """The summary as an aligned text table (accuracies in %)."""
    head = ("within", "between", "tune", "chips", "mean", "std", "min", "p5", "p50", "p95",
            "drop", "calib", "passes")
    widths = (7, 7, 11, 6, 6, 6, 6, 6, 6, 6, 6, 5, 6)
    lines = ["\n" + " ".join(f"{h:>{w}s}" for h, w in zip(head, widths, strict=True))]
    for r in rows:
        vals = (f"{r['sigma_within']:.3f}", f"{r['sigma_between']:.3f}", r["tune"],
                str(r["chips"]),
                *(f"{100 * r[k]:.2f}" for k in ("mean", "std", "min", "p5", "p50", "p95",
                                                  "drop_mean")),
                str(r["calib_images"]), str(r["passes"]))
        lines.append(" ".join(f"{v:>{w}s}" for v, w in zip(vals, widths, strict=True)))
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    """Run the sweep from the command line (``argv``: default sys.argv)."""
    return cli.run(run, Args, argv, description=__doc__, default=lambda argv: Args(
        presets.montecarlo(cli.has_flag(argv, "--smoke")), tyro.MISSING))


if __name__ == "__main__":
    main()
