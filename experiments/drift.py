"""Accuracy against read time on PCM chips: drift from 1 s to 10 years, with and without
compensation.

Trains (or reuses) LeNet-5 on MNIST three ways: ``qat`` (no device in training),
``qavat-paper`` (noise-aware under the paper's multiplicative variability) and ``qavat-pcm``
(noise-aware under the PCM device itself: aihwkit's hardware-aware training), then scores the
same N chips of the ``pcm`` preset at every read time under every compensation of
:mod:`pimjax.drift`: none, aihwkit's global drift compensation (``drift``), and each label-free
self-tuning variant applied to the uncompensated drifted chip. Reports the accuracy's mean,
5th percentile and min over chips.

    python experiments/drift.py --smoke                     # seconds (tests)
    python experiments/drift.py --runs runs/drift           # LeNet-5 W4A8, CPU-sized (hours)
    python experiments/drift.py --chips 100 --compensations none drift channel

Writes ``drift.json``/``drift.csv``, ``drift_table.txt`` and ``drift.png`` into ``--out``
(locked while it runs); the trained models go to ``--runs`` and each finished point to
``<out>/evals``, so a rerun, or a run stopped half-way, reuses them.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pimjax import cli


def default_out(smoke: bool) -> Path:
    """The output folder without --out."""
    return Path("runs/smoke/drift" if smoke else "results/drift")


if __name__ == "__main__":  # a locked --out is refused now, not after the imports of JAX below
    cli.lock_early(sys.argv[1:], default=default_out(cli.has_flag(sys.argv[1:], "--smoke")))

import dataclasses
import hashlib
import json
import time
from typing import Annotated

import common
import numpy as np

from pimjax import devices, drift, files, montecarlo, selftune
from pimjax.configs import drift as presets

DATASET = "mnist"  # bundled with pimjax


@dataclasses.dataclass(frozen=True)
class Args:
    """The drift experiment's flags."""

    drift: Annotated[presets.Drift, common.FLAT]
    out: Path | None = None
    """output folder (default: results/drift; with --smoke runs/smoke/drift)"""
    runs: Path | None = None
    """folder of the trained models (default: <out>/runs)"""
    progress: bool = True
    """progress bars and one line per point (--no-progress: quiet)"""


def eval_path(out: Path, config: presets.Drift, run: str, compensation: str,
              t: float) -> tuple[Path, dict]:
    """The cache file of one point and the settings it must have been computed with."""
    settings = {"run": run, "compensation": compensation, "t": float(t), "chips": config.chips,
                "test_images": config.test_images, "seed": config.seed,
                "calib_images": config.calib_images, "device": repr(devices.pcm())}
    tag = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return out / "evals" / f"{run}_{compensation}_{t:g}s_{tag}.json", settings


@dataclasses.dataclass(frozen=True)
class Point:
    """One evaluated point: its row and its per-chip and per-image accuracies."""

    row: dict
    accuracy: np.ndarray  # [chips]
    image_accuracy: np.ndarray  # [test images]: the share of chips right on each image


def sweep(config: presets.Drift, out: Path, runs: Path, progress: bool) -> list[Point]:
    """Every (model, compensation, time) point: trained or reused models, cached points."""
    test = common.load_split(DATASET, "test", config.data_dir, config.test_images)
    calib = common.calibration_images(DATASET, config.calib_images, config.data_dir)
    key = common.chip_key(config.seed)  # the same chips at every point
    points = []
    for name in config.models:
        run = common.train_or_load(config.train_config(name), runs, progress)
        stats = None
        for comp in config.compensations:
            for t in config.times:
                path, settings = eval_path(out, config, run.workdir.name, comp, t)
                saved = json.loads(path.read_text()) if path.is_file() else {}
                if saved.get("settings") != settings:
                    if comp in selftune.NEEDS_STATS and stats is None:
                        stats = selftune.nominal_stats(run.model, run.variables, calib)
                    row, res = drift.evaluate_drift(
                        run.model, run.variables, devices.pcm(), comp, t, key, config.chips,
                        test, calib=calib, stats=stats, progress=False)
                    saved = {"settings": settings, "row": {"model": name, **row},
                             "accuracy": res.accuracy, "image_accuracy": res.image_accuracy}
                    files.write_json(path, saved)
                point = Point(saved["row"], np.asarray(saved["accuracy"]),
                              np.asarray(saved["image_accuracy"]))
                if progress:
                    r = point.row
                    print(f"  {name:12s} {comp:12s} {r['time']:>9s}  mean {r['mean']:.4f}"
                          f"  p5 {r['p5']:.4f}  min {r['min']:.4f}", flush=True)
                points.append(point)
    return points


def differences(points: list[Point], baseline: str, by: str) -> list[dict]:
    """Paired differences of mean accuracy against a baseline on the same chips and images.

    ``by="compensation"``: each compensation minus ``baseline`` (e.g. ``drift``) for the same
    model and time; ``by="model"``: each model minus ``baseline`` (e.g. ``qat``) for the same
    compensation and time. Each row has the difference and its standard error over chips
    and images (:func:`pimjax.montecarlo.paired_difference`).
    """
    other = "model" if by == "compensation" else "compensation"
    index = {(p.row[by], p.row[other], p.row["t"]): p for p in points}
    out = []
    for (name, group, t), p in index.items():
        base = index.get((baseline, group, t))
        if name == baseline or base is None:
            continue
        diff, se = montecarlo.paired_difference(p.accuracy, p.image_accuracy, base.accuracy,
                                                base.image_accuracy)
        out.append({by: f"{name} - {baseline}", other: group, "t": t, "time": p.row["time"],
                    "diff": diff, "se": se})
    return out


def diff_table(rows: list[dict], label: str, group: str) -> str:
    """Differences in percentage points (± their standard error), a column per read time."""
    times = list(dict.fromkeys(r["time"] for r in rows))
    head = f"{group:<13}{label:<26}" + "".join(f"{t:>15}" for t in times)
    lines = [head, "-" * len(head)]
    for g in dict.fromkeys(r[group] for r in rows):
        for name in dict.fromkeys(r[label] for r in rows):
            cells = {r["time"]: r for r in rows if r[group] == g and r[label] == name}
            if cells:
                lines.append(f"{g:<13}{name:<26}" + "".join(
                    f"{100 * cells[t]['diff']:>+8.2f} ±{100 * cells[t]['se']:.2f}"
                    if t in cells else f"{'':>15}" for t in times))
    return "\n".join(lines)


def table(rows: list[dict], stat: str) -> str:
    """A text table of ``stat`` (mean, p5 or min, in %): a row per model and compensation, a
    column per read time."""
    times = list(dict.fromkeys(r["time"] for r in rows))
    head = f"{'model':<13}{'compensation':<13}" + "".join(f"{t:>10}" for t in times)
    lines = [head, "-" * len(head)]
    for model in dict.fromkeys(r["model"] for r in rows):
        for comp in dict.fromkeys(r["compensation"] for r in rows):
            cells = {r["time"]: r[stat] for r in rows
                     if r["model"] == model and r["compensation"] == comp}
            if cells:
                lines.append(f"{model:<13}{comp:<13}" + "".join(
                    f"{100 * cells[t]:>10.2f}" if t in cells else f"{'':>10}" for t in times))
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Mean and 5th-percentile accuracy against read time, one column per model."""
    plt = common.pyplot()
    models = list(dict.fromkeys(r["model"] for r in rows))
    comps = list(dict.fromkeys(r["compensation"] for r in rows))
    fig, axes = plt.subplots(2, len(models), figsize=(4.5 * len(models), 7), squeeze=False,
                             sharex=True, sharey="row")
    for j, model in enumerate(models):
        for i, stat in enumerate(("mean", "p5")):
            ax = axes[i, j]
            for k, comp in enumerate(comps):
                pts = sorted((r["t"], r[stat]) for r in rows
                             if r["model"] == model and r["compensation"] == comp)
                ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], "-o", ms=3,
                        color=f"C{k}", label=comp)
            ax.set_xscale("log")
            ax.set_title(f"{model}: {stat} over chips", fontsize=9)
            ax.set_ylabel("accuracy (%)")
            ax.grid(alpha=0.3)
        axes[1, j].set_xlabel("read time after programming (s)")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    files.save_figure(fig, path, dpi=120)
    plt.close(fig)


def run(args: Args) -> list[dict]:
    """Train or reuse the models, sweep every point, write the result files; return the rows."""
    c = args.drift
    out = args.out or default_out(c.smoke)
    runs = args.runs or out / "runs"
    progress = args.progress and not c.smoke
    start = time.perf_counter()
    with files.run_lock(out):
        points = sweep(c, out, runs, progress)
        rows = [p.row for p in points]
        vs_drift = differences(points, "drift", "compensation")
        vs_qat = differences(points, "qat", "model")
        common.write_results(out, "drift", rows, common.meta(
            c, device=repr(devices.pcm()), vs_drift=vs_drift, vs_qat=vs_qat))
        sizes = f"LeNet-5 {c.quant} on {DATASET}, {c.chips} PCM chips x {c.test_images} images"
        parts = [f"{stat} accuracy over chips (%), {sizes}\n{table(rows, stat)}"
                 for stat in ("mean", "p5", "min")]
        if vs_drift:
            parts.append("mean accuracy minus global drift compensation's, same chips and "
                         f"images (points ± SE)\n{diff_table(vs_drift, 'compensation', 'model')}")
        if vs_qat:
            parts.append("mean accuracy minus the qat model's, same chips and images (points "
                         f"± SE)\n{diff_table(vs_qat, 'model', 'compensation')}")
        text = "\n\n".join(parts)
        files.write_text(out / "drift_table.txt", text + "\n")
        plot(rows, out / "drift.png", f"LeNet-5 {c.quant} on PCM chips (aihwkit 1.1 model, "
             f"{c.chips} chips): accuracy vs read time, per compensation")
    print(text)
    print(f"wrote {out}/drift.json, drift.csv, drift_table.txt, drift.png "
          f"({time.perf_counter() - start:.0f} s)")
    return rows


def main(argv=None) -> list[dict]:
    """Run the drift experiment from the command line (``argv``: default sys.argv)."""
    return cli.run(run, Args, argv, description=__doc__,
                   default=lambda argv: Args(presets.drift_config(cli.has_flag(argv, "--smoke"))),
                   interrupted=interrupted)


def interrupted(args: Args) -> str:
    """What a Ctrl-C leaves, and how to continue."""
    return (f"{args.out or default_out(args.drift.smoke)} keeps every finished point and "
            "training: rerun the same command to continue")


if __name__ == "__main__":
    main()
