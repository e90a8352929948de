"""Orbax checkpoints: save/restore round trip, path resolution, model rebuilding."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pimjax import checkpoint
from pimjax import train as T

CFG = T.TrainConfig(model="lenet5", dataset="mnist", method="qavat", quant="W2A4",
                    sigma_within=0.3, batch_size=32, limit_train=128, limit_test=64, epochs=2)


@pytest.fixture(scope="module")
def state():
    """A freshly initialised qavat LeNet-5 state with distinctive values in every collection."""
    s = T.create_train_state(CFG, jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)), 128)
    bumped = jax.tree.map(lambda x: x + 0.5, s.batch_stats)
    return s.replace(step=jnp.asarray(7, jnp.int32), batch_stats=bumped)


def _assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) and jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_store_round_trip_keeps_last_and_best(state, tmp_path):
    store = checkpoint.CheckpointStore(tmp_path, max_to_keep=2)
    assert store.latest_epoch() is None
    for epoch in (1, 2, 3):
        store.save(epoch, state.replace(step=jnp.asarray(epoch, jnp.int32)),
                   {"epoch": epoch, "config": CFG.to_dict()}, best=epoch == 2)
    assert store.latest_epoch() == 3
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "3"]
    assert [p.name for p in (tmp_path / "best").iterdir()] == ["2"]
    # no temporary directories are left behind: orbax renames complete checkpoints into place
    assert not [p for p in tmp_path.rglob("*") if "tmp" in p.name]
    target = state.replace(step=jnp.zeros((), jnp.int32),
                           params=jax.tree.map(jnp.zeros_like, state.params),
                           opt_state=jax.tree.map(jnp.zeros_like, state.opt_state))
    restored, meta = store.restore(target)
    assert meta["epoch"] == 3 and int(restored.step) == 3
    _assert_trees_equal(restored.params, state.params)
    _assert_trees_equal(restored.batch_stats, state.batch_stats)
    _assert_trees_equal(restored.opt_state, state.opt_state)
    assert jax.tree.structure(restored.opt_state) == jax.tree.structure(state.opt_state)


def test_restore_and_load_model_from_any_level(state, tmp_path):
    path = checkpoint.save(tmp_path, 4, state, CFG, {"test_acc": 0.5}, best=True)
    assert path == tmp_path / "checkpoints" / "4"
    for where in (tmp_path, tmp_path / "checkpoints", tmp_path / "best", path):
        config, variables = checkpoint.restore(where)
        assert config == CFG
        _assert_trees_equal(variables["params"], state.params)
        _assert_trees_equal(variables["batch_stats"], state.batch_stats)
        _assert_trees_equal(variables["tune"], state.tune)
    meta = checkpoint.read_meta(tmp_path / "best")
    assert meta["epoch"] == 4 and meta["metrics"]["test_acc"] == 0.5
    json.dumps(meta)  # plain JSON

    model, variables, config = checkpoint.load_model(tmp_path)
    assert config.quant == "W2A4" and model.quant.act_bits == 4
    x = jnp.zeros((2, 28, 28, 1))
    apply = jax.jit(model.apply)
    out, ref = apply(variables, x), apply(state.variables, x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-6)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no pimjax checkpoint"):
        checkpoint.restore(tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.CheckpointStore(tmp_path).restore(None)
