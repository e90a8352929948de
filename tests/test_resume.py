"""Resuming never overwrites a run: another config is refused before anything is read or
written, a checkpoint of another model is a mismatch (not damage, and orbax never reads it),
every checkpoint damaged stops with an error unless ``restart`` is asked for, and a write
that fails (a full disk) leaves no temporary folder and the earlier checkpoints intact."""

import dataclasses
import errno
import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
import warnings

import jax
import optax
import orbax.checkpoint as ocp
import pytest
from helpers import run_config

from pimjax import checkpoint
from pimjax import train as T
from pimjax.checkpoint import CheckpointError, CheckpointMismatchError, CheckpointStore
from pimjax.models import ModelConfig
from pimjax.train.runs import check_run_config


@pytest.fixture
def run_copy(trained, tmp_path):
    """A copy of the finished 3-epoch qat run: ``(run, its copied folder)``."""
    workdir = tmp_path / "run"
    shutil.copytree(trained["qat"].workdir, workdir)
    return trained["qat"], workdir


def _snapshot(workdir) -> dict:
    """Every file of a run folder and a digest of its bytes (the lock file aside)."""
    return {str(p.relative_to(workdir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(workdir.rglob("*")) if p.is_file() and p.name != ".pimjax.lock"}


def _another(config, what):
    if what == "model":
        return dataclasses.replace(config, model=ModelConfig("lenet5", width=0.5))
    return dataclasses.replace(config, optim=dataclasses.replace(config.optim, optimizer="sgd"))


def _no_orbax_restore(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("orbax was asked to read the arrays")

    monkeypatch.setattr(ocp.CheckpointManager, "restore", refuse)
    monkeypatch.setattr(ocp.StandardCheckpointer, "restore", refuse)


@pytest.mark.parametrize("what, change", [("model", r"model.width: 1.0 -> 0.5"),
                                          ("optimizer", r"optim.optimizer: 'adam' -> 'sgd'")])
def test_resume_with_another_model_or_optimizer_changes_nothing(run_copy, mnist, monkeypatch,
                                                                what, change):
    run, workdir = run_copy
    before = _snapshot(workdir)
    _no_orbax_restore(monkeypatch)  # the configs are compared first, from JSON
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "damaged ... falling back" warning
        with pytest.raises(ValueError, match=rf"cannot resume .*config differs.*{change}.*"
                                             r"nothing was changed.*restart=True") as info:
            T.train(_another(run.config, what), train_data=mnist[0], test_data=mnist[1],
                    workdir=workdir, resume=True, num_devices=1, progress=False)
    assert "\n" not in str(info.value)
    assert _snapshot(workdir) == before


def _narrow(state):
    """``state`` with every parameter cut to one channel: the tree of another model."""
    return state.replace(params=jax.tree.map(lambda x: x[..., :1] if x.ndim else x,
                                             state.params))


def _sgd(state):
    return state.replace(opt_state=optax.sgd(0.1, momentum=0.9).init(state.params))


def test_checkpoint_of_another_tree_is_a_mismatch_not_damage(run_copy, monkeypatch):
    run, workdir = run_copy
    store = CheckpointStore(workdir)
    _no_orbax_restore(monkeypatch)  # refused from orbax's metadata, before any array is read
    for target, what in ((_narrow(run.result.state), "model"),
                         (_sgd(run.result.state), "optimizer state")):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a mismatch is no reason to fall back
            with pytest.raises(CheckpointMismatchError,
                               match=rf"checkpoint {workdir}/checkpoints/3 holds another {what}"
                                     r" .*array\(s\) differ, e.g. .*saved .*expected .*config"):
                store.restore_latest(target)
    abstract = jax.eval_shape(lambda: _narrow(run.result.state).variables)
    with pytest.raises(CheckpointMismatchError, match="holds another model"):
        checkpoint.restore_variables(workdir, abstract)


def _rewrite_configs(workdir, config):
    """Make every config the run records say ``config`` (a run of another model whose JSON
    agrees with the resumed config: only the arrays tell the difference)."""
    (workdir / "config.json").write_text(json.dumps(config.to_dict()))
    for meta_file in workdir.glob("*/*/meta/metadata"):
        meta = json.loads(meta_file.read_text())
        meta["config"] = config.to_dict()
        meta_file.write_text(json.dumps(meta))


def test_resume_into_a_checkpoint_of_another_model_stops(run_copy, mnist):
    run, workdir = run_copy
    other = _another(run.config, "model")
    _rewrite_configs(workdir, other)
    before = _snapshot(workdir)
    with pytest.raises(CheckpointMismatchError, match="checkpoints/3 holds another model"):
        T.train(other, train_data=mnist[0], test_data=mnist[1], workdir=workdir, resume=True,
                num_devices=1, progress=False)
    assert _snapshot(workdir) == before


_LOAD_EACH = textwrap.dedent("""
    import gc, sys, time
    from pimjax import train as T
    for path in sys.argv[1:]:
        try:
            T.load_model(path)
        except ValueError as e:
            print(type(e).__name__, e)
    gc.collect()
    time.sleep(1.0)  # time for abandoned reads to finish and report
    gc.collect()
""")


def test_a_refused_checkpoint_leaves_no_asyncio_noise(run_copy):
    """A checkpoint of another model, and a damaged one, refused: stderr holds no "Exception
    ignored" or "Event loop is closed" from orbax reads abandoned on the error (pyproject's
    filterwarnings cannot hide it in a subprocess)."""
    run, workdir = run_copy
    damaged = workdir.parent / "damaged"
    shutil.copytree(workdir, damaged)
    _truncate_arrays(damaged / "checkpoints" / "3")
    _rewrite_configs(workdir, _another(run.config, "model"))
    out = subprocess.run([sys.executable, "-c", _LOAD_EACH, str(workdir), str(damaged)],
                         capture_output=True, text=True, timeout=300)
    for noise in ("Exception ignored", "Event loop is closed", "Traceback"):
        assert noise not in out.stderr, out.stderr[-3000:]
    assert out.returncode == 0, out.stderr[-3000:]
    mismatch, damage = out.stdout.splitlines()
    assert mismatch.startswith("CheckpointMismatchError checkpoint"), mismatch
    assert damage.startswith(f"CheckpointError checkpoint {damaged}/checkpoints/3 is damaged"), \
        damage


def _truncate_arrays(ckpt):
    files = [p for p in (ckpt / "variables").rglob("*") if p.is_file() and p.parent.name == "d"]
    big = max(files, key=lambda p: p.stat().st_size)
    with open(big, "r+b") as f:
        f.truncate(big.stat().st_size // 2)


# orbax's reads abandoned on the damaged files are collected quietly by pimjax.checkpoint
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_every_checkpoint_damaged_stops_unless_restarted(run_copy, mnist):
    run, workdir = run_copy
    for epoch in (2, 3):
        _truncate_arrays(workdir / "checkpoints" / str(epoch))
    before = _snapshot(workdir)
    kwargs = dict(train_data=mnist[0], test_data=mnist[1], workdir=workdir, num_devices=1,
                  progress=False)
    best = checkpoint.read_meta(workdir / "best")["epoch"]
    with pytest.warns(UserWarning, match="checkpoints/3 is damaged.*falling back"), \
            pytest.raises(CheckpointError,
                          match=rf"every checkpoint in {workdir}/checkpoints is damaged \(epochs "
                                rf"2, 3; .*nothing was changed. The best checkpoint "
                                rf"{workdir}/best/{best} \(epoch {best}\) is intact: copy it to "
                                rf"{workdir}/checkpoints/{best} .*restart=True") as info:
        T.train(run.config, resume=True, **kwargs)
    assert "\n" not in str(info.value)
    assert _snapshot(workdir) == before

    # the way out the message offers: the best checkpoint copied into checkpoints/ resumes
    rescue = workdir.parent / "rescue"
    shutil.copytree(workdir, rescue)
    shutil.rmtree(rescue / "checkpoints" / str(best))
    shutil.copytree(rescue / "best" / str(best), rescue / "checkpoints" / str(best))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a damaged newer checkpoint, if best is not the last
        _, meta = CheckpointStore(rescue).restore_latest(run.result.state)
    assert meta["epoch"] == best

    with pytest.raises(ValueError, match="resume .* or restart .*not both"):
        T.train(run.config, resume=True, restart=True, **kwargs)
    restarted = T.train(run.config, restart=True, stop_after=1, **kwargs)
    assert [row["epoch"] for row in restarted.history] == [1]
    assert CheckpointStore(workdir).epochs() == [1]
    assert [p.name for p in (workdir / "best").iterdir()] == ["1"]
    assert [r["epoch"] for r in json.loads((workdir / "metrics.json").read_text())] == [1]
    # the restarted epoch is the uninterrupted run's first, exactly
    assert restarted.history[0]["test_acc"] == run.result.history[0]["test_acc"]


def test_a_run_with_checkpoints_is_not_overwritten_without_restart(run_copy, mnist):
    run, workdir = run_copy
    before = _snapshot(workdir)
    with pytest.raises(ValueError, match=r"already holds checkpoints.*restart=True"):
        T.train(run.config, train_data=mnist[0], test_data=mnist[1], workdir=workdir,
                num_devices=1, progress=False)
    assert _snapshot(workdir) == before


# what a full disk raises: an OSError, or TensorStore's ValueError that ends in the OS error code
_DISK_FULL = [OSError(errno.ENOSPC, "No space left on device"),
              ValueError('RESOURCE_EXHAUSTED: Error writing "params.w/0" in OCDBT database at '
                         'local file "/x/2.orbax-checkpoint-tmp/": Failed to write 740068 bytes '
                         "to file 11: No space left on device [os_error_code='28']")]


@pytest.mark.parametrize("error", _DISK_FULL, ids=["OSError", "TensorStore"])
def test_a_failed_write_leaves_no_temporary_folder_and_keeps_the_last_checkpoint(
        trained, tmp_path, monkeypatch, error):
    run = trained["qat"]
    state = run.result.state
    store = CheckpointStore(tmp_path)
    meta = {"epoch": 1, "config": run.config.to_dict()}
    store.save(1, state, meta, best=True)

    def disk_full(*args, **kwargs):
        raise error

    with monkeypatch.context() as m:
        m.setattr(ocp.JsonCheckpointHandler, "async_save", disk_full)
        m.setattr(ocp.JsonCheckpointHandler, "save", disk_full)
        for best in (False, True):
            with pytest.raises(checkpoint.CheckpointWriteError,
                               match=rf"cannot write checkpoint {tmp_path}/checkpoints/2 "
                                     r"\(No space left on device\); "
                                     rf"{tmp_path}/checkpoints/1 \(epoch 1\) is intact") as info:
                store.save(2, state, {**meta, "epoch": 2}, best=best)
            assert isinstance(info.value, OSError) and "\n" not in str(info.value)
            assert not [p for p in tmp_path.rglob("*") if "tmp" in p.name]
            assert store.epochs() == [1] and store.latest_epoch() == 1
    restored, saved = store.restore(state)
    assert saved["epoch"] == 1
    store.save(2, state, {**meta, "epoch": 2})  # the store works on once the disk has room
    assert store.epochs() == [1, 2]


def test_the_saved_configs_are_read_from_json_skipping_damaged_ones(run_copy):
    run, workdir = run_copy
    (workdir / "checkpoints" / "3" / "meta" / "metadata").write_text("{")
    check_run_config(run.config, workdir)
    other = run_config("qat", seed=run.config.seed + 1)
    with pytest.raises(ValueError, match=rf"seed: {run.config.seed} -> {other.seed}; as "
                                         r"recorded in .*config.json"):
        check_run_config(other, workdir)
