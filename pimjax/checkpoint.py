"""Orbax checkpoints of training runs, and loaders that rebuild the model from them.

A run directory holds ``config.json``, ``checkpoints/<epoch>/`` (the last few epochs) and
``best/<epoch>/`` (the best by test accuracy). Each ``<epoch>`` directory is one orbax
checkpoint with three items:

* ``variables``: ``{"params", "batch_stats", "tune"}``, everything inference needs;
* ``train``: ``{"step", "opt_state"}``, what resuming needs besides;
* ``meta``: JSON with ``epoch``, ``config`` (a :class:`pimjax.train.TrainConfig` dict),
  ``metrics`` and ``history``.

Orbax writes into a temporary directory and renames it when complete, so a crash never leaves
a half-written checkpoint behind. :func:`restore` and :func:`load_model` accept a run
directory (its latest checkpoint), a ``checkpoints``/``best`` directory, or one ``<epoch>``
directory.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.sharding import SingleDeviceSharding

ITEMS = ("variables", "train", "meta")
LAST, BEST = "checkpoints", "best"

# Orbax logs every save and restore at INFO/WARNING level through absl; keep runs readable.
logging.getLogger("absl").setLevel(logging.ERROR)


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
        last.save(epoch, args=args, force=True)
        last.wait_until_finished()
        if best:
            best_mgr.save(epoch, args=args, force=True)
            best_mgr.wait_until_finished()

    def restore(self, state, epoch: int | None = None):
        """Restore into the structure and shardings of ``state``: ``(state, meta)``."""
        last = self._managers()[0]
        epoch = last.latest_step() if epoch is None else epoch
        if epoch is None:
            raise FileNotFoundError(f"no checkpoint in {self.last_dir}")
        variables, train = _state_items(state)
        out = last.restore(epoch, args=ocp.args.Composite(
            variables=ocp.args.StandardRestore(variables),
            train=ocp.args.StandardRestore(train),
            meta=ocp.args.JsonRestore()))
        v, t = out["variables"], out["train"]
        state = state.replace(params=v["params"], batch_stats=v["batch_stats"], tune=v["tune"],
                              step=t["step"], opt_state=t["opt_state"])
        return state, out["meta"]


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
        raise FileNotFoundError(f"no pimjax checkpoint found at {path}")
    return path / str(steps[-1])


def read_meta(path: str | os.PathLike) -> dict:
    """The JSON metadata (epoch, config, metrics, history) of a checkpoint."""
    meta_dir = checkpoint_dir(path) / "meta"
    files = [p for p in meta_dir.iterdir() if p.is_file() and p.name != "commit_success.txt"]
    if not files:
        raise FileNotFoundError(f"checkpoint metadata missing in {meta_dir}")
    return json.loads(files[0].read_text())


def restore(path: str | os.PathLike):
    """Load a checkpoint: ``(TrainConfig, variables)`` with variables on the default device."""
    from pimjax.train import TrainConfig, build_model

    ckpt = checkpoint_dir(path)
    config = TrainConfig.from_dict(read_meta(ckpt)["config"])
    abstract = _abstract_variables(build_model(config))
    device = SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          abstract)
    variables = ocp.StandardCheckpointer().restore(ckpt / "variables", target)
    return config, {k: v for k, v in variables.items() if v or k == "params"}


@functools.lru_cache(maxsize=16)
def _abstract_variables(model) -> dict:
    """Shapes and dtypes of a model's params, batch_stats and tune (traced once per model)."""
    shape = (1, *model.input_shape)
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros(shape, jnp.float32))
    return {"params": abstract["params"], "batch_stats": abstract.get("batch_stats", {}),
            "tune": abstract.get("tune", {})}


def load_model(path: str | os.PathLike):
    """Rebuild a trained model: ``(model, variables, TrainConfig)``."""
    from pimjax.train import build_model

    config, variables = restore(path)
    return build_model(config), variables, config


def save(directory: str | os.PathLike, epoch: int, state, config, metrics: dict | None = None,
         best: bool = False) -> Path:
    """Save a TrainState under ``directory`` (a run dir) as epoch ``epoch``; return its path."""
    store = CheckpointStore(directory)
    metrics = metrics or {}
    meta = {"epoch": epoch, "config": config.to_dict(), "metrics": metrics,
            "history": [dict(metrics, epoch=epoch)] if metrics else []}
    store.save(epoch, state, meta, best=best)
    return store.last_dir / str(epoch)
