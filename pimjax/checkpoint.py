"""Orbax checkpoints of training runs, and loaders that rebuild the model from them.

A run directory holds ``config.json``, ``checkpoints/<epoch>/`` (the last few epochs) and
``best/<epoch>/`` (the best by test accuracy). Each ``<epoch>`` directory is one orbax
checkpoint with three items:

* ``variables``: ``{"params", "batch_stats", "tune"}``, everything inference needs;
* ``train``: ``{"step", "opt_state"}``, what resuming needs besides;
* ``meta``: JSON with ``epoch``, ``config`` (a :class:`pimjax.train.TrainConfig` dict),
  ``metrics`` and ``history``.

Orbax writes into a temporary directory and renames it when complete, so a crash never leaves
a half-written checkpoint behind; a write that fails (a full disk) removes its temporary
directory and raises :class:`CheckpointWriteError` (an OSError), the earlier checkpoints intact.
A checkpoint damaged later (a truncated file) is detected when read:
:meth:`CheckpointStore.restore_latest` falls back to the newest intact one with a warning, and
raises a :class:`CheckpointError` when none is intact; :func:`restore_variables` raises a
one-line :class:`CheckpointError` naming it. Before reading any array, the saved tree (names,
shapes, dtypes from orbax's metadata) is compared with the one asked for: a checkpoint of
another model or optimizer raises :class:`CheckpointMismatchError`, never taken for damage.
This module stores and reads pytrees only; :func:`pimjax.train.load_model` rebuilds the model.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path

import jax
import orbax.checkpoint as ocp

ITEMS = ("variables", "train", "meta")
LAST, BEST = "checkpoints", "best"


class CheckpointError(ValueError):
    """A checkpoint is missing or cannot be read (damaged, truncated)."""


class CheckpointMismatchError(CheckpointError):
    """A readable checkpoint holds another tree (model, optimizer) than the one asked for."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, read-only folder); nothing was kept of it."""


def _manager(directory: Path, max_to_keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(directory, options=options, item_names=ITEMS)


def _state_items(state) -> tuple[dict, dict]:
    variables = {"params": state.params, "batch_stats": state.batch_stats, "tune": state.tune}
    return variables, {"step": state.step, "opt_state": state.opt_state}


class CheckpointStore:
    """The 'last' (every epoch, ``max_to_keep`` kept) and 'best' checkpoints of a run."""

    def __init__(self, workdir: str | os.PathLike, max_to_keep: int = 2):
        self.workdir = Path(workdir).absolute()
        self.last_dir = self.workdir / LAST
        self.best_dir = self.workdir / BEST
        self.max_to_keep = max_to_keep
        self._last = self._best = None

    def _managers(self):
        if self._last is None:
            self._last = _manager(self.last_dir, self.max_to_keep)
            self._best = _manager(self.best_dir, 1)
        return self._last, self._best

    def latest_epoch(self) -> int | None:
        """Epoch of the newest complete 'last' checkpoint (None when there is none)."""
        if not self.last_dir.is_dir():
            return None
        return self._managers()[0].latest_step()

    def save(self, epoch: int, state, meta: dict, best: bool = False) -> None:
        """Write ``state`` (a TrainState) as epoch ``epoch``; also as 'best' when ``best``."""
        variables, train = _state_items(state)
        args = ocp.args.Composite(variables=ocp.args.StandardSave(variables),
                                  train=ocp.args.StandardSave(train),
                                  meta=ocp.args.JsonSave(meta))
        last, best_mgr = self._managers()
        targets = [(last, self.last_dir)] + ([(best_mgr, self.best_dir)] if best else [])
        for mgr, directory in targets:
            # An epoch saved before is replaced: a run resumed past a damaged checkpoint (or
            # from before a best epoch) saves that epoch again.
            with _orbax_failures_reported_once():
                try:
                    if epoch in mgr.all_steps():
                        mgr.delete(epoch)
                    mgr.save(epoch, args=args, force=True)
                    mgr.wait_until_finished()
                    continue
                except Exception as e:  # orbax/TensorStore raise many types for a failed write
                    cause = _write_cause(_drop_tracebacks(e))
                _settle_orbax()
            self._last = self._best = None  # the managers' view of the folder is stale
            _remove_temporary(directory, epoch)
            kept = _complete_epochs(self.last_dir)
            where = ("no checkpoint is kept" if not kept else
                     f"{self.last_dir / str(kept[-1])} (epoch {kept[-1]}) is intact")
            raise CheckpointWriteError(
                f"cannot write checkpoint {directory / str(epoch)} ({cause}); {where}: free "
                "space or fix the folder, then resume (--resume)")

    def epochs(self) -> list[int]:
        """Epochs of the complete 'last' checkpoints, oldest first."""
        if not self.last_dir.is_dir():
            return []
        return sorted(self._managers()[0].all_steps())

    def restore(self, state, epoch: int | None = None, best: bool = False):
        """Restore into the structure and shardings of ``state``: ``(state, meta)``.

        ``best``: from the 'best' checkpoint instead of a 'last' one. Raises
        :class:`CheckpointMismatchError` if the checkpoint holds another tree than ``state``'s
        (checked before any array is read), :class:`CheckpointError` naming the checkpoint
        if it cannot be read.
        """
        mgr = self._managers()[1 if best else 0]
        directory = self.best_dir if best else self.last_dir
        epoch = mgr.latest_step() if epoch is None else epoch
        if epoch is None:
            raise CheckpointError(f"no checkpoint in {directory}")
        variables, train = _state_items(state)
        ckpt = directory / str(epoch)
        check_tree(ckpt, "variables", variables)
        check_tree(ckpt, "train", train)
        args = ocp.args.Composite(variables=ocp.args.StandardRestore(variables),
                                  train=ocp.args.StandardRestore(train),
                                  meta=ocp.args.JsonRestore())
        out = _read(ckpt, lambda: mgr.restore(epoch, args=args))
        v, t = out["variables"], out["train"]
        state = state.replace(params=v["params"], batch_stats=v["batch_stats"], tune=v["tune"],
                              step=t["step"], opt_state=t["opt_state"])
        return state, out["meta"]

    def restore_latest(self, state):
        """``(state, meta)`` of the newest intact checkpoint, or None when there is none.

        A damaged newer checkpoint is skipped with a warning that names it. Raises
        :class:`CheckpointError` when every checkpoint is damaged (naming an intact 'best'
        one to recover from), :class:`CheckpointMismatchError` at once for another tree.
        """
        epochs = self.epochs()
        errors = []
        for epoch in reversed(epochs):
            try:
                return self.restore(state, epoch)
            except CheckpointMismatchError:
                raise
            except CheckpointError as e:
                errors.append(e)
                if epoch != epochs[0]:
                    warnings.warn(f"{e}; falling back to an earlier checkpoint", stacklevel=2)
        if not errors:
            return None
        raise CheckpointError(f"cannot resume: every checkpoint in {self.last_dir} is damaged "
                              f"(epochs {', '.join(map(str, epochs))}; the newest: {errors[0]})"
                              f"; nothing was changed.{self._best_hint(state)} To start over, "
                              "pass restart=True (--restart), which deletes the run's "
                              "checkpoints and metrics")

    def _best_hint(self, state) -> str:
        """A sentence naming an intact 'best' checkpoint to recover from, or ''."""
        if not self.best_dir.is_dir():
            return ""
        epoch = self._managers()[1].latest_step()
        if epoch is None:
            return ""
        try:
            self.restore(state, epoch, best=True)
        except CheckpointError:
            return ""
        return (f" The best checkpoint {self.best_dir / str(epoch)} (epoch {epoch}) is intact: "
                f"copy it to {self.last_dir / str(epoch)} (replacing what is there) to resume "
                f"from epoch {epoch}.")


def _write_cause(e: BaseException) -> str:
    """The reason a write failed: the OS error's text when there is one (TensorStore puts
    its code at the end of a long message), else the exception's first line."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    code = re.search(r"os_error_code='?(\d+)", str(e))
    return os.strerror(int(code.group(1))) if code else _first_line(e)


def _read(ckpt: Path, restore):
    """``restore()`` (an orbax read of checkpoint ``ckpt``), or a one-line CheckpointError
    naming the innermost error (TensorStore's, which names the array and the fault)."""
    with _orbax_failures_reported_once():
        try:
            return restore()
        except Exception as e:  # orbax/TensorStore raise many types for a damaged file
            error = CheckpointError(f"checkpoint {ckpt} is damaged and cannot be read "
                                    f"({_first_line(_drop_tracebacks(e))})")
        _settle_orbax()
    raise error


def _drop_tracebacks(e: BaseException) -> BaseException:
    """The innermost error of ``e``'s chain, after dropping every traceback of the chain (their
    frames hold orbax's abandoned coroutines, which must be collected in the quiet window)."""
    chain = []
    while e is not None and e not in chain:
        chain.append(e)
        e.__traceback__ = None
        e = e.__cause__ or e.__context__
    return chain[-1]


class _DropOrbaxReports(logging.Filter):
    """Drops the logs of orbax's threads and tasks that failed with the error pimjax raises."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("_SignalingThread.run() raised an exception" in text
                    or ("Task exception was never retrieved" in text and "orbax" in text))


@contextlib.contextmanager
def _orbax_failures_reported_once():
    """While orbax reads or writes: what its threads and coroutines report of a failure is
    dropped, since the caller raises it as one line.

    orbax 0.12 runs the reads (writes) of a checkpoint's arrays as coroutines gathered on an
    event loop it closes as soon as one fails (a damaged file, a full disk). The others are
    abandoned: those still in TensorStore finish into the closed loop ("RuntimeError: Event
    loop is closed", reported with no object), a suspended coroutine, when collected, turns its
    GeneratorExit into an Exception ("Exception ignored in: <coroutine object
    _read_array_index_and_device_put>", at exit if not sooner), a finished task logs "Task
    exception was never retrieved", and the writer threads log absl tracebacks. After a
    failure the caller waits inside this window (:func:`_settle_orbax`) until they are over.
    """
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _from_abandoned_read(unraisable.object, unraisable.exc_value):
            previous(unraisable)

    drop = _DropOrbaxReports()
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    sys.unraisablehook = hook
    for logger in loggers:
        logger.addFilter(drop)
    try:
        yield
    finally:
        sys.unraisablehook = previous
        for logger in loggers:
            logger.removeFilter(drop)


def _settle_orbax(timeout_s: float = 10.0) -> None:
    """Wait (at most ``timeout_s``) until no orbax coroutine or thread is alive, collecting."""
    deadline = time.monotonic() + timeout_s
    while True:
        gc.collect()
        busy = any(_is_orbax_coroutine(o) for o in gc.get_objects()) or any(
            type(t).__module__.startswith("orbax") for t in threading.enumerate())
        if not busy or time.monotonic() > deadline:
            return
        time.sleep(0.02)


def _is_orbax_coroutine(obj) -> bool:
    """Whether ``obj`` is a coroutine of orbax's (its reads)."""
    return inspect.iscoroutine(obj) and "orbax" in obj.cr_code.co_filename


def _from_abandoned_read(obj, exc) -> bool:
    """Whether an unraisable exception reports a read abandoned by a failed orbax restore."""
    if _is_orbax_coroutine(obj):
        return True
    return obj is None and isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def _complete_epochs(directory: Path) -> list[int]:
    """The epochs of the complete checkpoints in ``directory``, read from its folder names."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()
                  and (p / "meta").is_dir() and (p / "variables").is_dir())


def _remove_temporary(directory: Path, epoch: int) -> None:
    """Remove what a failed write of ``epoch`` left in ``directory`` (orbax's temporary folder)."""
    if directory.is_dir():
        for p in directory.glob(f"{epoch}.orbax-checkpoint-tmp*"):
            shutil.rmtree(p, ignore_errors=True)


def _path_name(path) -> str:
    """A tree path as orbax names its arrays: ``opt_state.0.mu.Conv_0.kernel``."""
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return ".".join(parts)


def _shapes(tree) -> dict[str, tuple]:
    """``{array name: (shape, dtype name)}`` of a tree of arrays or array metadata."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_path_name(p): (tuple(getattr(x, "shape", ())), str(getattr(x, "dtype", "?")))
            for p, x in leaves}


def check_tree(ckpt: str | os.PathLike, item: str, target) -> None:
    """Raise unless checkpoint ``ckpt``'s ``item`` holds arrays of ``target``'s names and shapes.

    Reads only orbax's metadata (no array), so a checkpoint of another model or optimizer
    raises :class:`CheckpointMismatchError` before orbax starts reading; unreadable metadata
    raises :class:`CheckpointError` (damaged).
    """
    ckpt = Path(ckpt)
    try:
        saved = _shapes(ocp.StandardCheckpointHandler().metadata(ckpt / item).tree)
    except Exception as e:  # orbax raises many types for a damaged metadata file
        raise CheckpointError(f"checkpoint {ckpt} is damaged and cannot be read "
                              f"({_first_line(e)})") from e
    wanted = _shapes(target)
    if saved == wanted:
        return
    diff = [f"{k}: saved {_describe(saved.get(k))}, expected {_describe(wanted.get(k))}"
            for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]
    raise CheckpointMismatchError(
        f"checkpoint {ckpt} holds another {_WHAT[item]} than the one asked for ({len(diff)} "
        f"array(s) differ, e.g. {diff[0]}): use the config it was written with (its run's "
        "config.json), or another output directory")


_WHAT = {"variables": "model", "train": "optimizer state"}


def _describe(entry) -> str:
    return "nothing" if entry is None else f"{entry[1]}{list(entry[0])}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def checkpoint_dir(path: str | os.PathLike) -> Path:
    """Resolve a run, ``checkpoints``/``best`` or ``<epoch>`` directory to one checkpoint."""
    path = Path(path).absolute()
    if (path / "meta").is_dir() and (path / "variables").is_dir():
        return path
    if (path / LAST).is_dir():
        path = path / LAST
    steps = _complete_epochs(path)
    if not steps:
        raise CheckpointError(f"no pimjax checkpoint found at {path}: pass a run directory "
                              "(written by experiments/train.py) or one of its checkpoints")
    return path / str(steps[-1])


def run_checkpoints(workdir: str | os.PathLike) -> list[Path]:
    """The complete checkpoint folders of a run: its 'last' ones, newest first, then 'best'."""
    workdir = Path(workdir).absolute()
    return [workdir / sub / str(e) for sub in (LAST, BEST)
            for e in reversed(_complete_epochs(workdir / sub))]


def read_meta(path: str | os.PathLike) -> dict:
    """The JSON metadata (epoch, config, metrics, history) of a checkpoint."""
    ckpt = checkpoint_dir(path)
    meta_dir = ckpt / "meta"
    files = [p for p in meta_dir.iterdir() if p.is_file() and p.name != "commit_success.txt"]
    if not files:
        raise CheckpointError(f"checkpoint {ckpt} is damaged: its metadata is missing")
    try:
        return json.loads(files[0].read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {ckpt} is damaged: its metadata cannot be read "
                              f"({_first_line(e)})") from e


def restore_variables(path: str | os.PathLike, target=None):
    """``(meta, variables)`` of a checkpoint, on the default device.

    ``target``: a pytree of ``jax.ShapeDtypeStruct`` of the variables (default: the saved
    structure). Raises :class:`CheckpointError` naming a damaged checkpoint. In a
    multi-process run each process reads on its own (no barrier with the others).
    """
    ckpt = checkpoint_dir(path)
    meta = read_meta(ckpt)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    me = jax.process_index()
    reader = ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
        primary_host=me, active_processes={me}))
    if target is not None:
        check_tree(ckpt, "variables", target)
        target = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), target)
    variables = _read(ckpt, lambda: jax.block_until_ready(
        reader.restore(ckpt / "variables", target)))
    return meta, {k: v for k, v in variables.items() if v or k == "params"}
