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
* evals/: one file per finished (setting, variant), written as soon as it is done;
* manifest.json: which evaluations are done and, once ``complete`` is true, the result
  files of this sweep with their SHA-256 (while it is false, a summary.* or chips.csv in
  the folder is not this sweep's);

and prints the table. Calibration images are the first --calib-images training images.

A stopped sweep keeps its finished evaluations: run it again and it reuses each one whose
full settings (the model's weights and config, the test and calibration images, the
device's variability, the tuning and its nominal statistics, chips, seed, thresholds, the
JAX backend) are those asked for, and computes the rest (the claim scripts' grid cells,
experiments/grid.py). The nominal statistics of the calibration images are read from
``nominal_stats_<dataset>_<N>.npz`` with the checkpoint or in --out if one fits, else
computed and saved (atomically) in --out; a damaged file is computed again, with a warning.

    python experiments/montecarlo.py --checkpoint runs/x --chips 1000 \\
        --sigma-within 0 0.1 0.2 0.3 --sigma-between 0 0.1 0.2
    python experiments/montecarlo.py --checkpoint runs/x --total 0.1 0.2 0.3 \\
        --between-fraction 0.5 --tune none gain channel bn paired

Started once per process (--coordinator HOST:PORT --num-processes N --process-id I, or under
SLURM / on a Cloud TPU slice without them), the chips are split over every device of every
process; chip i is the same chip whatever the split, so the per-chip results are the same
as one process's. Process 0 writes the files and prints (docs/distributed.md); it alone
reads and writes the nominal statistics and the evaluation files, and hands the statistics
to the other processes.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pimjax import cli


def default_out(checkpoint: str | Path) -> Path:
    """The output folder without --out."""
    return Path(checkpoint) / "mc"


if __name__ == "__main__":  # a locked --out is refused now, not after the imports of JAX below
    _checkpoint = cli.flag_value(sys.argv[1:], "--checkpoint")
    cli.lock_early(sys.argv[1:], default=_checkpoint and default_out(_checkpoint))

import dataclasses
import hashlib
import json
import time
import warnings
from typing import Annotated

import common
import grid
import jax
import numpy as np
import tyro
from jax.experimental import multihost_utils

from pimjax import data, distributed, files, introspect, montecarlo, selftune
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
    checkpoint or by an earlier sweep if one fits, else computed and saved in ``out``.

    Process 0 alone reads or computes them and sends them to the others (a collective:
    every process must call it), so no process reads a file another is writing and all use
    the same bits. A damaged file is warned about and skipped (recomputed).
    """
    stats = None
    if distributed.is_primary():
        filename = f"nominal_stats_{dataset}_{len(calib)}.npz"
        stats = saved_stats(model, (Path(args.checkpoint) / filename, out / filename),
                            len(calib), say)
        if stats is None:
            stats = selftune.nominal_stats(model, variables, calib)
            path = selftune.save_stats(out / filename, stats)
            say(f"nominal stats: computed on {stats.num_images} calibration images, saved to "
                f"{path}")
    return from_process_0(model, stats)


def saved_stats(model, paths, num_images: int, say=print) -> selftune.NominalStats | None:
    """The first of ``paths`` holding intact statistics of this model on ``num_images``
    images; a damaged file is skipped with a warning."""
    for path in paths:
        if not path.is_file():
            continue
        try:
            stats = selftune.load_stats(path)
            selftune.check_stats(model, stats)
        except selftune.StatsFileError as e:
            warnings.warn(f"nominal stats file {path} is damaged ({e.reason}): computing the "
                          "statistics again", stacklevel=2)
            continue
        except ValueError:  # another model's statistics
            continue
        if stats.num_images == num_images:
            say(f"nominal stats: {path} ({stats.num_images} images)")
            return stats
    return None


def from_process_0(model, stats: selftune.NominalStats | None) -> selftune.NominalStats:
    """Process 0's ``stats`` (of the model's analog layers) in every process, bit for bit
    (a collective; the other processes pass None)."""
    if jax.process_count() == 1:
        return stats
    layers = [(layer.name, layer.features) for layer in introspect.analog_layers(model)]
    if stats is None:  # a template of the right shapes: only process 0's values are sent
        tree = {"num": np.zeros((), np.int32),
                **{f"{kind}:{name}": np.zeros(n, np.uint32)
                   for kind in ("mean", "var") for name, n in layers}}
    else:  # float32 bits as integers: the broadcast (a sum with zeros) keeps them exactly
        tree = {"num": np.int32(stats.num_images),
                **{f"mean:{name}": np.asarray(stats.mean[name], np.float32).view(np.uint32)
                   for name, _ in layers},
                **{f"var:{name}": np.asarray(stats.var[name], np.float32).view(np.uint32)
                   for name, _ in layers}}
    tree = multihost_utils.broadcast_one_to_all(tree)

    def get(kind):
        return {name: jax.numpy.asarray(np.asarray(tree[f"{kind}:{name}"]).view(np.float32))
                for name, _ in layers}

    return selftune.NominalStats(mean=get("mean"), var=get("var"),
                                 num_images=int(tree["num"]))


def _quiet(*args, **kwargs) -> None:
    """print() of the processes other than process 0."""


ROW_FORMAT = 1  # the evaluation files' layout: a change makes every earlier file stale
EVALS = "evals"
MANIFEST = "manifest.json"
RESULTS = ("summary.csv", "summary.json", "chips.csv", "distributions.png",
           "accuracy_vs_sigma.png")
CHIP_ARRAYS = ("chip_accuracy", "chip_loss")  # per-chip results kept in each evaluation's row


def fingerprint(*trees) -> str:
    """SHA-256 (hex) of the arrays of ``trees``: their paths, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for tree in trees:
        for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(tree)[0],
                                 key=lambda item: jax.tree_util.keystr(item[0])):
            a = np.ascontiguousarray(np.asarray(leaf))
            h.update(f"{jax.tree_util.keystr(path)} {a.dtype} {a.shape};".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def evaluation_cells(args: Args, model, variables, config, test, calib, stats, *,
                     budget=None, progress: bool = False) -> list[grid.Cell]:
    """One cell per (setting, variant), in table order; its spec is everything its result
    depends on, so a stored result is reused only for the same model, data and settings."""
    sweep = args.sweep
    out = args.out or default_out(args.checkpoint)
    key = common.chip_key(sweep.seed)
    common_spec = {
        "row_format": ROW_FORMAT,
        "model": fingerprint(variables) + " " + hashlib.sha256(
            json.dumps(files.jsonable(config.to_dict()), sort_keys=True).encode()).hexdigest(),
        "dataset": test.name, "test_images": len(test),
        "test_data": fingerprint((test.images, test.labels)),
        "chips": sweep.chips, "seed": sweep.seed, "thresholds": list(sweep.thresholds),
        "backend": jax.default_backend()}
    calib_fp = None if calib is None else fingerprint(calib)
    stats_fp = None if stats is None else fingerprint(
        (stats.mean, stats.var, np.int64(stats.num_images)))

    def compute(setting, variant: str) -> dict:
        vm = setting.variability
        tuning = None if variant == "none" else selftune.SelfTune(
            variant, calib, stats, sweep.calib_batch)
        start = time.perf_counter()
        ev = common.evaluate(model, variables, vm, key, sweep.chips, test, tuning=tuning,
                             budget_bytes=budget, thresholds=sweep.thresholds,
                             progress=progress)
        cost = ev.tune_cost
        return dict(
            sigma_within=vm.sigma_within, sigma_between=vm.sigma_between,
            sigma_total=setting.sigma_total, group=setting.group,
            granularity=vm.between_granularity, distribution=vm.distribution,
            tune=variant, images=ev.num_images, **ev.summary,
            calib_images=cost.images if cost else 0, passes=cost.passes if cost else 0,
            nominal_passes=cost.nominal_passes if cost else 0,
            seconds=round(time.perf_counter() - start, 2),
            chip_accuracy=np.asarray(ev.accuracy).tolist(),
            chip_loss=np.asarray(ev.loss).tolist())

    cells = []
    for setting in sweep.settings():
        vm = setting.variability
        for variant in sweep.tune:
            if vm.is_nominal and variant != "none":
                continue  # the nominal model has nothing to tune
            tuned = variant != "none"
            spec = dict(common_spec, sigma_within=vm.sigma_within,
                        sigma_between=vm.sigma_between, granularity=vm.between_granularity,
                        distribution=vm.distribution, tune=variant,
                        calib_images=len(calib) if tuned else 0,
                        calib_batch=sweep.calib_batch if tuned else None,
                        calib_data=calib_fp if tuned else None,
                        nominal_stats=stats_fp if variant in selftune.NEEDS_STATS else None)
            label = f"w{vm.sigma_within:g}_b{vm.sigma_between:g}_{variant}"
            cells.append(grid.Cell(label, grid.cell_path(out / EVALS, label, spec),
                                   lambda s=setting, v=variant: compute(s, v), spec))
    return cells


def write_manifest(out: Path, cells: list[grid.Cell], done: list[bool],
                   results: tuple[str, ...] = ()) -> Path:
    """``out/manifest.json``: the evaluations and whether each is done; ``results``: the
    result files, all written (then ``complete`` is true and each file's SHA-256 listed)."""
    return files.write_json(out / MANIFEST, {
        "complete": bool(results) and all(done),
        "evaluations": [dict(sigma_within=c.spec["sigma_within"],
                             sigma_between=c.spec["sigma_between"], tune=c.spec["tune"],
                             file=str(c.path.relative_to(out)), done=d)
                        for c, d in zip(cells, done, strict=True)],
        "files": {name: hashlib.sha256((out / name).read_bytes()).hexdigest()
                  for name in results}})


def _line(row: dict, note: str) -> str:
    return (f"  within {row['sigma_within']:.3f} between {row['sigma_between']:.3f} "
            f"{row['tune']:11s} mean {100 * row['mean']:6.2f}  p5 {100 * row['p5']:6.2f}  "
            f"min {100 * row['min']:6.2f}  drop {100 * row['drop_mean']:6.2f}  ({note})")


def run(args: Args) -> list[dict]:
    """Sweep the settings and variants; write and return the summary rows (process 0; the
    others return [])."""
    sweep = args.sweep
    out = args.out or default_out(args.checkpoint)
    progress = args.progress and not sweep.smoke
    primary = distributed.is_primary()
    say = print if primary else _quiet
    with distributed.shared_run_lock(out):
        model, variables, config, test, calib = load(args)
        stats = None
        if any(t in selftune.NEEDS_STATS for t in sweep.tune):
            stats = nominal_stats(args, model, variables, calib, out, test.name, say)
        budget = None if sweep.budget_mb is None else sweep.budget_mb * 2**20
        say(f"{config.model.name} {config.quant.name} ({config.train_method}) on {test.tag}: "
            f"{len(test)} test images, {sweep.chips} chips")
        cells = evaluation_cells(args, model, variables, config, test, calib, stats,
                                 budget=budget, progress=progress)
        # process 0's view of the files decides for every process (they compute together)
        done = [distributed.agree(grid.finished(c)) for c in cells]
        if primary:
            write_manifest(out, cells, done)
        for i, cell in enumerate(cells):
            if done[i]:
                if primary:
                    print(_line(grid.stored_row(cell), "reused"), flush=True)
                continue
            row = cell.compute()
            if primary:  # kept at once: a stopped sweep loses at most the running evaluation
                grid.store_row(cell, row)
                done[i] = True
                write_manifest(out, cells, done)
            say(_line(row, f"{row['seconds']:.1f}s"), flush=True)
        if not primary:
            return []
        found = grid.rows(cells)
        rows = [{k: v for k, v in r.items() if k not in CHIP_ARRAYS} for r in found]
        per_chip = [dict(sigma_within=r["sigma_within"], sigma_between=r["sigma_between"],
                         tune=r["tune"], chip=i, accuracy=a, loss=lo)
                    for r in found
                    for i, (a, lo) in enumerate(zip(r["chip_accuracy"], r["chip_loss"],
                                                    strict=True))]
        chip_acc = {((r["sigma_within"], r["sigma_between"]), r["tune"]):
                    np.asarray(r["chip_accuracy"]) for r in found}
        # Every result file is atomic; the set is: the manifest says "complete" only once
        # all of them are written (a failure in between leaves it saying it is not).
        files.write_csv(out / "summary.csv", rows)
        files.write_json(out / "summary.json", {
            "meta": common.meta(sweep, checkpoint=args.checkpoint, dataset=test.name,
                                test_images=len(test), calib_images=0 if calib is None
                                else len(calib), model=config.to_dict()),
            "rows": rows})
        files.write_csv(out / "chips.csv", per_chip)
        plot(out, rows, chip_acc, list(sweep.tune))
        write_manifest(out, cells, done, RESULTS)
    print(format_table(rows))
    print(f"\nwrote {out}/summary.csv, summary.json, chips.csv, distributions.png, "
          "accuracy_vs_sigma.png, manifest.json")
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
        presets.montecarlo(cli.has_flag(argv, "--smoke")), tyro.MISSING),
        interrupted=interrupted)


def interrupted(args: Args) -> str:
    """What a Ctrl-C leaves, and how to continue."""
    return (f"{args.out or default_out(args.checkpoint)} keeps every finished evaluation "
            "(manifest.json lists them): rerun the same command to continue")


if __name__ == "__main__":
    main()
