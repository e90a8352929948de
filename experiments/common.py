"""Shared pieces of the experiment scripts: data, trained runs, chip evaluations, result files.

* Data: :func:`load_split` (the first N images of a split, with a warning when N exceeds
  it) and :func:`calibration_images` (the first N training images: every script picks
  self-tuning's unlabeled images this way, so their numbers pair up).
* Runs: every trained model lives in ``<runs>/<run_name(config)>``. A finished run
  (``done.json``) is reused after checking that its saved config is the one asked for; an
  interrupted one resumes from its last checkpoint, so a sweep that stops continues where
  it was; one that another process is training (its lock) is waited for, then reused.
* Chips: :func:`chip_key` (chip i of every evaluation is ``fold_in(chip_key(seed), i)``,
  the same chips for every model and variant) and :func:`evaluate` (at sigma 0 the nominal
  model, once, instead of N identical chips).
* Results: :func:`write_results` writes ``<name>.json`` (meta + rows) and ``<name>.csv``
  atomically (:mod:`pimjax.files`); tables, plots and the claim-2/3 sweep as a grid of
  cells (:mod:`grid`: sharded over jobs, merged once all are done).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import textwrap
import time
import warnings
from pathlib import Path

import grid
import jax
import jax.numpy as jnp
import numpy as np
import tyro

from pimjax import cli, data, devices, distributed, files, introspect, montecarlo, selftune
from pimjax.configs import claims, setups
from pimjax.train import TrainConfig, load_model, train

FLAT = tyro.conf.arg(name="")  # a nested dataclass whose flags carry no prefix
DONE = "done.json"
# Share of a GEMM's FLOP rate a conv net reaches (the run-time estimate's assumption;
# ResNet-20 training reached about that on two CPU cores, see benchmarks/train_step.py).
EFFICIENCY = 0.25


# ------------------------------------------------------------------------------------ data


def load_split(name: str, split: str, data_dir: str | None, limit: int | None) -> data.Dataset:
    """The first ``limit`` images of a split (all for None); warns when ``limit`` exceeds it."""
    ds = data.load_dataset(name, split, data_dir, limit=limit)
    if limit is not None and len(ds) < limit:
        warnings.warn(f"{limit} {split} images asked for, but the {name} {split} split has "
                      f"{len(ds)}: using {len(ds)}", stacklevel=2)
    return ds


def calibration_images(name: str, count: int, data_dir: str | None) -> np.ndarray:
    """Self-tuning's unlabeled calibration images: the first ``count`` training images,
    normalized (the same images in every script)."""
    return np.asarray(data.normalize(load_split(name, "train", data_dir, count).images, name))


def chip_key(seed: int):
    """The key of every evaluation's chips (chip i is ``fold_in(chip_key(seed), i)``)."""
    return jax.random.key(seed + 1)


# ------------------------------------------------------------------------------------ runs


@dataclasses.dataclass(frozen=True)
class Run:
    """A trained model: module, variables, run directory and its training summary."""

    model: object
    variables: dict
    workdir: Path
    summary: dict


def run_name(config: TrainConfig) -> str:
    """A directory name naming a run's model, data, method, quantization, sigma and size."""
    parts = [config.model.name]
    if config.model.width != 1.0:
        parts.append(f"w{config.model.width:g}")
    if config.model.digital_first_last:
        parts.append("dfl")
    parts += [config.data.name, config.train_method]
    if not config.quant.is_float:
        parts.append(config.quant.name.lower())
    d = config.device
    if d.preset == "pcm":  # the PCM device names itself, with its non-default settings
        parts.append("pcm" + "".join(s for s, on in (
            ("-dc", d.drift_compensation), (f"-z{d.stuck_zero:g}", d.stuck_zero),
            (f"-g{d.stuck_gmax:g}", d.stuck_gmax), ("-noper", not d.periphery)) if on))
    elif not d.is_ideal:
        parts.append(f"s{d.sigma_within:g}")
    if not d.is_ideal:
        if config.device.sigma_between:
            parts.append(f"b{config.device.sigma_between:g}{config.device.between_granularity}")
    if config.train_method != "ptq":
        parts.append(f"e{config.optim.epochs}")
    if config.data.train_images is not None:
        parts.append(f"n{config.data.train_images}")
    parts.append(f"seed{config.seed}")
    return "_".join(parts)


# Fields that do not change the trained weights: a finished run is reused whatever they are.
EVALUATION_ONLY = ("data.data_dir", "data.test_images", "eval.")


def config_diff(now: dict, saved: dict) -> str:
    """The fields (but evaluation-only ones) where two TrainConfig dicts differ, as text."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
        return out

    a, b = flat(now), flat(saved)
    keys = sorted(k for k in set(a) | set(b)
                  if not k.startswith(EVALUATION_ONLY) and a.get(k) != b.get(k))
    return ", ".join(f"{k}: {b.get(k)!r} -> {a.get(k)!r}" for k in keys)


def ensure_trained(config: TrainConfig, runs: Path, progress: bool = True) -> tuple[Path, dict]:
    """Train ``config`` in ``runs/<run_name>`` unless it finished there: (its folder, summary).

    A run that another job is training (it holds the run's lock) is waited for, then reused.
    """
    workdir = Path(runs) / run_name(config)
    done = workdir / DONE
    say = print if distributed.is_primary() else _quiet
    while not distributed.agree(done.is_file()):  # process 0's view decides for all
        if progress:
            say(f"training {workdir.name}", flush=True)
        try:
            summary = train(config, workdir=workdir, resume=True, progress=progress).summary
        except files.RunLockedError:  # raised in every process of this run
            say(f"waiting for {workdir.name}: another run is training it", flush=True)
            with files.run_lock(workdir, wait=True):
                continue
        if distributed.is_primary():
            files.write_json(done, summary)
        return workdir, summary
    saved = json.loads((workdir / "config.json").read_text())
    diff = config_diff(config.to_dict(), saved)
    if diff:
        raise ValueError(f"{workdir} holds a finished run of another config ({diff}): use "
                         "another --runs folder, or delete that run")
    return workdir, json.loads(done.read_text())


def training_cell(config: TrainConfig, runs: Path, progress: bool = True,
                  source: TrainConfig | None = None) -> grid.Cell:
    """The grid cell that trains ``config`` (finished: its done.json); ``source``: a run
    trained (or waited for) first, e.g. the float model a ptq run quantizes."""
    def compute() -> None:
        if source is not None:
            ensure_trained(source, runs, progress)
        ensure_trained(config, runs, progress)

    return grid.Cell(f"train {run_name(config)}", Path(runs) / run_name(config) / DONE, compute)


def train_or_load(config: TrainConfig, runs: Path, progress: bool = True) -> Run:
    """Train ``config`` in ``runs/<run_name>`` unless it finished there; return the run."""
    workdir, summary = ensure_trained(config, runs, progress)
    model, variables, _ = load_model(workdir)
    return Run(model, variables, workdir, summary)


def _quiet(*args, **kwargs) -> None:
    """print() of the processes other than process 0 of a multi-process run."""


# ----------------------------------------------------------------------------- evaluation


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Per-chip accuracy and loss of one sweep point, its summary and its cost.

    ``image_accuracy``: each test image's share of chips that got it right (the nominal
    model's 0/1 correctness when it was evaluated once), for standard errors and paired
    differences (:func:`difference`).
    """

    summary: dict  # pimjax.montecarlo.summarize's: chips, mean, std, min, p5, ..., drops, se
    accuracy: np.ndarray
    loss: np.ndarray
    num_images: int
    tune_cost: selftune.TuneCost | None
    seconds: float
    image_accuracy: np.ndarray | None = None


ARRAYS = ("chip_accuracy", "image_accuracy")  # per-chip and per-image accuracies of a row


def without_arrays(rows) -> list[dict]:
    """The rows without their per-chip and per-image accuracies (the result files' rows)."""
    return [{k: v for k, v in r.items() if k not in ARRAYS} for r in rows]


@functools.lru_cache(maxsize=8)
def _logits(model):
    return jax.jit(lambda variables, x: model.apply(variables, x))


def nominal_metrics(model, variables, dataset) -> tuple[float, float, np.ndarray]:
    """Accuracy, mean cross-entropy and per-image correctness (0/1 ``[M]``) of the nominal
    model (no chip) on ``dataset``."""
    images, labels = montecarlo.dataset_arrays(model, dataset)
    n = images.shape[0]
    # Batches of >= MIN_IMAGES_PER_CHUNK images (padded) round as evaluate_chips' chunks do.
    size = max(montecarlo.MIN_IMAGES_PER_CHUNK, min(montecarlo.MAX_IMAGES_PER_CHUNK, n))
    correct, total = [], 0.0
    for start in range(0, n, size):
        x, y = images[start:start + size], labels[start:start + size]
        pad = size - x.shape[0]
        if pad:
            x = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)])
        logits = np.asarray(_logits(model)(variables, x), np.float64)[:len(y)]
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        correct.append(logits.argmax(-1) == y)
        total += float(-logp[np.arange(len(y)), y].sum())
    correct = np.concatenate(correct).astype(np.float64)
    return float(correct.mean()), total / n, correct


def evaluate(model, variables, variability: devices.VariabilityModel, key, num_chips: int,
             test: data.Dataset, *, tuning: selftune.SelfTune | None = None,
             budget_bytes: int | None = None, thresholds=(), progress: bool = False
             ) -> Evaluation:
    """``num_chips`` chips of the paper's device on ``test``; with no variation, the nominal
    model once (every chip would be the same). ``tuning`` self-tunes each chip first."""
    device = devices.from_variability(variability)
    if device.is_ideal:
        start = time.perf_counter()
        acc, loss, correct = nominal_metrics(model, variables, test)
        summary = montecarlo.summarize([acc], acc, thresholds, loss=[loss], nominal_loss=loss)
        summary["se"] = montecarlo.paired_standard_error([acc], correct)
        return Evaluation(summary, np.array([acc]), np.array([loss]), len(test), None,
                          time.perf_counter() - start, correct)
    res = montecarlo.evaluate_chips(model, variables, device, key, num_chips, test,
                                    tuning=tuning, budget_bytes=budget_bytes, progress=progress)
    return Evaluation(res.summary(thresholds), res.accuracy, res.loss, res.num_images,
                      res.tune_cost, res.seconds, res.image_accuracy)


# -------------------------------------------------------------------------- result files


def meta(config, **extra) -> dict:
    """A result file's metadata: the settings, the command line and ``extra``."""
    return {"args": files.jsonable(config), "command": " ".join(sys.argv), **extra}


def write_results(out: Path, name: str, rows: list[dict], meta: dict) -> None:
    """Write ``<name>.json`` (meta and rows) and ``<name>.csv`` (rows) into ``out``."""
    files.write_json(Path(out) / f"{name}.json", {"meta": meta, "rows": rows})
    files.write_csv(Path(out) / f"{name}.csv", rows)


def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def text_table(rows, columns) -> str:
    """A fixed-width text table. ``columns``: (header, key, width, kind) with kind "text"
    (left-aligned), "rtext" (right-aligned), "pct" (100 x value, 2 decimals), "num" (2
    decimals) or "tail" (as is, after two spaces); a missing or None value prints "-"."""
    def cell(kind, width, value):
        if kind == "text":
            return f"{value:<{width}}"
        if kind == "rtext":
            return f"{value:>{width}}"
        if kind == "tail":
            return f"  {value}"
        if value is None:
            return f"{'-':>{width}}"
        return f"{(100 * value if kind == 'pct' else value):>{width}.2f}"

    head = "".join(f"  {h}" if k == "tail" else f"{h:<{w}}" if k == "text" else f"{h:>{w}}"
                   for h, _, w, k in columns)
    lines = [head, "-" * len(head)]
    lines += ["".join(cell(k, w, r.get(key)) for _, key, w, k in columns).rstrip() for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------- claim scripts


@dataclasses.dataclass(frozen=True)
class Output:
    """Where a claim experiment writes its results and models, and how it reports."""

    out: Path | None = None
    """output folder (default: results/<claim>/<setup>[-<dataset>], --smoke: runs/smoke/...)"""
    runs: Path | None = None
    """folder of the trained models, reused across runs and claims (default: <out>/runs)"""
    progress: bool = True
    """progress bars and per-run lines (--no-progress: quiet)"""
    dry_run: bool = False
    """print the plan and its run-time estimate, then exit (nothing is loaded or trained)"""
    shard: str | None = None
    """compute only shard I/N of the grid's cells (cells i with i % N == I), e.g. 0/4; the
    last shard to finish writes the tables"""
    merge: bool = False
    """write the tables from the cells the shards computed; compute nothing"""

    def __post_init__(self):
        grid.parse_shard(self.shard)
        if self.merge and self.shard is not None:
            raise ValueError("--merge with --shard: --merge computes nothing, pass it alone")

    @property
    def shard_spec(self) -> tuple[int, int] | None:
        """``--shard`` as ``(I, N)``, or None."""
        return grid.parse_shard(self.shard)


def claim_defaults(args_type, preset):
    """A :func:`pimjax.cli.run` default: ``args_type(preset(--setup, --smoke))``."""
    def default(argv):
        return args_type(preset(cli.flag_value(argv, "--setup") or "lenet5",
                                cli.has_flag(argv, "--smoke")))

    return default


def claim_out(claim: str, config: claims.ClaimRun, output: Output) -> tuple[Path, Path]:
    """The output and runs folders of a claim experiment."""
    name = config.setup
    if config.dataset_name != setups.get(config.setup).dataset:
        name += f"-{config.dataset_name}"
    out = output.out or Path("runs/smoke" if config.smoke else "results") / claim / name
    return Path(out), Path(output.runs or Path(out) / "runs")


def dataset_size(config: claims.ClaimRun, split: str) -> int:
    """Images of ``split`` an experiment uses (its limit, or the split's registry size)."""
    info = data.info(config.dataset_name)
    full = info.train_size if split == "train" else info.test_size
    limit = config.train_images if split == "train" else config.test_images
    return full if limit is None else min(limit, full)


def gemm_rate() -> float:
    """FLOP/s of a 2048 x 2048 float32 matrix product on the default device: the fastest of
    repeated products over ~0.3 s, so that other work on a shared machine does not make the
    estimate days too long (it is the rate of the machine to itself)."""
    a = jnp.ones((2048, 2048), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best, n, start = float("inf"), 0, time.perf_counter()
    while n < 3 or time.perf_counter() - start < 0.3:
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
        n += 1
    return 2 * 2048**3 / best


def estimate(model, trainings: int, image_epochs: int, chip_images: int) -> str:
    """A rough run-time estimate of ``trainings`` runs of ``image_epochs`` training images
    each and ``chip_images`` chip-image evaluations, from the model's FLOPs."""
    per_image = introspect.forward_flops(model)
    rate = EFFICIENCY * gemm_rate()
    train_s = per_image * 3 * trainings * image_epochs / rate  # forward + backward: 3 passes
    eval_s = per_image * chip_images / rate
    return (f"estimated run time: {_duration(train_s + eval_s)} ({_duration(train_s)} for "
            f"{trainings} training(s) of {image_epochs:,} image-epochs, {_duration(eval_s)} for "
            f"{chip_images:,} chip-images; {per_image / 1e6:.0f} MFLOP per image forward at "
            f"{EFFICIENCY:.0%} of this device's {rate / EFFICIENCY / 1e9:.0f} GFLOP/s GEMM "
            "rate; a rough guide, finished runs are reused)")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


# ------------------------------------------------------------------ between-chip sweeps


def between_plan(config: claims.Between, tunes) -> str:
    """The plan of a between sweep and, for a paper-size setup, its estimate."""
    tconfig = config.train_config("qavat", config.quant, config.qavat_sigma)
    points = len(config.granularities) * len(config.fractions)
    n_train, n_test = dataset_size(config, "train"), dataset_size(config, "test")
    lines = [f"plan: 1 qavat model ({run_name(tconfig)}), {points} sweep points x "
             f"{len(tunes)} evaluation(s) of {config.chips} chips x {n_test} test images"]
    model = tconfig.model.build(tconfig.num_classes, tconfig.quant)
    lines.append(estimate(model, 1, n_train * config.epochs,
                          points * len(tunes) * config.chips * n_test))
    return "\n".join(lines)


def between_cells(config: claims.Between, tunes, out: Path, runs: Path, calib_images: int = 0,
                  progress: bool = True) -> list[grid.Cell]:
    """The cells of a between sweep: the qavat model, then one evaluation per (granularity,
    between fraction, tune variant) in table order.

    ``tunes``: "none" and/or :data:`pimjax.selftune.TUNE_VARIANTS`. Every variant sees the
    same chips (chip i from ``fold_in(chip_key(seed), i)``). Data, model and nominal
    statistics are loaded once per process, when a cell first needs them.
    """
    tconfig = config.train_config("qavat", config.quant, config.qavat_sigma)
    name = run_name(tconfig)

    @functools.cache
    def model() -> Run:
        return train_or_load(tconfig, runs, progress)

    @functools.cache
    def test() -> data.Dataset:
        return load_split(config.dataset_name, "test", config.data_dir, config.test_images)

    @functools.cache
    def calib() -> np.ndarray:
        return calibration_images(config.dataset_name, calib_images, config.data_dir)

    @functools.cache
    def stats():
        return selftune.nominal_stats(model().model, model().variables, calib())

    def evaluate_point(gran: str, frac: float, tune: str) -> dict:
        run = model()
        vm = devices.VariabilityModel.from_total(config.sigma_total, frac,
                                                 between_granularity=gran)
        tuning = None if tune == "none" else selftune.SelfTune(
            tune, calib(), stats() if tune in selftune.NEEDS_STATS else None)
        ev = evaluate(run.model, run.variables, vm, chip_key(config.seed), config.chips,
                      test(), tuning=tuning)
        s, cost = ev.summary, ev.tune_cost
        if progress:
            print(f"{gran:<6} between {frac:.2f} {tune:<12} mean {100 * s['mean']:.2f} "
                  f"drop {100 * s['drop_mean']:.2f} ({ev.seconds:.0f} s)", flush=True)
        return {
            "granularity": gran, "between_fraction": frac,
            "sigma_within": vm.sigma_within, "sigma_between": vm.sigma_between,
            "self_tune": tune, "nominal": s["nominal"], "mean": s["mean"],
            "se": s.get("se"), "p5": s["p5"], "min": s["min"], "std": s["std"],
            "drop_mean": s["drop_mean"], "drop_p5": s["drop_p5"],
            "nominal_tuned": s.get("nominal_tuned"),
            "drop_mean_tuned": s.get("drop_mean_tuned"),
            "chips": s["chips"], "test_images": ev.num_images,
            "calib_images": cost.images if cost else 0,
            "calib_passes": cost.passes if cost else 0,
            "calib_cost": str(cost) if cost else "", "run": run.workdir.name,
            "dataset": config.dataset_name,
            "train_images": run.summary.get("train_images"),
            "chip_accuracy": ev.accuracy.tolist(), "image_accuracy": ev.image_accuracy.tolist(),
        }

    cells = [training_cell(tconfig, runs, progress)]
    for gran in config.granularities:
        for frac in config.fractions:
            for tune in tunes:
                spec = {"run": name, "granularity": gran, "between_fraction": frac,
                        "sigma_total": config.sigma_total, "self_tune": tune,
                        "chips": config.chips, "test_images": dataset_size(config, "test"),
                        "calib_images": 0 if tune == "none" else calib_images,
                        "dataset": config.dataset_name, "seed": config.seed}
                label = f"{gran}_b{frac:g}_{tune}"
                cells.append(grid.Cell(
                    label, grid.cell_path(Path(out) / "evals", label, spec),
                    functools.partial(evaluate_point, gran, frac, tune), spec))
    return cells


def run_between(config: claims.Between, output: Output, name: str, tunes, title: str,
                calib_images: int = 0) -> list[dict] | None:
    """The claim-2/3 script body: plan, compute this process's cells, merge, write, print."""
    out, runs = claim_out(name, config, output)
    setup = setups.get(config.setup)
    if (output.dry_run or setup.paper_size) and distributed.is_primary():
        print(between_plan(config, tunes), flush=True)
    if output.dry_run:
        return None
    progress = output.progress and not config.smoke and distributed.is_primary()
    start = time.perf_counter()
    cells = between_cells(config, tunes, out, runs, calib_images, progress)

    def merge(rows: list[dict]) -> list[dict]:
        rows = without_arrays(with_tuning_gains(rows))
        write_results(out, name, rows, meta(config, setup=setup))
        files.write_text(out / f"{name}_table.txt", format_between(rows) + "\n")
        plot_between(rows, out / f"{name}.png",
                     f"{name}, {config.setup} on {config.dataset_name}, {config.quant} qavat: "
                     f"{title}sigma_total {config.sigma_total}, {config.chips} chips")
        print(f"{config.setup} on {config.dataset_name}, {config.quant} qavat (trained at "
              f"sigma_within {config.qavat_sigma}), sigma_total {config.sigma_total}, "
              f"{config.chips} chips, {rows[0]['test_images']} test images; accuracy in %")
        print(format_between(rows))
        print(f"wrote {out}/{name}.json, {name}.csv, {name}_table.txt, {name}.png "
              f"({time.perf_counter() - start:.0f} s)")
        return rows

    return grid.run(cells, out, merge, shard=output.shard_spec, merge_only=output.merge,
                    progress=output.progress)


def with_tuning_gains(rows: list[dict]) -> list[dict]:
    """Each tuned row with its gain over the untuned row of the same (granularity, between
    fraction): a paired difference on the same chips and images, with its standard error."""
    untuned = {(r["granularity"], r["between_fraction"]): r for r in rows
               if r["self_tune"] == "none"}
    out = []
    for r in rows:
        base = untuned.get((r["granularity"], r["between_fraction"]))
        gain = se = None
        if r["self_tune"] != "none" and base is not None and all(
                k in x for x in (r, base) for k in ARRAYS):
            gain, se = montecarlo.paired_difference(r["chip_accuracy"], r["image_accuracy"],
                                  base["chip_accuracy"], base["image_accuracy"])
        out.append(dict(r, gain_vs_untuned=gain, gain_vs_untuned_se=se))
    return out


BETWEEN_COLUMNS = (("gran", "granularity", 7, "text"), ("between", "between_fraction", 8, "num"),
                   ("self-tune", "self_tune", 13, "rtext"), ("nominal", "nominal", 9, "pct"),
                   ("mean", "mean", 8, "pct"), ("se", "se", 6, "pct"), ("p5", "p5", 8, "pct"),
                   ("drop", "drop_mean", 8, "pct"), ("drop p5", "drop_p5", 9, "pct"),
                   ("drop t", "drop_mean_tuned", 8, "pct"),
                   ("gain", "gain_vs_untuned", 8, "pct"), ("se", "gain_vs_untuned_se", 6, "pct"),
                   ("cost", "calib_cost", 0, "tail"))


def format_between(rows) -> str:
    """The printed table of a between-chip sweep (accuracy and drops in %): se is the mean's
    standard error over chips and images; drop t the drop against the nominal model after
    the same self-tuning; gain (se) the tuned mean minus the untuned one on the same chips."""
    return text_table(rows, BETWEEN_COLUMNS)


def plot_between(rows, path: Path, title: str) -> None:
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
    files.save_figure(fig, path, dpi=120)
    plt.close(fig)

