"""Quickstart: QAT vs QAVAT LeNet-5 W2A4 on 1000 simulated chips, before and after self-tuning.

On the MNIST copy bundled with pimjax (offline), trains LeNet-5 W2A4 with qat
(variability-oblivious) and with qavat (sigma_within 0.3), samples 1000 chips with within-
and between-chip variation, evaluates every chip, self-tunes every chip (label-free,
per-channel gain and offset) and evaluates again. Prints a table; writes results.json,
results.csv and quickstart.png into --out. Finished trainings are reused.

    python experiments/quickstart.py             # the defaults: under 5 minutes on 2 CPU cores
    python experiments/quickstart.py --epochs 10 --train-images 60000 --test-images 10000
    python experiments/quickstart.py --smoke     # seconds (tests)

Runs on several processes as every script does (--coordinator/--num-processes/--process-id,
see docs/distributed.md): trainings data-parallel, chips split over every device.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Annotated

import common
import numpy as np

from pimjax import cli, distributed, files, montecarlo, selftune
from pimjax.configs import quickstart as presets

DATASET = "mnist"  # bundled with pimjax: no data folder, no network


@dataclasses.dataclass(frozen=True)
class Args:
    """The quickstart's flags."""

    quickstart: Annotated[presets.Quickstart, common.FLAT]
    out: Path | None = None
    """output folder (default: runs/quickstart; with --smoke runs/smoke/quickstart)"""
    progress: bool = True
    """progress bars (--no-progress: quiet)"""


def run(args: Args) -> list[dict]:
    """Train both methods, sweep the chips before and after self-tuning; return table rows."""
    q = args.quickstart
    out = args.out or Path("runs/smoke/quickstart" if q.smoke else "runs/quickstart")
    progress = args.progress and not q.smoke
    start = time.perf_counter()
    with distributed.shared_run_lock(out):
        device = q.device.build()
        test = common.load_split(DATASET, "test", None, q.test_images)
        calib = common.calibration_images(DATASET, q.calib_images, None)
        key = common.chip_key(q.seed)  # the same chips for every model and variant
        rows, per_chip = [], {}
        for method in ("qat", "qavat"):
            trained = common.train_or_load(q.train_config(method), out / "runs", progress)
            model, variables = trained.model, trained.variables
            stats = selftune.nominal_stats(model, variables, calib)
            tuning = selftune.SelfTune(q.tune, calib, stats)
            for tuned in (False, True):
                res = montecarlo.evaluate_chips(model, variables, device, key, q.chips, test,
                                                tuning=tuning if tuned else None,
                                                progress=progress)
                s = res.summary()
                per_chip[f"{method} {'+ ' + q.tune if tuned else '(untuned)'}"] = res.accuracy
                rows.append({
                    "method": method, "self_tune": q.tune if tuned else "none",
                    "nominal": s["nominal"], "mean": s["mean"], "p5": s["p5"], "min": s["min"],
                    "std": s["std"], "drop_mean": s["drop_mean"], "chips": s["chips"],
                    "test_images": res.num_images,
                    "train_images": trained.summary.get("train_images"),
                    "calib_cost": str(res.tune_cost) if res.tune_cost else "",
                    "chip_images_per_s": res.chip_images_per_second,
                })
        if not distributed.is_primary():  # process 0 writes and prints
            return rows
        common.write_results(out, "results", rows,
                             common.meta(q, device=q.device, data=f"{DATASET} (bundled)"))
        plot(q, per_chip, out / "quickstart.png")
    report(q, rows, out, time.perf_counter() - start)
    return rows


def plot(q: presets.Quickstart, per_chip: dict, path: Path) -> None:
    """Histograms of per-chip accuracy, one per model and variant."""
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(min(float(np.min(a)) for a in per_chip.values()), 1.0, 41)
    for label, acc in per_chip.items():
        ax.hist(acc, bins=bins, alpha=0.55, label=label)
    ax.set_xlabel("per-chip test accuracy")
    ax.set_ylabel("chips")
    ax.set_title(f"LeNet-5 {q.quant}, {q.chips} chips, sigma_within {q.sigma_within}, "
                 f"sigma_between {q.sigma_between} ({q.granularity})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    files.save_figure(fig, path, dpi=120)
    plt.close(fig)


def format_table(rows) -> str:
    """The printed results table."""
    return common.text_table(rows, (
        ("method", "method", 8, "text"), ("self-tune", "self_tune", 11, "text"),
        ("nominal", "nominal", 9, "pct"), ("mean", "mean", 8, "pct"), ("p5", "p5", 8, "pct"),
        ("min", "min", 8, "pct"), ("drop", "drop_mean", 8, "pct")))


def report(q: presets.Quickstart, rows, out: Path, seconds: float) -> None:
    """Print the table, the self-tuning cost and the files written."""
    print()
    print(f"LeNet-5 {q.quant} on MNIST ({rows[0]['test_images']} test images), {q.chips} chips: "
          f"sigma_within {q.sigma_within}, sigma_between {q.sigma_between} "
          f"({q.granularity}); accuracy in %")
    print(format_table(rows))
    cost = next((r["calib_cost"] for r in rows if r["calib_cost"]), "")
    print(f"self-tuning cost per chip: {cost}")
    print(f"wrote {out}/results.json, results.csv, quickstart.png ({seconds:.0f} s)")


def main(argv=None) -> list[dict]:
    """Run the quickstart from the command line (``argv``: default sys.argv)."""
    return cli.run(run, Args, argv, description=__doc__,
                   default=lambda argv: Args(presets.quickstart(cli.has_flag(argv, "--smoke"))))


if __name__ == "__main__":
    main()
