"""Claim 1: variability-aware QAT (qavat) beats qat and ptq-from-vat at low bit widths.

Grid: methods qat (trained once per weight bit width, no variation), ptq (a vat float
model trained at each sigma, quantized to each bit width) and qavat (trained at each sigma
and bit width; at sigma 0 it is qat) x weight bits x sigma_within. Every model is evaluated
at every evaluation sigma on --chips chips (the same chips for every model); the tables
take each method at its matched cell (ptq/qavat trained at the evaluated sigma). Finished
runs and evaluations are reused, so an interrupted sweep continues.

The trainings and evaluations are independent cells (experiments/grid.py): --shard I/N
computes every N-th of them (e.g. one job of a SLURM array each), and the shard that
finishes last, or a later --merge, writes the tables; a multi-process run
(--coordinator/--num-processes/--process-id) shares them between its processes.

    python experiments/claim1_training.py --smoke                   # seconds (tests)
    python experiments/claim1_training.py                           # LeNet-5/MNIST, CPU-sized
    python experiments/claim1_training.py --dataset fashion_mnist   # LeNet-5/Fashion-MNIST
    python experiments/claim1_training.py --setup vgg11-narrow      # CIFAR-10
    python experiments/claim1_training.py --setup vgg11             # the paper's sizes (GPU)
    python experiments/claim1_training.py --shard 0/2 & python experiments/claim1_training.py \\
        --shard 1/2; wait                                           # two jobs, tables merged

Writes claim1.json/.csv (every model x eval sigma), claim1_tables.txt and claim1.png into
--out, and one JSON per evaluation into <out>/evals/.
"""

from __future__ import annotations

import sys

import grid

from pimjax import cli

if __name__ == "__main__":  # a locked --out is refused now, not after the imports of JAX below
    grid.lock_early(sys.argv[1:])

import dataclasses
import functools
import time
from pathlib import Path
from typing import Annotated

import common

from pimjax import distributed, files, montecarlo
from pimjax.configs import claims, setups
from pimjax.devices import VariabilityModel


@dataclasses.dataclass(frozen=True)
class Args:
    """Claim 1's flags."""

    claim: Annotated[claims.Claim1, common.FLAT]
    output: Annotated[common.Output, common.FLAT] = common.Output()


@dataclasses.dataclass(frozen=True)
class Planned:
    """One model of the grid: its method, bits, training sigma and config (ptq: its source)."""

    method: str
    bits: int
    train_sigma: float
    config: object  # TrainConfig; for ptq, a function of the source's run directory
    source: object = None  # ptq: the float (vat or fp) TrainConfig


def plan_runs(c: claims.Claim1) -> list[Planned]:
    """Every model of the grid, in training order (shared qat and float runs listed once)."""
    n_train = common.dataset_size(c, "train")
    calib_batches = max(1, min(50, n_train // c.batch_size))
    runs = []
    for bits in c.bits:
        quant = f"W{bits}A{c.act_bits}"
        if "qat" in c.methods or ("qavat" in c.methods and 0.0 in c.sigmas):
            runs.append(Planned("qat", bits, 0.0, c.train_config("qat", quant)))
        for s in c.sigmas:
            if "ptq" in c.methods:
                source = c.train_config("vat" if s else "fp", "fp", s)
                runs.append(Planned("ptq", bits, s, _ptq_config(c, quant, s, calib_batches),
                                    source))
            if "qavat" in c.methods and s > 0:
                runs.append(Planned("qavat", bits, s, c.train_config("qavat", quant, s)))
    return runs


def _ptq_config(c, quant, sigma, calib_batches):
    return lambda source_dir: c.train_config("ptq", quant, sigma, ptq_from=str(source_dir),
                                             calib_batches=calib_batches)


def evaluations(c: claims.Claim1, run: Planned):
    """The (eval sigma, chips) this run is evaluated at (sigma 0: the nominal model once)."""
    for s in c.evaluated_sigmas:
        if c.matched_only and run.method != "qat" and s != run.train_sigma:
            continue
        yield s, (c.chips if s > 0 else 1)


def plan_text(c: claims.Claim1) -> str:
    """The grid's size and its run-time estimate."""
    plan = plan_runs(c)
    trainings = {common.run_name(r.config) for r in plan if r.method != "ptq"}
    trainings |= {common.run_name(r.source) for r in plan if r.method == "ptq"}
    n_test = common.dataset_size(c, "test")
    evals = [chips for r in plan for _, chips in evaluations(c, r)]
    chip_images = sum(evals) * n_test
    config = c.train_config("qat", f"W{c.bits[0]}A{c.act_bits}")  # FLOPs: any bit width
    model = config.model.build(config.num_classes, config.quant)
    which = ("each ptq/qavat model at its training sigma, qat at every sigma" if c.matched_only
             else f"{len(plan)} models x {len(c.evaluated_sigmas)} sigma(s)")
    return (f"plan: {len(trainings)} trainings of {c.epochs} epoch(s) x "
            f"{common.dataset_size(c, 'train')} images, {sum(r.method == 'ptq' for r in plan)} "
            f"ptq calibrations, {len(evals)} evaluations ({which}) on {c.chips} chips x "
            f"{n_test} test images, A{c.act_bits}\n"
            + common.estimate(model, len(trainings), c.epochs * common.dataset_size(c, 'train'),
                              chip_images))


def source_dir(run: Planned, runs_dir: Path) -> Path:
    """The run folder of a ptq run's float source."""
    return Path(runs_dir) / common.run_name(run.source)


def run_config(run: Planned, runs_dir: Path):
    """A planned run's TrainConfig (ptq: pointing at its float source's folder)."""
    return run.config(source_dir(run, runs_dir)) if run.method == "ptq" else run.config


def plan_cells(c: claims.Claim1, out: Path, runs_dir: Path, progress: bool = True
               ) -> list[grid.Cell]:
    """The grid's cells: every training (shared ones once, float sources before their ptq
    runs), then every (model, evaluation sigma) in table order."""
    plan = plan_runs(c)
    n_test = common.dataset_size(c, "test")
    key = common.chip_key(c.seed)  # the same chips for every model

    @functools.cache
    def test():
        return common.load_split(c.dataset_name, "test", c.data_dir, c.test_images)

    @functools.cache
    def trained(name: str) -> common.Run:
        run = next(r for r in plan if common.run_name(run_config(r, runs_dir)) == name)
        if run.method == "ptq":  # its float source first (trained, or waited for)
            common.ensure_trained(run.source, runs_dir, progress)
        return common.train_or_load(run_config(run, runs_dir), runs_dir, progress)

    def evaluate(run: Planned, name: str, s: float, chips: int) -> dict:
        model = trained(name)
        ev = common.evaluate(model.model, model.variables, VariabilityModel(s), key, chips,
                             test())
        sm = ev.summary
        return {"method": run.method, "bits": run.bits, "act_bits": c.act_bits,
                "train_sigma": run.train_sigma, "eval_sigma": s, "mean": sm["mean"],
                "se": sm["se"], "p5": sm["p5"], "std": sm["std"], "min": sm["min"],
                "nominal": sm["nominal"], "chips": sm["chips"],
                "test_images": ev.num_images, "run": model.workdir.name,
                "dataset": c.dataset_name, "train_images": model.summary.get("train_images"),
                "chip_accuracy": ev.accuracy.tolist(),
                "image_accuracy": ev.image_accuracy.tolist()}

    trainings: dict[str, grid.Cell] = {}
    for run in plan:
        if run.method == "ptq":
            trainings.setdefault(common.run_name(run.source),
                                 common.training_cell(run.source, runs_dir, progress))
        config = run_config(run, runs_dir)
        trainings.setdefault(common.run_name(config), common.training_cell(
            config, runs_dir, progress, run.source if run.method == "ptq" else None))
    cells = list(trainings.values())
    for run in plan:
        name = common.run_name(run_config(run, runs_dir))
        for s, chips in evaluations(c, run):
            spec = {"run": name, "eval_sigma": s, "chips": chips, "test_images": n_test,
                    "dataset": c.dataset_name, "chip_seed": c.seed}
            label = f"{name}__s{s:g}_c{chips}"
            cells.append(grid.Cell(label, grid.cell_path(Path(out) / "evals", label, spec),
                                   functools.partial(evaluate, run, name, s, chips), spec))
    return cells


def merged_rows(c: claims.Claim1, rows: list[dict]) -> list[dict]:
    """The evaluation rows as the tables read them (qat trained for qavat at sigma 0 named so)."""
    return [dict(r, method="qat(qavat@0)") if r["method"] == "qat" and "qat" not in c.methods
            else r for r in rows]


def matched(rows, method: str, bits: int, sigma: float) -> dict | None:
    """The row of ``method`` at its matched cell: trained at ``sigma`` (qat: trained at 0)."""
    for r in rows:
        if r["bits"] != bits or r["eval_sigma"] != sigma:
            continue
        if method == "qavat" and sigma == 0 and r["method"].startswith("qat"):
            return r  # qavat at sigma 0 is qat
        if r["method"] == method and (method == "qat" or r["train_sigma"] == sigma):
            return r
    return None


def gain_se(best: dict, qavat: dict) -> float | None:
    """Standard error of qavat's mean minus the best alternative's, paired over the same
    chips and test images (None without the per-chip and per-image accuracies)."""
    if any(k not in r for r in (best, qavat) for k in common.ARRAYS):
        return None
    return montecarlo.paired_difference(qavat["chip_accuracy"], qavat["image_accuracy"],
                             best["chip_accuracy"], best["image_accuracy"])[1]


def tables(c: claims.Claim1, rows) -> dict:
    """Matched-cell tables: {stat: {(bits, sigma): {method: value, 'gain': qavat - best alt,
    'se': the gain's paired standard error (mean only, when the rows carry their arrays)}}}."""
    out = {}
    for stat in ("mean", "p5"):
        table = {}
        for bits in c.bits:
            for s in c.evaluated_sigmas:
                cell, found = {}, {}
                for m in c.methods:
                    r = matched(rows, m, bits, s)
                    if r is not None:
                        cell[m], found[m] = r[stat], r
                alts = [m for m in cell if m != "qavat"]
                if "qavat" in cell and alts:
                    best = max(alts, key=lambda m: cell[m])
                    cell["gain"] = cell["qavat"] - cell[best]
                    se = gain_se(found[best], found["qavat"]) if stat == "mean" else None
                    if se is not None:
                        cell["se"] = se
                table[(bits, s)] = cell
        out[stat] = table
    return out


def format_tables(c: claims.Claim1, tabs) -> str:
    """The printed tables (accuracy in %; se: the mean gain's paired standard error)."""
    gain = "qavat" in c.methods and len(c.methods) > 1
    lines = []
    for stat, table in tabs.items():
        cols = list(c.methods) + (["gain"] if gain else [])
        if gain and any("se" in cell for cell in table.values()):
            cols.append("se")
        lines.append(f"{stat} accuracy (%) over {c.chips} chips, each method at its matched "
                     f"cell; gain = qavat - best alternative"
                     + ("; se = its standard error, paired over chips and images"
                        if "se" in cols else ""))
        head = f"{'bits':>5}{'sigma':>7}" + "".join(f"{col:>9}" for col in cols)
        lines += [head, "-" * len(head)]
        for (bits, s), cell in table.items():
            vals = "".join(f"{100 * cell[col]:>9.2f}" if col in cell else f"{'-':>9}"
                           for col in cols)
            lines.append(f"{bits:>5}{s:>7.2f}{vals}")
        lines.append("")
    return "\n".join(lines)


def plot(c: claims.Claim1, tabs, path: Path) -> None:
    """Accuracy vs sigma, one panel per bit width: mean (solid) and p5 (dashed) per method."""
    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(c.bits), figsize=(max(6.5, 4 * len(c.bits)), 3.8),
                             squeeze=False)
    for ax, bits in zip(axes[0], c.bits, strict=True):
        for i, m in enumerate(c.methods):
            for stat, style in (("mean", "-"), ("p5", "--")):
                xs = [s for s in c.evaluated_sigmas if m in tabs[stat][(bits, s)]]
                ys = [100 * tabs[stat][(bits, s)][m] for s in xs]
                ax.plot(xs, ys, style, color=f"C{i}", marker="o", ms=3, label=f"{m} {stat}")
        ax.set_title(f"W{bits}A{c.act_bits}")
        ax.set_xlabel("sigma_within")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"claim 1, {c.setup} on {c.dataset_name}: {c.chips} chips per point",
                 fontsize=10)
    fig.tight_layout()
    files.save_figure(fig, path, dpi=120)
    plt.close(fig)


def run(args: Args) -> tuple[list[dict], dict] | None:
    """Plan, train, evaluate, write every result file; return (rows, tables)."""
    c, output = args.claim, args.output
    out, runs_dir = common.claim_out("claim1", c, output)
    setup = setups.get(c.setup)
    if (output.dry_run or setup.paper_size) and distributed.is_primary():
        print(plan_text(c), flush=True)
    if output.dry_run:
        return None
    start = time.perf_counter()
    cells = plan_cells(c, out, runs_dir,
                       progress=output.progress and not c.smoke and distributed.is_primary())

    def merge(rows: list[dict]) -> tuple[list[dict], dict]:
        rows = merged_rows(c, rows)
        tabs, rows = tables(c, rows), common.without_arrays(rows)
        common.write_results(out, "claim1", rows, common.meta(c, setup=setup))
        text = format_tables(c, tabs)
        files.write_text(out / "claim1_tables.txt", text)
        plot(c, tabs, out / "claim1.png")
        print(text)
        print(f"wrote {out}/claim1.json, claim1.csv, claim1_tables.txt, claim1.png "
              f"({time.perf_counter() - start:.0f} s)")
        return rows, tabs

    return grid.run(cells, out, merge, shard=output.shard_spec,
                    merge_only=output.merge, progress=output.progress)


def main(argv=None):
    """Run claim 1 from the command line (``argv``: default sys.argv) and print its tables."""
    return cli.run(run, Args, argv, default=common.claim_defaults(Args, claims.claim1),
                   description=__doc__, interrupted=grid.interrupted)


if __name__ == "__main__":
    main()
