"""Quickstart: the paper's three claims on LeNet-5 W2A4 and bundled MNIST, in minutes.

On the MNIST copy bundled with pimjax (offline) it trains LeNet-5 W2A4 with qat
(variability-oblivious), ptq (a float model trained under variation, quantized after
training) and qavat (quantized and trained under within-chip variation), draws the same
chips for every row and scores each chip on the same test images:

1. every method on chips with within-chip variation: qavat beats qat and ptq (claim 1);
2. qavat on chips that add between-chip variation: it loses accuracy its training does not
   recover (claim 2);
3. the same chips after label-free self-tuning (per-channel gain and offset): the loss is
   recovered (claim 3).

It prints the table and each claim's margin, a paired difference on the same chips and
images with its standard error, and writes results.json, results.csv and quickstart.png
into --out. Finished trainings are reused.

    python experiments/quickstart.py             # the defaults: about 100 s on 2 idle CPU cores
    python experiments/quickstart.py --no-ptq --sigma-within 0.4
    python experiments/quickstart.py --smoke     # seconds (tests)

Runs on several processes as every script does (--coordinator/--num-processes/--process-id,
see docs/distributed.md): trainings data-parallel, chips split over every device.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pimjax import cli


def default_out(smoke: bool) -> Path:
    """The output folder without --out."""
    return Path("runs/smoke/quickstart" if smoke else "runs/quickstart")


if __name__ == "__main__":  # a locked --out is refused now, not after the imports of JAX below
    cli.lock_early(sys.argv[1:], default=default_out(cli.has_flag(sys.argv[1:], "--smoke")))

import dataclasses
import time
from typing import Annotated

import common
import numpy as np

from pimjax import distributed, files, montecarlo, selftune
from pimjax.configs import quickstart as presets

DATASET = "mnist"  # bundled with pimjax: no data folder, no network
WITHIN, BETWEEN = "within", "+between"  # the two kinds of chips (claims 1 and 2-3)


@dataclasses.dataclass(frozen=True)
class Args:
    """The quickstart's flags."""

    quickstart: Annotated[presets.Quickstart, common.FLAT]
    out: Path | None = None
    """output folder (default: runs/quickstart; with --smoke runs/smoke/quickstart)"""
    progress: bool = True
    """progress bars (--no-progress: quiet)"""


def train_models(q: presets.Quickstart, runs: Path, progress: bool) -> dict:
    """The trained (or reused) model of every method: {method: common.Run}."""
    models = {}
    for method in q.methods:
        if method == "ptq":  # quantize a float model trained under variation (vat)
            source = common.train_or_load(q.train_config("vat"), runs, progress)
            models[method] = common.train_or_load(q.train_config("ptq", str(source.workdir)),
                                                  runs, progress)
        else:
            models[method] = common.train_or_load(q.train_config(method), runs, progress)
    return models


def run(args: Args) -> tuple[list[dict], list[dict]]:
    """Train, sweep the chips, self-tune them; return the table's rows and the claims."""
    q = args.quickstart
    out = args.out or default_out(q.smoke)
    progress = args.progress and not q.smoke
    start, cpu = time.perf_counter(), time.process_time()
    with distributed.shared_run_lock(out):
        test = common.load_split(DATASET, "test", None, q.test_images)
        calib = common.calibration_images(DATASET, q.calib_images, None)
        key = common.chip_key(q.seed)  # the same chips for every row
        models = train_models(q, out / "runs", progress)
        within, device = q.within.build(), q.device.build()
        results = {}  # (method, chips, self-tune) -> montecarlo.ChipResults

        def sweep(method, kind, tuning=None):
            m = models[method]
            res = montecarlo.evaluate_chips(
                m.model, m.variables, within if kind == WITHIN else device, key, q.chips, test,
                tuning=tuning, progress=progress)
            results[(method, kind, tuning.variant if tuning else "none")] = res

        for method in q.methods:
            sweep(method, WITHIN)
        sweep("qavat", BETWEEN)
        qavat = models["qavat"]
        stats = (selftune.nominal_stats(qavat.model, qavat.variables, calib)
                 if q.tune in selftune.NEEDS_STATS else None)
        sweep("qavat", BETWEEN, selftune.SelfTune(q.tune, calib, stats))
        rows = [row(q, k, r, models[k[0]]) for k, r in results.items()]
        found = claims(q, results)
        if not distributed.is_primary():  # process 0 writes and prints
            return rows, found
        meta = common.meta(q, within=q.within, device=q.device, data=f"{DATASET} (bundled)")
        common.write_results(out, "results", rows, dict(meta, claims=found))
        plot(q, results, out / "quickstart.png")
    report(q, rows, found, out, time.perf_counter() - start, time.process_time() - cpu)
    return rows, found


def row(q: presets.Quickstart, key: tuple, res: montecarlo.ChipResults, model) -> dict:
    """One row of the table: a model on one kind of chips, untuned or self-tuned."""
    method, kind, tune = key
    s = res.summary()
    return {
        "method": method, "chips_kind": kind, "self_tune": tune,
        "sigma_within": q.sigma_within, "sigma_between": q.sigma_between if kind == BETWEEN
        else 0.0, "granularity": q.granularity if kind == BETWEEN else "",
        "nominal": s["nominal"], "nominal_tuned": s.get("nominal_tuned"),
        "mean": s["mean"], "se": s["se"], "p5": s["p5"], "min": s["min"], "std": s["std"],
        "drop_mean": s["drop_mean"], "drop_mean_tuned": s.get("drop_mean_tuned"),
        "chips": s["chips"], "test_images": res.num_images,
        "train_images": model.summary.get("train_images"),
        "calib_cost": str(res.tune_cost) if res.tune_cost else "",
        "chip_images_per_s": res.chip_images_per_second,
    }


def claims(q: presets.Quickstart, results: dict) -> list[dict]:
    """Each claim's margin: a difference of mean accuracy on the same chips and images, with
    its standard error (:func:`pimjax.montecarlo.difference`)."""
    found = []

    def margin(claim, what, a, b):
        value, se = montecarlo.difference(results[a], results[b])
        found.append({"claim": claim, "what": what, "margin": value, "se": se,
                      "z": value / se if se > 0 else None})

    for alt in q.methods[:-1]:
        margin("1", f"qavat - {alt}, chips with within-chip variation",
               ("qavat", WITHIN, "none"), (alt, WITHIN, "none"))
    margin("2", "qavat, within-chip only - within+between (untuned)",
           ("qavat", WITHIN, "none"), ("qavat", BETWEEN, "none"))
    margin("3", f"qavat within+between, self-tuned ({q.tune}) - untuned",
           ("qavat", BETWEEN, q.tune), ("qavat", BETWEEN, "none"))
    margin("3", f"qavat within+between, self-tuned ({q.tune}) - within-chip only (untuned)",
           ("qavat", BETWEEN, q.tune), ("qavat", WITHIN, "none"))
    return found


def plot(q: presets.Quickstart, results: dict, path: Path) -> None:
    """Histograms of per-chip accuracy, one per row of the table."""
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4))
    lo = min(float(np.min(r.accuracy)) for r in results.values())
    bins = np.linspace(lo, 1.0, 41)
    for (method, kind, tune), res in results.items():
        label = f"{method}, {kind}" + ("" if tune == "none" else f", {tune}-tuned")
        ax.hist(res.accuracy, bins=bins, alpha=0.5, label=label)
    ax.set_xlabel("per-chip test accuracy")
    ax.set_ylabel("chips")
    ax.set_title(f"LeNet-5 {q.quant}, {q.chips} chips: sigma_within {q.sigma_within}, "
                 f"+between: sigma_between {q.sigma_between} ({q.granularity})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    files.save_figure(fig, path, dpi=120)
    plt.close(fig)


def format_table(rows) -> str:
    """The printed results table (accuracy in %)."""
    return common.text_table(rows, (
        ("method", "method", 8, "text"), ("chips", "chips_kind", 10, "text"),
        ("self-tune", "self_tune", 10, "text"), ("nominal", "nominal", 8, "pct"),
        ("mean", "mean", 8, "pct"), ("se", "se", 6, "pct"), ("p5", "p5", 8, "pct"),
        ("min", "min", 8, "pct"), ("drop", "drop_mean", 8, "pct"),
        ("drop t", "drop_mean_tuned", 8, "pct")))


def format_claims(found) -> str:
    """The claims' margins, one line each (points, with the standard error)."""
    return "\n".join(f"  claim {c['claim']}: {c['what']}: {100 * c['margin']:+.2f} "
                     f"± {100 * c['se']:.2f}"
                     + (f" ({c['z']:.1f} SE)" if c["z"] is not None else "") for c in found)


def report(q: presets.Quickstart, rows, found, out: Path, seconds: float, cpu: float) -> None:
    """Print the table, the claims, the self-tuning cost and the files written."""
    print()
    print(f"LeNet-5 {q.quant} on MNIST, {rows[0]['chips']} chips x {rows[0]['test_images']} "
          "test images (the same for every row); accuracy in %")
    print(f"chips: within = sigma_within {q.sigma_within} ({q.distribution}); +between = also "
          f"sigma_between {q.sigma_between} per {q.granularity}. qavat and ptq's float model "
          f"trained at sigma_within {q.qavat_sigma}")
    print("se: standard error of the mean over chips and images; drop: nominal - mean; "
          "drop t: the nominal model after the same self-tuning - mean")
    print(format_table(rows))
    print("\nthe claims, as differences of mean accuracy on the same chips and images "
          "(points ± standard error):")
    print(format_claims(found))
    cost = next((r["calib_cost"] for r in rows if r["calib_cost"]), "")
    print(f"self-tuning cost per chip: {cost}")
    print(f"wrote {out}/results.json, results.csv, quickstart.png ({seconds:.0f} s wall, "
          f"{cpu:.0f} s CPU)")


def main(argv=None) -> tuple[list[dict], list[dict]]:
    """Run the quickstart from the command line (``argv``: default sys.argv)."""
    return cli.run(run, Args, argv, description=__doc__,
                   default=lambda argv: Args(presets.quickstart(cli.has_flag(argv, "--smoke"))),
                   interrupted=interrupted)


def interrupted(args: Args) -> str:
    """What a Ctrl-C leaves, and how to continue."""
    return (f"{(args.out or default_out(args.quickstart.smoke)) / 'runs'} keeps every finished "
            "training: rerun the same command to continue (they are reused)")


if __name__ == "__main__":
    main()
