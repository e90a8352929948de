"""Claim 1: variability-aware QAT (qavat) beats qat and ptq-from-vat at low bit widths.

Grid: methods ``qat`` (trained once per weight bit width, no variation), ``ptq`` (a ``vat``
float model trained at each sigma, quantized to each bit width) and ``qavat`` (trained at
each sigma and bit width; at sigma 0 it is ``qat``) x weight bits x sigma_within. Every model
is evaluated at every evaluation sigma on ``--chips`` chips (the same chips for every model);
the main tables take each method at its matched cell (``ptq``/``qavat`` trained at the
evaluated sigma). Finished runs and evaluations in ``--out`` are reused, so an interrupted
sweep continues.

    python experiments/claim1_training.py --smoke                  # seconds (tests)
    python experiments/claim1_training.py                          # LeNet-5/MNIST, CPU-sized
    python experiments/claim1_training.py --setup vgg11-narrow     # CIFAR-10 copy
    python experiments/claim1_training.py --setup vgg11 --epochs 100   # the paper's sizes

Writes ``claim1.json``/``claim1.csv`` (every model x eval sigma), ``claim1_tables.txt`` and
``claim1.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import common
import jax

from pimjax.montecarlo import evaluate_chips
from pimjax.train import TrainConfig
from pimjax.variability import VariabilityModel

METHODS = ("qat", "ptq", "qavat")


def parse_args(argv=None):
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setup", default="lenet5", choices=tuple(common.SETUPS))
    p.add_argument("--out", default=None, help="output dir (default results/claim1/<setup>)")
    p.add_argument("--runs", default=None, help="trained models (default <out>/runs)")
    p.add_argument("--methods", type=lambda s: tuple(s.split(",")), default=METHODS)
    p.add_argument("--bits", type=common.ints, default=(1, 2, 3, 4), help="weight bits")
    p.add_argument("--act-bits", type=int, default=4, help="activation bits (4 or 8)")
    p.add_argument("--sigmas", type=common.floats, default=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5),
                   help="training sigma_within of vat/qavat")
    p.add_argument("--eval-sigmas", type=common.floats, default=None,
                   help="evaluation sigma_within (default: --sigmas)")
    p.add_argument("--matched-only", action="store_true",
                   help="evaluate ptq/qavat models only at their training sigma")
    common.add_run_args(p)
    args = p.parse_args(argv)
    if args.smoke:
        args.bits, args.sigmas = (2,), (0.2,)
        args.eval_sigmas = args.eval_sigmas or (0.0, 0.2)
        args.epochs, args.train_images, args.test_images, args.chips = 1, 256, 64, 4
        args.batch_size = args.batch_size or 32
    args.eval_sigmas = args.eval_sigmas or args.sigmas
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        p.error(f"--methods {bad} unknown: use some of {METHODS}")
    if args.act_bits not in (4, 8):
        p.error("--act-bits must be 4 or 8")
    if any(not 1 <= b <= 8 for b in args.bits):
        p.error("--bits must be in 1..8")
    if any(s < 0 for s in args.sigmas + args.eval_sigmas):
        p.error("sigmas must be >= 0")
    setup = common.check_setup(args.setup)
    args.epochs = args.epochs or setup["epochs"]
    args.out = Path(args.out or f"results/claim1/{args.setup}")
    args.runs = Path(args.runs) if args.runs else args.out / "runs"
    return args


def plan_runs(args) -> list[dict]:
    """Every model of the grid: dicts with method, bits, train_sigma and its TrainConfig."""
    setup = common.check_setup(args.setup)
    base = common.base_config(setup, epochs=args.epochs, train_images=args.train_images,
                              test_images=args.test_images, seed=args.seed,
                              data_dir=args.data_dir, batch_size=args.batch_size,
                              digital_first_last=args.digital_first_last)
    n_train = args.train_images or 50000
    calib_batches = max(1, min(50, n_train // base["batch_size"]))
    runs = []
    for bits in args.bits:
        quant = f"W{bits}A{args.act_bits}"
        if "qat" in args.methods or ("qavat" in args.methods and 0.0 in args.sigmas):
            runs.append(dict(method="qat", bits=bits, train_sigma=0.0,
                             config=TrainConfig(**base, method="qat", quant=quant)))
        for s in args.sigmas:
            if "ptq" in args.methods:
                src = TrainConfig(**base, method="vat" if s else "fp", sigma_within=s)
                runs.append(dict(method="ptq", bits=bits, train_sigma=s, source=src,
                                 config=dict(base, method="ptq", quant=quant, sigma_within=s,
                                             calib_batches=calib_batches)))
            if "qavat" in args.methods and s > 0:
                runs.append(dict(method="qavat", bits=bits, train_sigma=s,
                                 config=TrainConfig(**base, method="qavat", quant=quant,
                                                    sigma_within=s)))
    return runs


def _materialize(run, runs_dir: Path, progress: bool):
    """Train (or reuse) a planned run (for ptq, its vat source first); return model, vars, dir."""
    config = run["config"]
    if run["method"] == "ptq":
        _, _, src_dir = common.train_or_load(run["source"], runs_dir, progress)
        config = TrainConfig(**config, from_checkpoint=str(src_dir))
    return common.train_or_load(config, runs_dir, progress)


def evaluate_grid(args, progress: bool = True) -> list[dict]:
    """Train every planned model and evaluate it at the evaluation sigmas; return rows."""
    setup = common.check_setup(args.setup)
    test, _ = common.eval_data(setup["dataset"], args.test_images, 1, args.data_dir)
    key = jax.random.key(args.seed + 1)  # the same chips for every model
    cache = args.out / "evals"
    cache.mkdir(parents=True, exist_ok=True)
    rows = []
    for run in plan_runs(args):
        model, variables, workdir = _materialize(run, args.runs, progress)
        for s in args.eval_sigmas:
            if args.matched_only and run["method"] != "qat" and s != run["train_sigma"]:
                continue
            chips = args.chips if s > 0 else 1  # sigma 0: every chip is the nominal chip
            path = cache / f"{workdir.name}__s{s:g}_c{chips}_i{args.test_images}.json"
            if path.exists():
                row = json.loads(path.read_text())
            else:
                res = evaluate_chips(model, variables, VariabilityModel(s), key, chips, test,
                                     progress=False)
                sm = res.summary()
                row = {"method": run["method"], "bits": run["bits"],
                       "act_bits": args.act_bits, "train_sigma": run["train_sigma"],
                       "eval_sigma": s, "mean": sm["mean"], "p5": sm["p5"], "std": sm["std"],
                       "min": sm["min"], "nominal": sm["nominal"], "chips": chips,
                       "test_images": res.num_images, "run": workdir.name}
                path.write_text(json.dumps(row, indent=2))
            rows.append(row)
            if run["method"] == "qat" and "qat" not in args.methods:
                rows[-1] = dict(row, method="qat(qavat@0)")
    return rows


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


def tables(args, rows) -> dict:
    """Matched-cell tables: {stat: {(bits, sigma): {method: value, 'gain': qavat - best alt}}}."""
    out = {}
    for stat in ("mean", "p5"):
        table = {}
        for bits in args.bits:
            for s in args.eval_sigmas:
                cell = {}
                for m in args.methods:
                    r = matched(rows, m, bits, s)
                    if r is not None:
                        cell[m] = r[stat]
                alts = [v for m, v in cell.items() if m != "qavat"]
                if "qavat" in cell and alts:
                    cell["gain"] = cell["qavat"] - max(alts)
                table[(bits, s)] = cell
        out[stat] = table
    return out


def format_tables(args, tabs) -> str:
    """The printed tables (accuracy in %)."""
    cols = list(args.methods) + (["gain"] if "qavat" in args.methods
                                 and len(args.methods) > 1 else [])
    lines = []
    for stat, table in tabs.items():
        lines.append(f"{stat} accuracy (%) over {args.chips} chips, each method at its matched "
                     f"cell; gain = qavat - best alternative")
        head = f"{'bits':>5}{'sigma':>7}" + "".join(f"{c:>9}" for c in cols)
        lines += [head, "-" * len(head)]
        for (bits, s), cell in table.items():
            vals = "".join(f"{100 * cell[c]:>9.2f}" if c in cell else f"{'-':>9}" for c in cols)
            lines.append(f"{bits:>5}{s:>7.2f}{vals}")
        lines.append("")
    return "\n".join(lines)


def plot(args, tabs, path: Path) -> None:
    """Accuracy vs sigma, one panel per bit width: mean (solid) and p5 (dashed) per method."""
    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(args.bits), figsize=(max(6.5, 4 * len(args.bits)), 3.8),
                             squeeze=False)
    for ax, bits in zip(axes[0], args.bits, strict=True):
        for i, m in enumerate(args.methods):
            for stat, style in (("mean", "-"), ("p5", "--")):
                xs = [s for s in args.eval_sigmas if m in tabs[stat][(bits, s)]]
                ys = [100 * tabs[stat][(bits, s)][m] for s in xs]
                ax.plot(xs, ys, style, color=f"C{i}", marker="o", ms=3,
                        label=f"{m} {stat}")
        ax.set_title(f"W{bits}A{args.act_bits}")
        ax.set_xlabel("sigma_within")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"claim 1, {args.setup}: {args.chips} chips per point", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args, progress: bool = True):
    """Run the sweep, write every result file; return (rows, tables)."""
    rows = evaluate_grid(args, progress)
    tabs = tables(args, rows)
    meta = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "setup": common.SETUPS[args.setup]}
    common.write_results(args.out, "claim1", rows, meta)
    text = format_tables(args, tabs)
    (args.out / "claim1_tables.txt").write_text(text)
    plot(args, tabs, args.out / "claim1.png")
    return rows, tabs


def main(argv=None) -> None:
    """Run claim 1 and print its tables."""
    args = parse_args(argv)
    start = time.perf_counter()
    _, tabs = run(args, progress=not args.smoke)
    print(format_tables(args, tabs))
    print(f"wrote {args.out}/claim1.json, claim1.csv, claim1_tables.txt, claim1.png "
          f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
