"""Orbax checkpoints of training runs, and loaders that rebuild the model from them.

A run directory holds ``config.json``, ``checkpoints/<epoch>/`` (the last few epochs) and
``best/<epoch>/`` (the best by test accuracy). Each ``<epoch>`` directory is one orbax
checkpoint with three items:

* ``variables``: ``{"params", "batch_stats", "tune"}``, everything inference needs;
* ``train``: ``{"step", "opt_state"}``, what resuming needs besides;
* ``meta``: JSON with ``epoch``, ``config`` (a :class:`pimjax.train.TrainConfig` dict),
  ``metrics`` and ``history``.

Orbax writes into a temporary directory and renames it when complete, so a crash never leaves
a half-written checkpoint behind. A checkpoint damaged later (a truncated file) is detected
when read: :meth:`CheckpointStore.restore_latest` falls back to the newest intact one with a
warning, :func:`restore_variables` raises a one-line :class:`CheckpointError` naming it. This
module stores and reads pytrees only; :func:`pimjax.train.load_model` rebuilds the model.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import jax
import orbax.checkpoint as ocp

ITEMS = ("variables", "train", "meta")
LAST, BEST = "checkpoints", "best"


class CheckpointError(ValueError):
    """A checkpoint is missing or cannot be read (damaged, truncated)."""


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
        for mgr in (last, best_mgr) if best else (last,):
            # An epoch saved before is replaced: a run resumed past a damaged checkpoint (or
            # from before a best epoch) saves that epoch again.
            if epoch in mgr.all_steps():
                mgr.delete(epoch)
            mgr.save(epoch, args=args, force=True)
            mgr.wait_until_finished()

    def epochs(self) -> list[int]:
        """Epochs of the complete 'last' checkpoints, oldest first."""
        if not self.last_dir.is_dir():
            return []
        return sorted(self._managers()[0].all_steps())

    def restore(self, state, epoch: int | None = None):
        """Restore into the structure and shardings of ``state``: ``(state, meta)``.

        Raises :class:`CheckpointError` naming the checkpoint if it cannot be read.
        """
        last = self._managers()[0]
        epoch = last.latest_step() if epoch is None else epoch
        if epoch is None:
            raise CheckpointError(f"no checkpoint in {self.last_dir}")
        variables, train = _state_items(state)
        try:
            out = last.restore(epoch, args=ocp.args.Composite(
                variables=ocp.args.StandardRestore(variables),
                train=ocp.args.StandardRestore(train),
                meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax/TensorStore raise many types for a damaged file
            raise CheckpointError(f"checkpoint {self.last_dir / str(epoch)} is damaged and "
                                  f"cannot be read ({_first_line(e)})") from e
        v, t = out["variables"], out["train"]
        state = state.replace(params=v["params"], batch_stats=v["batch_stats"], tune=v["tune"],
                              step=t["step"], opt_state=t["opt_state"])
        return state, out["meta"]

    def restore_latest(self, state):
        """``(state, meta)`` of the newest intact checkpoint, or None when there is none.

        A damaged newer checkpoint is skipped with a warning that names it.
        """
        for epoch in reversed(self.epochs()):
            try:
                return self.restore(state, epoch)
            except CheckpointError as e:
                warnings.warn(f"{e}; falling back to an earlier checkpoint", stacklevel=2)
        return None


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
    steps = sorted(int(p.name) for p in path.glob("*")
                   if p.name.isdigit() and (p / "meta").is_dir() and (p / "variables").is_dir())
    if not steps:
        raise CheckpointError(f"no pimjax checkpoint found at {path}: pass a run directory "
                              "(written by experiments/train.py) or one of its checkpoints")
    return path / str(steps[-1])


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
    try:
        if target is not None:
            target = jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), target)
        variables = reader.restore(ckpt / "variables", target)
        jax.block_until_ready(variables)
    except Exception as e:  # orbax/TensorStore raise many types for a damaged file
        raise CheckpointError(f"checkpoint {ckpt} is damaged and cannot be read "
                              f"({_first_line(e)})") from e
    return meta, {k: v for k, v in variables.items() if v or k == "params"}
