"""Quickstart: QAT vs QAVAT LeNet-5 W2A4 on 1000 simulated chips, before and after self-tuning.

On the MNIST copy bundled with pimjax (offline), trains LeNet-5 W2A4 with ``qat``
(variability-oblivious) and with ``qavat`` (sigma_within 0.3), samples 1000 chips with
within- and between-chip variation, evaluates every chip, self-tunes every chip
(label-free, per-channel gain and offset) and evaluates again. Prints a table, writes
``results.json``, ``results.csv`` and ``quickstart.png`` into ``--out``.

    python experiments/quickstart.py                      # defaults: under 5 minutes on 2 CPU cores
    python experiments/quickstart.py --epochs 10 --train-images 60000 --test-images 10000
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import common
import jax
import numpy as np

from pimjax import data, selftune
from pimjax.checkpoint import load_model
from pimjax.layers import analog_kernels
from pimjax.montecarlo import evaluate_chips
from pimjax.train import TrainConfig, train
from pimjax.variability import VariabilityModel, sign_flipped_chips


def parse_args(argv=None):
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/quickstart", help="output directory")
    p.add_argument("--quant", default="W2A4")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-images", type=int, default=20000, help="training images used")
    p.add_argument("--test-images", type=int, default=200, help="test images per chip")
    p.add_argument("--chips", type=int, default=1000)
    p.add_argument("--train-sigma", type=float, default=0.3, help="qavat's sigma_within")
    p.add_argument("--sigma-within", type=float, default=0.2, help="evaluation sigma_within")
    p.add_argument("--sigma-between", type=float, default=0.3, help="evaluation sigma_between")
    p.add_argument("--granularity", default="layer", help="between-chip granularity")
    p.add_argument("--tune", default="channel", choices=selftune.METHODS,
                   help="self-tuning variant")
    p.add_argument("--calib-images", type=int, default=256, help="unlabeled calibration images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="seconds-long run on tiny data (tests)")
    args = p.parse_args(argv)
    if args.smoke:
        args.epochs, args.train_images, args.test_images = 1, 512, 128
        args.chips, args.calib_images = 16, 64
    return args


def train_method(args, method: str, out: Path):
    """Train (or reuse a finished run of) one method; return (model, variables, metrics)."""
    config = TrainConfig(
        model="lenet5", dataset="mnist", quant=args.quant, method=method,
        sigma_within=args.train_sigma if method == "qavat" else 0.0,
        epochs=args.epochs, batch_size=128, lr=1e-3, optimizer="adam", schedule="cosine",
        seed=args.seed, limit_train=args.train_images, limit_test=args.test_images,
    )
    workdir = out / method
    metrics = train(config, workdir, resume=(workdir / "config.json").exists(), progress=True)
    model, variables, _ = load_model(workdir)
    return model, variables, metrics


def run(args) -> list[dict]:
    """Train both methods, sweep the chips before and after self-tuning; return table rows."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    variability = VariabilityModel(args.sigma_within, args.sigma_between, args.granularity)
    test = data.load_dataset("mnist", "test", limit=args.test_images)
    calib = data.load_dataset("mnist", "train", limit=args.calib_images)
    calib_images = np.asarray(data.normalize(calib.images, "mnist"))
    key = jax.random.key(args.seed + 1)  # the same 1000 chips for every model and variant
    rows, per_chip, flipped = [], {}, None
    for method in ("qat", "qavat"):
        model, variables, _ = train_method(args, method, out)
        if flipped is None:  # the chips depend on the key and the layer shapes only
            flipped = np.asarray(sign_flipped_chips(key, variability, analog_kernels(variables),
                                                    args.chips))
        stats = selftune.nominal_stats(model, variables, calib_images)
        tuning = selftune.SelfTune(args.tune, calib_images, stats)
        for tuned in (False, True):
            res = evaluate_chips(model, variables, variability, key, args.chips, test,
                                 tuning=tuning if tuned else None)
            s = res.summary()
            label = f"{method} {'+ ' + args.tune if tuned else '(untuned)'}"
            per_chip[label] = res.accuracy
            kept = np.asarray(res.accuracy)[~flipped]
            rows.append({
                "method": method, "self_tune": args.tune if tuned else "none",
                "nominal": s["nominal"], "mean": s["mean"], "p5": s["p5"], "min": s["min"],
                "std": s["std"], "drop_mean": s["drop_mean"], "chips": s["chips"],
                "sign_flipped_chips": int(flipped.sum()),
                "min_unflipped": float(kept.min()) if kept.size else float("nan"),
                "test_images": res.num_images,
                "calib_cost": str(res.tune_cost) if res.tune_cost else "",
                "chip_images_per_s": res.chip_images_per_second,
            })
    _write(out, args, variability, rows, per_chip)
    return rows


def _write(out: Path, args, variability, rows, per_chip) -> None:
    meta = {"args": common.args_meta(args), "variability": variability.__dict__,
            "data": "mnist (bundled)"}
    common.write_results(out, "results", rows, meta)
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(min(float(np.min(a)) for a in per_chip.values()), 1.0, 41)
    for label, acc in per_chip.items():
        ax.hist(acc, bins=bins, alpha=0.55, label=label)
    ax.set_xlabel("per-chip test accuracy")
    ax.set_ylabel("chips")
    ax.set_title(f"LeNet-5 {args.quant}, {args.chips} chips, sigma_within {args.sigma_within}, "
                 f"sigma_between {args.sigma_between} ({args.granularity})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "quickstart.png", dpi=120)
    plt.close(fig)


def format_table(rows) -> str:
    """The printed results table."""
    return common.text_table(rows, (
        ("method", "method", 8, "text"), ("self-tune", "self_tune", 11, "text"),
        ("nominal", "nominal", 9, "pct"), ("mean", "mean", 8, "pct"), ("p5", "p5", 8, "pct"),
        ("min", "min", 8, "pct"), ("drop", "drop_mean", 8, "pct")))


def main(argv=None) -> None:
    """Run the quickstart and print its table."""
    args = parse_args(argv)
    start = time.perf_counter()
    rows = run(args)
    print()
    print(f"LeNet-5 {args.quant} on MNIST ({args.test_images} test images), {args.chips} chips: "
          f"sigma_within {args.sigma_within}, sigma_between {args.sigma_between} "
          f"({args.granularity}); accuracy in %")
    print(format_table(rows))
    cost = next((r["calib_cost"] for r in rows if r["calib_cost"]), "")
    print(f"self-tuning cost per chip: {cost}")
    flips = rows[0]["sign_flipped_chips"]
    if flips:
        worst = ", ".join(f"{r['method']} {r['self_tune']} {100 * r['min_unflipped']:.2f}"
                          for r in rows)
        print(f"{flips} of {args.chips} chips have a layer whose between-chip factor is negative "
              f"(a sign flip of the normal model that no positive gain undoes); the worst "
              f"other chip (%): {worst}")
    print(f"wrote {args.out}/results.json, results.csv, quickstart.png "
          f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
