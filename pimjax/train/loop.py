"""The training loop: one optax loop for fp, qat, vat, qavat, and the ptq calibration.

:func:`train` takes a :class:`TrainConfig` and, optionally, the datasets (else it loads them
from the config) and returns the final state with the per-epoch history, as Flax's
``train_and_evaluate`` does. Given a ``workdir`` it also writes ``config.json``,
``metrics.json``/``metrics.csv`` and orbax checkpoints (``checkpoints/<epoch>`` every epoch,
``best/<epoch>`` by test accuracy), holding an exclusive lock on the directory; ``resume``
continues from the last intact checkpoint. A run is never overwritten unless ``restart`` says
so: a resume with another config is refused before anything is read or written (the saved
configs are JSON), a checkpoint of another tree is refused as such (not taken for damage),
and when every checkpoint is damaged :func:`train` stops with a
:class:`pimjax.checkpoint.CheckpointError`.

Data parallelism: every batch is split by rows over a ``"batch"`` mesh of every device of
every process (:func:`pimjax.distributed.make_mesh`); each process reads only its own rows
of each batch. In a multi-process run every process calls :func:`train` with the same
arguments; orbax checkpoints are written by all of them into the same directory (which
every process must see), while only process 0 holds the directory's lock (the others share
it), writes ``config.json``/``metrics.*`` and prints (resuming is tested with the same
process count).

Everything random is a pure function of the seed: the data order of epoch ``e`` is a
permutation seeded by ``(seed, e)``, the chip and augmentation of step ``s`` come from
``fold_in(key, s)``. So a run resumed from a checkpoint ends with the same parameters as an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from pimjax import checkpoint as ckpt_lib
from pimjax import data as pdata
from pimjax import files, montecarlo
from pimjax.distributed import (
    agree,
    from_process_rows,
    is_primary,
    make_mesh,
    mesh_processes,
    process_rows,
    replicate,
    shared_run_lock,
)
from pimjax.progress import progress_bar
from pimjax.train.batches import train_batches
from pimjax.train.config import TrainConfig
from pimjax.train.ptq import calibrate, init_from_float
from pimjax.train.runs import check_resume_config, check_run_config, load_float_source
from pimjax.train.state import TrainState, create_train_state
from pimjax.train.steps import eval_step, train_step

BATCH_AXIS = "batch"
# PRNG streams split from the seed (fold_in tags).
_INIT, _CHIPS, _AUGMENT, _EVAL_CHIPS, _READ = 0, 1, 2, 3, 4


class RunKeys(NamedTuple):
    """The PRNG keys of a run, each ``fold_in(PRNGKey(seed), stream)``."""

    init: jax.Array  # parameter initialisation
    chips: jax.Array  # the training chip of step s: fold_in(chips, s)
    augment: jax.Array  # the augmentation of step s: fold_in(augment, s)
    eval_chips: jax.Array  # the per-epoch evaluation chips (pimjax.devices.chip_keys of it)
    read: jax.Array  # per-read noise of step s: fold_in(read, s)


def run_keys(seed: int) -> RunKeys:
    """The PRNG keys a run with ``seed`` uses (see :class:`RunKeys`)."""
    root = jax.random.PRNGKey(seed)
    return RunKeys(*(jax.random.fold_in(root, i)
                     for i in (_INIT, _CHIPS, _AUGMENT, _EVAL_CHIPS, _READ)))


class TrainingDivergedError(FloatingPointError):
    """Raised when the training loss becomes non-finite or explodes."""


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` returns: the final state, one metrics row per epoch, and a summary."""

    state: TrainState
    history: list[dict]
    summary: dict


def evaluate(state: TrainState, dataset: pdata.Dataset, batch_size: int | None = None,
             mesh=None) -> dict:
    """Test loss and accuracy of the state's nominal model (no chip) on ``dataset``."""
    n = len(dataset)
    bs = min(batch_size or state.config.eval.batch_size, n)
    if mesh is not None:
        bs = -(-bs // mesh.size) * mesh.size
    sums = []
    for start in range(0, n, bs):
        images = dataset.images[start:start + bs]
        labels = dataset.labels[start:start + bs]
        mask = np.ones(len(labels), np.float32)
        pad = bs - len(labels)
        if pad:  # pad the last batch so one compiled program serves every batch
            images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
            labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
            mask = np.concatenate([mask, np.zeros(pad, np.float32)])
        if mesh is not None:  # each process feeds its own rows of the batch
            rows = process_rows(bs, mesh)
            images, labels, mask = from_process_rows(
                (images[rows], labels[rows], mask[rows]), mesh, bs)
        sums.append(eval_step(state, images, labels, mask))
    correct = total_loss = 0.0
    for c, loss in jax.device_get(sums):
        correct += float(c)
        total_loss += float(loss)
    return {"loss": total_loss / n, "acc": correct / n}


def evaluate_chips(state: TrainState, dataset: pdata.Dataset, key, mesh=None) -> np.ndarray:
    """Test accuracy of ``state.config.eval.chips`` chips of the evaluation device."""
    config = state.config
    result = montecarlo.evaluate_chips(
        state.model, state.variables, config.eval.device.build(), key, config.eval.chips,
        dataset, mesh_devices=None if mesh is None else mesh.devices.flat, nominal=False,
        progress=False)
    return result.accuracy


def load_data(config: TrainConfig) -> tuple[pdata.Dataset, pdata.Dataset]:
    """The training and test splits the config names, warning when a limit exceeds a split."""
    d = config.data
    out = []
    for split, limit in (("train", d.train_images), ("test", d.test_images)):
        ds = pdata.load_dataset(d.name, split, d.data_dir, limit=limit)
        if limit is not None and len(ds) < limit:
            warnings.warn(f"data.{split}_images={limit} exceeds the {len(ds)} images of the "
                          f"{d.name} {split} split: using {len(ds)}", stacklevel=3)
        out.append(ds)
    return out[0], out[1]


def _check_dataset(config: TrainConfig, ds, what: str) -> None:
    """A one-line ValueError naming ``what`` unless ``ds`` is a split the config can use."""
    if not isinstance(ds, pdata.Dataset):
        raise ValueError(f"{what} must be a pimjax.data.Dataset, got {type(ds).__name__}")
    if ds.name != config.data.name:
        raise ValueError(f"{what} is {ds.name!r} but the config trains on {config.data.name!r}")
    if ds.num_classes != config.num_classes:
        raise ValueError(f"{what} has num_classes={ds.num_classes} but {ds.name} has "
                         f"{config.num_classes} classes: pass the split pimjax.data.load_dataset "
                         "returns")
    ds.check_labels()  # again: the arrays may have changed since the Dataset was made
    need = config.optim.batch_size if what == "train_data" else 1
    if len(ds) < need:
        fix = (f"pass at least optim.batch_size={need} images (one step)"
               if what == "train_data" else "pass at least one image")
        raise ValueError(f"{what} (the {ds.name} {ds.split} split) holds {len(ds)} images: {fix}")


def train(config: TrainConfig, *, train_data: pdata.Dataset | None = None,
          test_data: pdata.Dataset | None = None, workdir: str | os.PathLike | None = None,
          resume: bool = False, stop_after: int | None = None, num_devices: int | None = None,
          mesh_devices=None, progress: bool = True, log_every: int = 20,
          restart: bool = False) -> TrainResult:
    """Train (or, for ptq, calibrate) a model; return the final state and per-epoch history.

    ``train_data``/``test_data``: the splits to use (default: loaded as the config says).
    ``workdir``: where to write the config, metrics and checkpoints (None: nothing written).
    ``resume`` continues from the last intact checkpoint of ``workdir`` (refused, with nothing
    changed, when the run's config differs or every checkpoint is damaged); ``restart``
    deletes the checkpoints and metrics ``workdir`` holds and trains from the start.
    ``stop_after`` ends this call after that many epochs (as if interrupted). The data are
    checked first: labels in [0, num_classes), at least one batch to train on and one test
    image, or a one-line ValueError naming the split. A loss that becomes non-finite or
    exceeds ``config.max_loss_ratio`` times its first value raises
    :class:`TrainingDivergedError` without saving that epoch.

    Data parallelism over ``mesh_devices`` (default: every device of every process), or over
    the first ``num_devices`` local devices of every process.
    """
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
    if resume and workdir is None:
        raise ValueError("resume needs a workdir to resume from")
    if restart and workdir is None:
        raise ValueError("restart needs the workdir to start over in")
    if resume and restart:
        raise ValueError("pass resume (continue the run) or restart (discard it), not both")
    if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int)
                                   or stop_after < 1):
        raise ValueError(f"stop_after={stop_after!r} must be a positive integer or None")
    mesh = make_mesh(BATCH_AXIS, _mesh_devices(num_devices, mesh_devices))
    if mesh_processes(mesh) != tuple(range(jax.process_count())):
        # orbax 0.12 refuses to checkpoint arrays of one process in a multi-process run
        raise ValueError(f"mesh_devices are devices of processes {list(mesh_processes(mesh))} "
                         f"only: a multi-process run trains over all {jax.process_count()} "
                         "processes (pass devices of every process, or None)")
    for name, value in (("optim.batch_size", config.optim.batch_size),
                        ("eval.batch_size", config.eval.batch_size)):
        if value % mesh.size:
            raise ValueError(f"{name}={value} must be divisible by the {mesh.size} devices of "
                             "the data-parallel mesh")
    float_source = load_float_source(config) if config.train_method == "ptq" else None
    for ds, what in ((train_data, "train_data"), (test_data, "test_data")):
        if ds is not None:
            _check_dataset(config, ds, what)
    lock = contextlib.nullcontext() if workdir is None else shared_run_lock(workdir)
    with lock:
        return _train(config, train_data, test_data, workdir, resume, restart, stop_after,
                      mesh, float_source, progress and is_primary(mesh), log_every)


def _mesh_devices(num_devices, mesh_devices) -> list:
    """The data-parallel devices: given, or the first ``num_devices`` of every process."""
    if mesh_devices is not None:
        if num_devices is not None:
            raise ValueError("pass num_devices or mesh_devices, not both")
        return list(mesh_devices)
    local = len(jax.local_devices())
    if num_devices is not None and (isinstance(num_devices, bool) or not isinstance(
            num_devices, int) or not 1 <= num_devices <= local):
        raise ValueError(f"num_devices={num_devices!r} must be in 1..{local} (the devices of "
                         "each process)")
    by_process: dict[int, list] = {}
    for d in sorted(jax.devices(), key=lambda d: (d.process_index, d.id)):
        by_process.setdefault(d.process_index, []).append(d)
    return [d for devs in by_process.values() for d in devs[:num_devices]]


def _discard_run(workdir: Path, primary: bool) -> None:
    """Delete the checkpoints and metrics of the run in ``workdir`` (``restart``)."""
    if primary:
        for sub in (ckpt_lib.LAST, ckpt_lib.BEST):
            shutil.rmtree(workdir / sub, ignore_errors=True)
        for name in ("metrics.json", "metrics.csv"):
            (workdir / name).unlink(missing_ok=True)
    agree(True)  # the other processes wait for the folder to be emptied


def _train(config, train_ds, test_ds, workdir, resume, restart, stop_after, mesh, float_source,
           progress, log_every) -> TrainResult:
    store = None
    primary = is_primary(mesh)
    if workdir is not None:
        workdir = Path(workdir).absolute()
        if not resume and not restart and ckpt_lib.run_checkpoints(workdir):
            raise ValueError(f"{workdir} already holds checkpoints: pass resume=True (--resume) "
                             "to continue, restart=True (--restart) to discard them, or choose "
                             "a new output directory")
        if resume:  # before anything is read or written
            check_run_config(config, workdir)
    if train_ds is None or test_ds is None:
        loaded = load_data(config)
        train_ds = train_ds if train_ds is not None else loaded[0]
        test_ds = test_ds if test_ds is not None else loaded[1]
        for ds, what in ((train_ds, "train_data"), (test_ds, "test_data")):
            _check_dataset(config, ds, what)
    if workdir is not None:
        if restart:  # only once the data are known to be good
            _discard_run(workdir, primary)
        store = ckpt_lib.CheckpointStore(workdir)
    init_key, chip_key, aug_key, eval_key, read_key = run_keys(config.seed)
    sample = pdata.normalize(train_ds.images[:1], config.data.name)
    fresh = create_train_state(config, init_key, sample, len(train_ds))
    state = replicate(fresh, mesh)  # restored checkpoints land on the mesh directly
    counts = {"train_images": len(train_ds), "test_images": len(test_ds)}

    history: list[dict] = []
    start_epoch = 0
    if resume:
        restored = store.restore_latest(state)
        if restored is not None:
            state, meta = restored
            check_resume_config(config, meta["config"], workdir)
            start_epoch = int(meta["epoch"])
            history = [m for m in meta.get("history", []) if m["epoch"] <= start_epoch]
    if workdir is not None and primary:
        files.write_json(workdir / "config.json", config.to_dict())

    if config.train_method == "ptq":
        if history:  # a finished calibration: nothing to continue
            return TrainResult(state, history, _summary(history, workdir, mesh))
        return _run_ptq(config, fresh, float_source, train_ds, test_ds, chip_key, eval_key,
                        mesh, store, workdir, counts)

    best_acc = max((m["test_acc"] for m in history), default=-1.0)
    n_steps = len(train_ds) // config.optim.batch_size
    first_loss = history[0].get("first_loss") if history else None
    first_step_s = 0.0
    epochs_run = 0
    for epoch in range(start_epoch + 1, config.optim.epochs + 1):
        if stop_after is not None and epochs_run >= stop_after:
            break
        t0 = time.perf_counter()
        pending: list = []
        sums = {"loss": 0.0, "acc": 0.0}
        last_lr = float("nan")
        bar = progress_bar(n_steps, f"epoch {epoch}/{config.optim.epochs}", progress)
        rows = process_rows(config.optim.batch_size, mesh)  # this process's share of a batch
        for i, (images, labels) in enumerate(train_batches(train_ds, config.optim.batch_size,
                                                           config.seed, epoch, rows)):
            batch = from_process_rows((images, labels), mesh, config.optim.batch_size)
            tc = time.perf_counter()
            state, metrics = train_step(state, batch, chip_key, aug_key, read_key)
            if epochs_run == 0 and i == 0:  # the first call compiles: time it apart
                jax.block_until_ready(metrics)
                first_step_s = time.perf_counter() - tc
            pending.append(metrics)
            if len(pending) >= log_every or i == n_steps - 1:
                fetched = jax.device_get(pending)
                if first_loss is None:
                    first_loss = float(fetched[0]["loss"])
                _check_loss(config, fetched, first_loss, epoch, i + 1 - len(pending), n_steps,
                            store)
                for m in fetched:
                    sums["loss"] += float(m["loss"])
                    sums["acc"] += float(m["acc"])
                last_lr = float(fetched[-1].get("lr", float("nan")))
                bar.update(len(pending))
                pending = []
                seen = i + 1
                bar.set_postfix(loss=f"{sums['loss'] / seen:.4f}", acc=f"{sums['acc'] / seen:.4f}")
        bar.close()
        train_time = time.perf_counter() - t0 - (first_step_s if epochs_run == 0 else 0.0)
        te = time.perf_counter()
        test = evaluate(state, test_ds, mesh=mesh)
        row = {
            "epoch": epoch, "step": int(state.step),
            "lr": last_lr,  # of the epoch's last step
            "train_loss": sums["loss"] / n_steps, "train_acc": sums["acc"] / n_steps,
            "test_loss": test["loss"], "test_acc": test["acc"],
        }
        if config.eval.chips:
            accs = evaluate_chips(state, test_ds, eval_key, mesh)
            row.update(test_acc_chips_mean=float(accs.mean()), test_acc_chips_min=float(accs.min()))
        steps_timed = n_steps - (epochs_run == 0)
        row.update(
            epoch_time_s=train_time, eval_time_s=time.perf_counter() - te,
            images_per_s=steps_timed * config.optim.batch_size / max(train_time, 1e-9),
            first_step_s=first_step_s if epochs_run == 0 else 0.0,  # includes the compile
            first_loss=first_loss, **counts,
        )
        history.append(row)
        is_best = row["test_acc"] > best_acc
        best_acc = max(best_acc, row["test_acc"])
        if store is not None:
            _save(store, state, config, epoch, history, is_best)
            if primary:
                _write_metrics(workdir, history)
        epochs_run += 1
        if progress:
            print(_format_row(row), flush=True)
    return TrainResult(state, history, _summary(history, workdir, mesh))


def _summary(history, workdir, mesh) -> dict:
    """The last epoch's row, the best test accuracy and its epoch, the run's folder."""
    summary = dict(history[-1]) if history else {}
    summary.update(best_test_acc=max((m["test_acc"] for m in history), default=-1.0),
                   best_epoch=_best_epoch(history),
                   workdir=None if workdir is None else str(workdir), num_devices=mesh.size)
    return summary


def _run_ptq(config, state, float_source, train_ds, test_ds, chip_key, eval_key, mesh, store,
             workdir, counts) -> TrainResult:
    """ptq: load the float weights, recalibrate under sampled chips, evaluate, save."""
    _, float_vars = float_source
    state = replicate(init_from_float(state, float_vars), mesh)
    t0 = time.perf_counter()
    state = calibrate(state, train_ds, chip_key, config.ptq.calib_batches, mesh)
    jax.block_until_ready(state.batch_stats)
    calib_s = time.perf_counter() - t0
    test = evaluate(state, test_ds, mesh=mesh)
    row = {"epoch": 0, "step": 0, "lr": 0.0, "train_loss": None, "train_acc": None,
           "test_loss": test["loss"], "test_acc": test["acc"]}
    if config.eval.chips:
        accs = evaluate_chips(state, test_ds, eval_key, mesh)
        row.update(test_acc_chips_mean=float(accs.mean()), test_acc_chips_min=float(accs.min()))
    row.update(calib_time_s=calib_s,
               calib_images=config.ptq.calib_batches * config.optim.batch_size, **counts)
    history = [row]
    if store is not None:
        _save(store, state, config, 0, history, True)
        if is_primary(mesh):
            _write_metrics(workdir, history)
    return TrainResult(state, history, _summary(history, workdir, mesh))


def _check_loss(config, fetched, first_loss, epoch, first_step, n_steps, store) -> None:
    """Raise TrainingDivergedError on a non-finite loss or one above max_loss_ratio x first."""
    limit = None if config.max_loss_ratio is None else config.max_loss_ratio * abs(first_loss)
    for j, m in enumerate(fetched):
        loss = float(m["loss"])
        exploded = limit is not None and math.isfinite(loss) and loss > limit
        if math.isfinite(loss) and not exploded:
            continue
        last = None if store is None else store.latest_epoch()
        where = (f"the last good checkpoint is {store.last_dir / str(last)} (epoch {last})"
                 if last is not None else "no checkpoint was written")
        what = (f"is {loss}" if not exploded else
                f"{loss:.4g} exceeds {config.max_loss_ratio:g} x its first value {first_loss:.4g}")
        raise TrainingDivergedError(
            f"training diverged: the loss {what} at epoch {epoch}, step "
            f"{first_step + j + 1}/{n_steps}; stopped without saving this epoch ({where}). "
            "Lower --optim.lr, or set --optim.grad-clip, then rerun")


def _save(store, state, config, epoch, history, is_best) -> None:
    leaves = jax.device_get(jax.tree.leaves((state.params, state.batch_stats, state.opt_state)))
    if not all(np.isfinite(x).all() for x in leaves if np.issubdtype(x.dtype, np.floating)):
        raise TrainingDivergedError(
            f"training diverged: non-finite parameters after epoch {epoch}, not saved. Lower "
            "--optim.lr, or set --optim.grad-clip, then rerun")
    meta = {"epoch": epoch, "config": config.to_dict(), "history": history,
            "metrics": history[-1]}
    store.save(epoch, state, meta, best=is_best)


def _best_epoch(history):
    return max(history, key=lambda m: m["test_acc"])["epoch"] if history else None


def _format_row(row: dict) -> str:
    parts = [f"epoch {row['epoch']}", f"train_loss {row['train_loss']:.4f}",
             f"train_acc {row['train_acc']:.4f}", f"test_acc {row['test_acc']:.4f}"]
    if "test_acc_chips_mean" in row:
        parts.append(f"chips_mean {row['test_acc_chips_mean']:.4f}")
    parts += [f"{row['images_per_s']:.0f} img/s", f"{row['epoch_time_s']:.1f}s"]
    return " | ".join(parts)


def _write_metrics(workdir: Path, history: list[dict]) -> None:
    files.write_json(workdir / "metrics.json", history)
    files.write_csv(workdir / "metrics.csv", history)
