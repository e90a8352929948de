"""Orbax checkpoints: save/restore round trip, path resolution, model rebuilding, and damaged
checkpoints (a truncated array file or metadata): resume falls back with a warning, loading
raises a one-line CheckpointError naming the checkpoint."""

import gc
import json
import shutil

import jax
import jax.numpy as jnp
import pytest
from helpers import BATCH, TRAIN_IMAGES, assert_trees_equal

from pimjax import checkpoint
from pimjax import train as T
from pimjax.checkpoint import CheckpointError, CheckpointStore


@pytest.fixture(scope="module")
def run(trained):
    return trained["qat"]


def test_store_round_trip_keeps_last_and_best(run, tmp_path):
    state = run.result.state
    store = CheckpointStore(tmp_path, max_to_keep=2)
    assert store.latest_epoch() is None and store.epochs() == []
    for epoch in (1, 2, 3):
        bumped = state.replace(step=jnp.asarray(epoch, jnp.int32),
                               batch_stats=jax.tree.map(lambda x, e=epoch: x + e,
                                                        state.batch_stats))
        store.save(epoch, bumped, {"epoch": epoch, "config": run.config.to_dict()},
                   best=epoch == 2)
    assert store.latest_epoch() == 3 and store.epochs() == [2, 3]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "3"]
    assert [p.name for p in (tmp_path / "best").iterdir()] == ["2"]
    # no temporary directories are left behind: orbax renames complete checkpoints into place
    assert not [p for p in tmp_path.rglob("*") if "tmp" in p.name]
    target = state.replace(step=jnp.zeros((), jnp.int32),
                           params=jax.tree.map(jnp.zeros_like, state.params),
                           batch_stats=jax.tree.map(jnp.zeros_like, state.batch_stats),
                           opt_state=jax.tree.map(jnp.zeros_like, state.opt_state))
    restored, meta = store.restore(target)
    assert meta["epoch"] == 3 and int(restored.step) == 3
    assert_trees_equal(restored.params, state.params)
    assert_trees_equal(restored.batch_stats, jax.tree.map(lambda x: x + 3, state.batch_stats))
    assert_trees_equal(restored.opt_state, state.opt_state)
    older, meta = store.restore(target, epoch=2)
    assert meta["epoch"] == 2 and int(older.step) == 2


def test_load_model_from_any_level(run):
    state = run.result.state
    epoch = checkpoint.read_meta(run.workdir / "best")["epoch"]
    for where in (run.workdir, run.workdir / "checkpoints", run.workdir / "checkpoints" / "3"):
        model, variables, config = T.load_model(where)
        assert config == run.config and model == state.model
        assert sorted(variables) == ["batch_stats", "params", "tune"]
        assert_trees_equal(variables["params"], state.params)
        assert_trees_equal(variables["batch_stats"], state.batch_stats)
        assert_trees_equal(variables["tune"], state.tune)
    meta = checkpoint.read_meta(run.workdir / "best")
    row = next(r for r in run.result.history if r["epoch"] == epoch)
    assert meta["metrics"]["test_acc"] == row["test_acc"] == run.result.summary["best_test_acc"]
    json.dumps(meta)  # plain JSON
    model, variables, _ = T.load_model(run.workdir)
    x = jnp.linspace(-1.0, 2.0, 2 * 28 * 28).reshape(2, 28, 28, 1)
    apply = jax.jit(model.apply)
    assert_trees_equal(apply(variables, x), apply(state.variables, x))


def test_missing_checkpoint_is_a_clear_error(run, tmp_path):
    with pytest.raises(CheckpointError, match="no pimjax checkpoint found at"):
        T.load_model(tmp_path)
    with pytest.raises(ValueError, match="no checkpoint in"):  # CheckpointError is one
        CheckpointStore(tmp_path).restore(run.result.state)
    assert CheckpointStore(tmp_path).restore_latest(run.result.state) is None


def _copy(run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(run.workdir, workdir)
    return workdir


def _truncate(path):
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    return path


def _largest_array_file(ckpt):
    files = [p for p in (ckpt / "variables").rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


def _one_line_error(match, fn, *args):
    with pytest.raises(CheckpointError, match=match) as info:
        fn(*args)
    assert "\n" not in str(info.value)
    return str(info.value)


# orbax's reads abandoned on the damaged file are collected quietly by pimjax.checkpoint
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_damaged_arrays_resume_falls_back_and_loading_names_the_checkpoint(run, mnist,
                                                                         tmp_path):
    workdir = _copy(run, tmp_path)
    damaged = workdir / "checkpoints" / "3"
    _truncate(_largest_array_file(damaged))
    _one_line_error(rf"checkpoint {damaged} is damaged and cannot be read \(ValueError: "
                    r"[A-Z_]+: Error reading", T.load_model, workdir)
    gc.collect()  # any read orbax abandoned and pimjax left would be reported here
    with pytest.warns(UserWarning, match=rf"checkpoint {damaged} is damaged.*falling back"):
        resumed = T.train(run.config, train_data=mnist[0], test_data=mnist[1], workdir=workdir,
                          resume=True, num_devices=1, progress=False)
    # resumed from epoch 2, retrained epoch 3: the uninterrupted run's result, bit for bit
    assert [row["epoch"] for row in resumed.history] == [1, 2, 3]
    assert_trees_equal(resumed.state.params, run.result.state.params)
    assert_trees_equal(resumed.state.batch_stats, run.result.state.batch_stats)
    _, variables, _ = T.load_model(workdir)  # epoch 3 was rewritten, intact
    assert_trees_equal(variables["params"], run.result.state.params)


def test_damaged_metadata(run, tmp_path):
    workdir = _copy(run, tmp_path)
    damaged = workdir / "checkpoints" / "3"
    _truncate(damaged / "meta" / "metadata")
    _one_line_error(rf"checkpoint {damaged} is damaged: its metadata cannot be read",
                    checkpoint.read_meta, workdir)
    _one_line_error(rf"checkpoint {damaged} is damaged", T.load_model, workdir)
    with pytest.warns(UserWarning, match=rf"{damaged} is damaged"):
        state, meta = CheckpointStore(workdir).restore_latest(run.result.state)
    assert meta["epoch"] == 2 and int(state.step) == 2 * TRAIN_IMAGES // BATCH
    (damaged / "meta" / "metadata").unlink()
    _one_line_error(rf"checkpoint {damaged} is damaged: its metadata is missing",
                    checkpoint.read_meta, damaged)


def test_checkpoint_of_an_incompatible_version(run, tmp_path):
    workdir = _copy(run, tmp_path)
    meta_file = workdir / "checkpoints" / "3" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["config"]["method"] = meta["config"].pop("train_method")  # an older field name
    meta_file.write_text(json.dumps(meta))
    _one_line_error(r"holds a config this pimjax cannot read .*method.*retrain",
                    T.load_model, workdir / "checkpoints" / "3")
