"""Shared helpers of the claim experiments: setups, resumable training, data, result files.

Every trained model lives in ``<runs>/<run_name(config)>``; a run that finished (marked by
``done.json``) is reused as is, an interrupted one is resumed, so a sweep that stops
continues where it was. Results are written as ``<name>.json`` (meta + rows) and
``<name>.csv``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
import textwrap
from pathlib import Path

import numpy as np

from pimjax import data
from pimjax.checkpoint import load_model
from pimjax.train import TrainConfig, train

# (model, dataset, width, default epochs, batch size, optimizer, lr, weight decay)
SETUPS = {
    "lenet5": dict(model="lenet5", dataset="mnist", width=1.0, epochs=3, batch_size=128,
                   optimizer="adam", lr=1e-3, weight_decay=0.0),
    # narrow VGG-11 on the CIFAR-10 copy: CPU-sized
    "vgg11-narrow": dict(model="vgg11", dataset="cifar10", width=0.25, epochs=5, batch_size=128,
                         optimizer="adam", lr=1e-3, weight_decay=0.0),
    "resnet20-narrow": dict(model="resnet20", dataset="cifar10", width=0.5, epochs=5,
                            batch_size=128, optimizer="adam", lr=1e-3, weight_decay=0.0),
    # the paper's sizes
    "vgg11": dict(model="vgg11", dataset="cifar10", width=1.0, epochs=100, batch_size=128,
                  optimizer="sgd", lr=0.05, weight_decay=5e-4),
    "resnet18-cifar100": dict(model="resnet18", dataset="cifar100", width=1.0, epochs=100,
                              batch_size=128, optimizer="sgd", lr=0.05, weight_decay=5e-4),
}


def check_setup(name: str) -> dict:
    """The setup dict of ``name``, or ValueError naming the allowed setups."""
    if name not in SETUPS:
        raise ValueError(f"setup={name!r} is unknown: use one of {tuple(SETUPS)}")
    return dict(SETUPS[name])


def data_dir_for(dataset: str, data_dir: str | None) -> str | None:
    """The data directory: the given one, else /work/shared/data-style defaults for CIFAR."""
    if data_dir or dataset in ("mnist",):
        return data_dir
    return os.environ.get("PIMJAX_DATA_DIR") or (
        "/work/shared/data" if Path("/work/shared/data").is_dir() else None)


def base_config(setup: dict, *, epochs: int, train_images: int | None, test_images: int,
                seed: int, data_dir: str | None, batch_size: int | None = None,
                digital_first_last: bool = False) -> dict:
    """TrainConfig keyword arguments shared by every run of an experiment."""
    return dict(digital_first_last=digital_first_last,
        model=setup["model"], dataset=setup["dataset"], width=setup["width"],
        epochs=epochs, batch_size=batch_size or setup["batch_size"],
        optimizer=setup["optimizer"], lr=setup["lr"], weight_decay=setup["weight_decay"],
        schedule="cosine", seed=seed, limit_train=train_images, limit_test=test_images,
        data_dir=data_dir_for(setup["dataset"], data_dir),
    )


def run_name(config: TrainConfig) -> str:
    """A directory name that identifies a run's model, method, quantization and sigma."""
    parts = [config.model]
    if config.width != 1.0:
        parts.append(f"w{config.width:g}")
    if config.digital_first_last:
        parts.append("dfl")
    parts.append(config.method)
    if config.quant != "fp":
        parts.append(config.quant.lower())
    if config.method in ("vat", "qavat", "ptq"):
        parts.append(f"s{config.sigma_within:g}")
        if config.sigma_between:
            parts.append(f"b{config.sigma_between:g}{config.between_granularity}")
    parts.append(f"e{config.epochs}")
    if config.limit_train is not None:
        parts.append(f"n{config.limit_train}")
    parts.append(f"seed{config.seed}")
    return "_".join(parts)


def train_or_load(config: TrainConfig, runs: Path, progress: bool = True):
    """Train ``config`` in ``runs/<run_name>`` unless finished there; return (model, vars, dir)."""
    workdir = Path(runs) / run_name(config)
    done = workdir / "done.json"
    if not done.exists():
        if progress:
            print(f"training {workdir.name}", flush=True)
        metrics = train(config, workdir, resume=_has_checkpoint(workdir), progress=progress)
        done.write_text(json.dumps(_jsonable(metrics), indent=2))
    model, variables, _ = load_model(workdir)
    return model, variables, workdir


def _has_checkpoint(workdir: Path) -> bool:
    return any((workdir / sub).is_dir() and any((workdir / sub).iterdir())
               for sub in ("checkpoints", "best"))


def eval_data(dataset: str, test_images: int | None, calib_images: int,
              data_dir: str | None = None):
    """(test Dataset, normalized unlabeled calibration images from the training split)."""
    data_dir = data_dir_for(dataset, data_dir)
    test = data.load_dataset(dataset, "test", data_dir, limit=test_images)
    calib = data.load_dataset(dataset, "train", data_dir, limit=calib_images)
    return test, np.asarray(data.normalize(calib.images, dataset))


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def write_results(out: Path, name: str, rows: list[dict], meta: dict) -> None:
    """Write ``<name>.json`` (meta and rows) and ``<name>.csv`` (rows) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(meta, command=" ".join(sys.argv))
    (out / f"{name}.json").write_text(json.dumps(_jsonable({"meta": meta, "rows": rows}),
                                                 indent=2))
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(_jsonable(rows))


def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def floats(text: str) -> tuple[float, ...]:
    """Parse a comma-separated list of floats (argparse type): '0,0.1' -> (0.0, 0.1)."""
    return _parse_list(text, float, "numbers")


def ints(text: str) -> tuple[int, ...]:
    """Parse a comma-separated list of ints (argparse type): '1,2' -> (1, 2)."""
    return _parse_list(text, int, "integers")


def _parse_list(text: str, kind, what: str) -> tuple:
    try:
        return tuple(kind(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {what}") \
            from None


def add_run_args(p) -> None:
    """Options every claim experiment shares: training size, evaluation size, data, seed."""
    p.add_argument("--epochs", type=int, default=None, help="default: the setup's")
    p.add_argument("--train-images", type=int, default=None, help="default: all")
    p.add_argument("--test-images", type=int, default=1000)
    p.add_argument("--chips", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--digital-first-last", action="store_true",
                   help="keep the first and last layers digital (no variation)")
    p.add_argument("--smoke", action="store_true", help="seconds-long run on tiny data (tests)")


# ------------------------------------------------------------------ between-chip sweeps


def add_between_args(p, default_out: str) -> None:
    """Options shared by the between-chip sweeps (claims 2 and 3)."""
    p.add_argument("--setup", default="lenet5", choices=tuple(SETUPS))
    p.add_argument("--out", default=default_out, help="output directory")
    p.add_argument("--runs", default=None, help="trained models (default <out>/runs)")
    p.add_argument("--quant", default="W2A4")
    p.add_argument("--sigma-total", type=float, default=0.3,
                   help="total sigma split between within and between")
    p.add_argument("--fractions", type=floats, default=(0.0, 0.25, 0.5, 0.75, 1.0),
                   help="between-chip share of the variance")
    p.add_argument("--granularities", type=lambda s: tuple(s.split(",")),
                   default=("chip", "layer"))
    p.add_argument("--train-sigma", type=float, default=None,
                   help="qavat's training sigma_within (default: --sigma-total)")
    p.add_argument("--calib-images", type=int, default=256, help="unlabeled calibration images")
    add_run_args(p)


def finish_between_args(p, args):
    """Apply --smoke and the defaults, validate; return args."""
    if args.smoke:
        args.fractions = (0.0, 1.0)
        args.granularities = ("layer",)
        args.epochs, args.train_images, args.test_images = 1, 256, 64
        args.chips, args.calib_images = 4, 64
        args.batch_size = args.batch_size or 32
        if args.train_sigma is None:
            args.train_sigma = 0.2
    from pimjax.variability import GRANULARITIES

    bad = [g for g in args.granularities if g not in GRANULARITIES]
    if bad:
        p.error(f"--granularities {bad} unknown: use some of {GRANULARITIES}")
    if any(not 0 <= f <= 1 for f in args.fractions):
        p.error("--fractions must be in [0, 1]")
    if args.sigma_total <= 0:
        p.error("--sigma-total must be > 0")
    setup = check_setup(args.setup)
    args.epochs = args.epochs or setup["epochs"]
    args.train_sigma = args.sigma_total if args.train_sigma is None else args.train_sigma
    args.out = Path(args.out)
    args.runs = Path(args.runs) if args.runs else args.out / "runs"
    return args


def qavat_model(args, progress: bool = True):
    """Train (or reuse) the sweep's qavat model; return (model, variables, run dir)."""
    setup = check_setup(args.setup)
    base = base_config(setup, epochs=args.epochs, train_images=args.train_images,
                       test_images=args.test_images, seed=args.seed, data_dir=args.data_dir,
                       batch_size=args.batch_size, digital_first_last=args.digital_first_last)
    config = TrainConfig(**base, method="qavat", quant=args.quant, sigma_within=args.train_sigma)
    return train_or_load(config, args.runs, progress)


def between_sweep(args, tunes=("none",), progress: bool = True) -> list[dict]:
    """Evaluate the qavat model at every (granularity, between fraction), per self-tune variant.

    ``tunes``: "none" and/or :data:`pimjax.selftune.METHODS`. Every variant sees the same
    chips (chip i from ``fold_in(key, i)``).
    """
    import jax

    from pimjax import selftune
    from pimjax.montecarlo import evaluate_chips
    from pimjax.variability import VariabilityModel

    setup = check_setup(args.setup)
    model, variables, workdir = qavat_model(args, progress)
    test, calib = eval_data(setup["dataset"], args.test_images, args.calib_images,
                            args.data_dir)
    stats = selftune.nominal_stats(model, variables, calib)
    key = jax.random.key(args.seed + 1)
    rows = []
    for gran in args.granularities:
        for frac in args.fractions:
            vm = VariabilityModel.from_total(args.sigma_total, frac, between_granularity=gran)
            for tune in tunes:
                tuning = None if tune == "none" else selftune.SelfTune(tune, calib, stats)
                res = evaluate_chips(model, variables, vm, key, args.chips, test,
                                     tuning=tuning, progress=False)
                s = res.summary()
                cost = res.tune_cost
                rows.append({
                    "granularity": gran, "between_fraction": frac,
                    "sigma_within": vm.sigma_within, "sigma_between": vm.sigma_between,
                    "self_tune": tune, "nominal": s["nominal"], "mean": s["mean"],
                    "p5": s["p5"], "min": s["min"], "std": s["std"],
                    "drop_mean": s["drop_mean"], "drop_p5": s["drop_p5"],
                    "chips": s["chips"], "test_images": res.num_images,
                    "calib_images": cost.images if cost else 0,
                    "calib_passes": cost.passes if cost else 0,
                    "calib_cost": str(cost) if cost else "", "run": workdir.name,
                })
                if progress:
                    print(f"{gran:<6} between {frac:.2f} {tune:<12} mean {100 * s['mean']:.2f} "
                          f"drop {100 * s['drop_mean']:.2f}", flush=True)
    return rows


def run_between(args, name: str, tunes, title: str, progress: bool = True) -> list[dict]:
    """Run :func:`between_sweep`, write ``<name>.json``/``.csv``/``_table.txt``/``.png``; return
    the rows."""
    rows = between_sweep(args, tunes, progress)
    write_results(args.out, name, rows, {"args": args_meta(args)})
    (args.out / f"{name}_table.txt").write_text(format_between(rows) + "\n")
    plot_between(args, rows, args.out / f"{name}.png",
                 f"{name}, {args.setup} {args.quant} qavat: {title}sigma_total "
                 f"{args.sigma_total}, {args.chips} chips")
    return rows


def report_between(args, rows, name: str, seconds: float, extra: str = "") -> None:
    """Print a between-chip sweep's header, table and the files it wrote."""
    print(f"{args.setup} {args.quant} qavat (trained at sigma_within {args.train_sigma}), "
          f"sigma_total {args.sigma_total}, {args.chips} chips{extra}; accuracy in %")
    print(format_between(rows))
    print(f"wrote {args.out}/{name}.json, {name}.csv, {name}_table.txt, {name}.png "
          f"({seconds:.0f} s)")


def text_table(rows, columns) -> str:
    """A fixed-width text table. ``columns``: (header, key, width, kind) with kind "text"
    (left-aligned), "rtext" (right-aligned), "pct" (100 x value, 2 decimals), "num" (2
    decimals) or "tail" (as is, after two spaces)."""
    def cell(kind, width, value):
        if kind == "text":
            return f"{value:<{width}}"
        if kind == "rtext":
            return f"{value:>{width}}"
        if kind == "tail":
            return f"  {value}"
        return f"{(100 * value if kind == 'pct' else value):>{width}.2f}"

    head = "".join(f"  {h}" if k == "tail" else f"{h:<{w}}" if k == "text" else f"{h:>{w}}"
                   for h, _, w, k in columns)
    lines = [head, "-" * len(head)]
    lines += ["".join(cell(k, w, r[key]) for _, key, w, k in columns).rstrip() for r in rows]
    return "\n".join(lines)


BETWEEN_COLUMNS = (("gran", "granularity", 7, "text"), ("between", "between_fraction", 8, "num"),
                   ("self-tune", "self_tune", 13, "rtext"), ("nominal", "nominal", 9, "pct"),
                   ("mean", "mean", 8, "pct"), ("p5", "p5", 8, "pct"),
                   ("drop", "drop_mean", 8, "pct"), ("drop p5", "drop_p5", 9, "pct"),
                   ("cost", "calib_cost", 0, "tail"))


def format_between(rows) -> str:
    """The printed table of a between-chip sweep (accuracy and drops in %)."""
    return text_table(rows, BETWEEN_COLUMNS)


def plot_between(args, rows, path: Path, title: str) -> None:
    """Mean accuracy drop vs between fraction, one panel per granularity, a line per variant."""
    plt = pyplot()
    grans = list(dict.fromkeys(r["granularity"] for r in rows))
    tunes = list(dict.fromkeys(r["self_tune"] for r in rows))
    fig, axes = plt.subplots(1, len(grans), figsize=(max(6.5, 4.5 * len(grans)), 4),
                             squeeze=False)
    for ax, gran in zip(axes[0], grans, strict=True):
        for i, tune in enumerate(tunes):
            sel = [r for r in rows if r["granularity"] == gran and r["self_tune"] == tune]
            xs = [r["between_fraction"] for r in sel]
            ax.plot(xs, [100 * r["drop_mean"] for r in sel], "-o", color=f"C{i}", ms=3,
                    label=f"{tune} (mean)")
            ax.plot(xs, [100 * r["drop_p5"] for r in sel], "--", color=f"C{i}",
                    label=f"{tune} (p5)")
        ax.set_title(f"between granularity: {gran}", fontsize=9)
        ax.set_xlabel("between-chip share of the variance")
        ax.set_ylabel("accuracy drop vs nominal (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(textwrap.fill(title, 90), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def args_meta(args) -> dict:
    """argparse namespace as JSON-friendly dict."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
