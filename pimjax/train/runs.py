"""Reading training runs back: the model, variables and config of a checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pimjax import checkpoint as ckpt_lib
from pimjax.introspect import abstract_variables
from pimjax.train.config import TrainConfig
from pimjax.train.state import build_model

_RESUME_FREE = ("data.data_dir",)  # fields that may change between a run and its resumption


def load_model(path: str | os.PathLike):
    """Rebuild a trained model from a run or checkpoint directory: ``(model, variables, config)``.

    Raises :class:`pimjax.checkpoint.CheckpointError` (a ValueError) naming a missing or
    damaged checkpoint, or a checkpoint from an incompatible version.
    """
    meta = ckpt_lib.read_meta(path)
    try:
        config = TrainConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ckpt_lib.CheckpointError(
            f"checkpoint {ckpt_lib.checkpoint_dir(path)} holds a config this pimjax cannot read "
            f"({e}): retrain with this version") from e
    model = build_model(config)
    abstract = abstract_variables(model)
    target = {"params": abstract["params"], "batch_stats": abstract.get("batch_stats", {}),
              "tune": abstract.get("tune", {})}
    _, variables = ckpt_lib.restore_variables(path, target)
    return model, variables, config


def load_float_source(config: TrainConfig):
    """The float run ptq quantizes: ``(its config, variables)``, checked to be the same net."""
    path = Path(config.ptq.from_checkpoint)
    if not path.exists():
        raise ValueError(f"ptq.from_checkpoint={config.ptq.from_checkpoint!r} does not exist: "
                         "pass the directory of a trained vat (or fp) run")
    _, variables, src = load_model(path)
    if not src.quant.is_float:
        raise ValueError(f"ptq.from_checkpoint holds a {src.quant.name} model: ptq quantizes a "
                         "float (vat or fp) model")
    for field in ("model", "data.name"):
        a, b = _get(src, field), _get(config, field)
        if a != b:
            raise ValueError(f"ptq.from_checkpoint has {field}={a!r}, the ptq config "
                             f"{field}={b!r}: they must match")
    return src, variables


def _get(config, dotted: str):
    for name in dotted.split("."):
        config = getattr(config, name)
    return config


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume_config(config: TrainConfig, saved: dict, workdir,
                        source: str = "its checkpoint") -> None:
    """Raise ValueError unless ``config`` equals the ``saved`` one (but for the data dir)."""
    now, before = _flat(config.to_dict()), _flat(saved)
    diff = sorted(k for k in set(now) | set(before)
                  if k not in _RESUME_FREE and now.get(k) != before.get(k))
    if diff:
        details = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in diff)
        raise ValueError(f"cannot resume {workdir}: the config differs from the run's "
                         f"({details}; as recorded in {source}); nothing was changed: resume "
                         "with the run's settings (its config.json), choose a new output "
                         "directory, or pass restart=True (--restart) to discard the run")


def check_run_config(config: TrainConfig, workdir: str | os.PathLike) -> None:
    """Raise ValueError unless ``config`` is the one every config of run ``workdir`` records.

    Reads only JSON (``config.json`` and each checkpoint's metadata; damaged ones are left to
    the restore), so a resume with another model or optimizer is refused before any array is
    read and before anything is written.
    """
    workdir = Path(workdir).absolute()
    config_file = workdir / "config.json"
    if config_file.is_file():
        try:
            saved = json.loads(config_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            saved = None
        if isinstance(saved, dict):
            check_resume_config(config, saved, workdir, str(config_file))
    for ckpt in ckpt_lib.run_checkpoints(workdir):
        try:
            saved = ckpt_lib.read_meta(ckpt)["config"]
        except (ckpt_lib.CheckpointError, KeyError, TypeError):
            continue
        check_resume_config(config, saved, workdir, str(ckpt))
