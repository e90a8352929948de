"""Accuracy against read time on PCM chips: drift from 1 s to 10 years, with and without
compensation.

Trains (or reuses) LeNet-5 on MNIST three ways: ``qat`` (no device in training),
``qavat-paper`` (noise-aware under the paper's multiplicative variability) and ``qavat-pcm``
(noise-aware under the PCM device itself, aihwkit's hardware-aware training), then scores the
same N chips of the ``pcm`` preset at every read time under every compensation of
:mod:`pimjax.drift`: none, aihwkit's global drift compensation (``drift``), and each label-free
self-tuning variant applied to the uncompensated drifted chip. Reports accuracy mean, 5th
percentile and min over chips.

    python experiments/drift.py --smoke                     # seconds (tests)
    python experiments/drift.py                             # LeNet-5 W4A8, CPU-sized
    python experiments/drift.py --chips 100 --compensations none drift channel

Writes ``drift.json``/``drift.csv``, ``drift_table.txt`` and ``drift.png`` into ``--out``; the
trained models go to ``--runs`` (default ``<out>/runs``) and each finished evaluation to
``<out>/evals``, so a rerun (or a run stopped half-way) reuses them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Literal

import numpy as np
import tyro

from pimjax import data, devices, drift, files, runtime, selftune
from pimjax.devices import DeviceConfig
from pimjax.models import ModelConfig
from pimjax.quant import QuantConfig
from pimjax.train import DataConfig, OptimConfig, TrainConfig, load_model, train

MODELS = ("qat", "qavat-paper", "qavat-pcm")
DONE = "done.json"


@dataclasses.dataclass(frozen=True)
class Drift:
    """The drift experiment's settings."""

    out: Path = Path("results/drift")
    """output folder (locked while the experiment runs)"""
    runs: Path | None = None
    """folder of the trained models (default: <out>/runs)"""
    models: tuple[Literal[MODELS], ...] = MODELS
    """which trained models to evaluate"""
    quant: str = "W4A8"
    """weight/activation bits of every model"""
    paper_sigma: float = 0.1
    """qavat-paper's training sigma_within (the paper's multiplicative variability)"""
    epochs: int = 3
    train_images: int | None = 20000
    """the first N training images (None: all 60,000)"""
    test_images: int | None = 1000
    """the first N test images, scored on every chip (None: all 10,000)"""
    chips: int = 50
    """PCM chips per point (the same chips at every point)"""
    times: tuple[float, ...] = tuple(drift.TIMES.values())
    """read times, seconds after programming"""
    compensations: tuple[Literal[drift.COMPENSATIONS], ...] = drift.COMPENSATIONS
    calib_images: int = 256
    """self-tuning's unlabeled calibration images: the first N training images"""
    seed: int = 0
    data_dir: str | None = None
    """dataset folder (default: $PIMJAX_DATA_DIR; MNIST is bundled)"""
    progress: bool = True
    smoke: bool = False
    """seconds-long run on tiny data (tests); changes only the defaults of flags not given"""

    def check(self) -> None:
        """Raise ValueError (naming the flag) on a bad setting, before any work."""
        if QuantConfig.parse(self.quant).is_float:
            raise ValueError(f"--quant {self.quant} is float: give weight and activation bits "
                             "(e.g. W4A8)")
        for field in ("epochs", "chips", "calib_images"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"--{field.replace('_', '-')}={v!r} must be a positive integer")
        for field in ("train_images", "test_images"):
            v = getattr(self, field)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"--{field.replace('_', '-')}={v!r} must be a positive integer")
        if not self.paper_sigma > 0:
            raise ValueError(f"--paper-sigma={self.paper_sigma!r} must be > 0: qavat-paper "
                             "trains under variation")
        if not self.times or any(not (t >= 0 and np.isfinite(t)) for t in self.times):
            raise ValueError(f"--times {self.times} must be finite seconds >= 0")
        for name, values in (("models", self.models), ("compensations", self.compensations)):
            if not values:
                raise ValueError(f"--{name} is empty: give at least one")

    @property
    def runs_dir(self) -> Path:
        """Where the trained models live."""
        return self.runs if self.runs is not None else self.out / "runs"


def smoke_defaults() -> Drift:
    """The --smoke defaults: seconds on two cores."""
    return Drift(models=("qat", "qavat-pcm"), epochs=1, train_images=256, test_images=64,
                 chips=3, times=(1.0, drift.YEAR), compensations=("none", "drift", "channel"),
                 calib_images=32, progress=False, smoke=True)


# ---------------------------------------------------------------------------------- models


def train_config(args: Drift, model: str) -> TrainConfig:
    """The TrainConfig of ``qat``, ``qavat-paper`` or ``qavat-pcm``."""
    device = {"qat": DeviceConfig(),
              "qavat-paper": DeviceConfig(sigma_within=args.paper_sigma),
              "qavat-pcm": DeviceConfig(preset="pcm")}[model]
    return TrainConfig(
        train_method="qat" if model == "qat" else "qavat", model=ModelConfig("lenet5"),
        data=DataConfig("mnist", args.data_dir, args.train_images, args.test_images),
        quant=QuantConfig.parse(args.quant), device=device,
        optim=OptimConfig(optimizer="adam", lr=1e-3, epochs=args.epochs, batch_size=128
                          if (args.train_images or 60000) >= 1024 else 32),
        seed=args.seed)


def run_name(config: TrainConfig, model: str) -> str:
    """A run directory name: the model's label, bits, epochs, training images and seed."""
    n = config.data.train_images
    extra = f"_s{config.device.sigma_within:g}" if model == "qavat-paper" else ""
    return (f"lenet5_mnist_{model}{extra}_{config.quant.name.lower()}_e{config.optim.epochs}"
            f"{'' if n is None else f'_n{n}'}_seed{config.seed}")


def train_or_load(config: TrainConfig, workdir: Path, progress: bool):
    """Train ``config`` in ``workdir`` unless it finished there (resuming an interrupted run)."""
    done = workdir / DONE
    if done.is_file():
        saved = json.loads((workdir / "config.json").read_text())
        now = config.to_dict()
        for part in ("data", "eval"):  # fields that do not change the trained weights
            saved.pop(part, None)
            now.pop(part, None)
        if saved != now:
            raise ValueError(f"{workdir} holds a finished run of another config: use another "
                             "--runs folder, or delete that run")
    else:
        if progress:
            print(f"training {workdir.name}", flush=True)
        summary = train(config, workdir=workdir, resume=True, progress=progress).summary
        files.write_json(done, summary)
    model, variables, _ = load_model(workdir)
    return model, variables


# ----------------------------------------------------------------------------- evaluation


def eval_path(args: Drift, run: str, compensation: str, t: float) -> tuple[Path, dict]:
    """The cache file of one point and the settings it must have been computed with."""
    settings = {"run": run, "compensation": compensation, "t": float(t), "chips": args.chips,
                "test_images": args.test_images, "seed": args.seed,
                "calib_images": args.calib_images, "device": repr(devices.pcm())}
    tag = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return args.out / "evals" / f"{run}_{compensation}_{t:g}s_{tag}.json", settings


def sweep(args: Drift) -> list[dict]:
    """Every (model, compensation, time) point: trained or reused models, cached points."""
    test = data.load_dataset("mnist", "test", args.data_dir, limit=args.test_images)
    calib = np.asarray(data.normalize(
        data.load_dataset("mnist", "train", args.data_dir, limit=args.calib_images).images,
        "mnist"))
    key = jax_key(args.seed)
    rows = []
    for name in args.models:
        config = train_config(args, name)
        run = run_name(config, name)
        model, variables = train_or_load(config, args.runs_dir / run, args.progress)
        stats = None
        for comp in args.compensations:
            for t in args.times:
                path, settings = eval_path(args, run, comp, t)
                if path.is_file() and json.loads(path.read_text())["settings"] == settings:
                    row = json.loads(path.read_text())["row"]
                else:
                    if comp in selftune.NEEDS_STATS and stats is None:
                        stats = selftune.nominal_stats(model, variables, calib)
                    row = drift.evaluate_drift(
                        model, variables, devices.pcm(), comp, t, key, args.chips, test,
                        calib=calib, stats=stats, progress=False)
                    row = {"model": name, **row}
                    files.write_json(path, {"settings": settings, "row": row})
                if args.progress:
                    print(f"  {name:12s} {comp:12s} {row['time']:>9s}  mean {row['mean']:.4f}"
                          f"  p5 {row['p5']:.4f}  min {row['min']:.4f}", flush=True)
                rows.append(row)
    return rows


def jax_key(seed: int):
    """The chips' root key (chip i of every point is ``fold_in(key, i)``)."""
    import jax

    return jax.random.key(seed + 1)


# --------------------------------------------------------------------------------- output


def table(rows: list[dict], stat: str) -> str:
    """A text table of ``stat`` (mean, p5, min; in %): one row per model and compensation,
    one column per read time."""
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


def plot(rows: list[dict], path: Path) -> None:
    """Mean and 5th-percentile accuracy against read time, one column per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    comps = list(dict.fromkeys(r["compensation"] for r in rows))
    fig, axes = plt.subplots(2, len(models), figsize=(4.5 * len(models), 7), squeeze=False,
                             sharex=True)
    for j, model in enumerate(models):
        for i, stat in enumerate(("mean", "p5")):
            ax = axes[i, j]
            for comp in comps:
                pts = sorted((r["t"], r[stat]) for r in rows
                             if r["model"] == model and r["compensation"] == comp)
                if pts:
                    ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", ms=3,
                            label=comp)
            ax.set_xscale("log")
            ax.set_title(f"{model}: {stat} over chips")
            ax.set_ylabel("accuracy (%)")
            ax.grid(alpha=0.3)
        axes[1, j].set_xlabel("read time after programming (s)")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    files.save_figure(fig, path, dpi=120)
    plt.close(fig)


def run(args: Drift) -> list[dict]:
    """Train or reuse the models, sweep every point, write the result files; return the rows."""
    start = time.perf_counter()
    with files.run_lock(args.out):
        rows = sweep(args)
        meta = {"args": files.jsonable(args), "command": " ".join(sys.argv),
                "device": repr(devices.pcm()), "seconds": time.perf_counter() - start}
        files.write_json(args.out / "drift.json", {"meta": meta, "rows": rows})
        files.write_csv(args.out / "drift.csv", rows)
        text = "\n\n".join(f"{stat} accuracy over {args.chips} PCM chips (%)\n"
                           f"{table(rows, stat)}" for stat in ("mean", "p5", "min"))
        files.write_text(args.out / "drift_table.txt", text + "\n")
        plot(rows, args.out / "drift.png")
    print(text)
    return rows


def main(argv=None) -> list[dict]:
    """Parse the flags (``--smoke`` changes the defaults of the others) and run."""
    argv = list(sys.argv[1:] if argv is None else argv)
    default = smoke_defaults() if "--smoke" in argv else Drift()
    try:
        args = tyro.cli(Drift, args=argv, default=default, description=__doc__)
        args.check()
        runtime.configure()
        return run(args)
    except (ValueError, FileNotFoundError, files.RunLockedError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
