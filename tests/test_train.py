"""Training loop: config validation, resume equivalence, NaN guard, data parallelism, ptq."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pimjax import checkpoint
from pimjax import train as T
from pimjax.data import load_dataset, normalize

# A tiny LeNet-5 run: 128 training images in batches of 32 (4 steps per epoch), 64 test images.
TINY = dict(model="lenet5", dataset="mnist", batch_size=32, eval_batch_size=64,
            limit_train=128, limit_test=64, epochs=2, lr=2e-3)


def tiny(**overrides) -> T.TrainConfig:
    """A tiny LeNet-5/MNIST config with the given field overrides."""
    return T.TrainConfig(**{**TINY, **overrides})


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("field, value, allowed", [
    ("method", "sgd", "qavat"),
    ("model", "resnet50", "resnet20"),
    ("dataset", "imagenet", "cifar10"),
    ("optimizer", "lamb", "adam"),
    ("schedule", "linear", "cosine"),
    ("loss", "median", "worst"),
    ("distribution", "uniform", "lognormal"),
    ("between_granularity", "row", "column"),
])
def test_config_rejects_unknown_choices(field, value, allowed):
    with pytest.raises(ValueError, match=rf"{field}=.*{value}.*{allowed}"):
        tiny(**{field: value})


@pytest.mark.parametrize("overrides, match", [
    (dict(method="qat", quant="W9A4"), "weight_bits"),
    (dict(method="qat", quant="W2A0"), "act_bits"),
    (dict(method="qavat", quant="W2A4", sigma_within=-0.1), "sigma_within"),
    (dict(method="qavat", quant="W2A4", sigma_between=float("nan")), "sigma_between"),
    (dict(method="qat", quant="fp"), "quant"),
    (dict(method="ptq", quant="W2A4"), "from_checkpoint"),
    (dict(batch_size=0), "batch_size"),
    (dict(lr=-1.0), "lr"),
    (dict(model="resnet20"), "dataset"),
    (dict(method="qat", quant="W2A4", chips_per_step=4), "chips_per_step"),
    (dict(method="qavat", quant="W2A4", sigma_within=0.1, loss="worst"), "chips_per_step"),
])
def test_config_rejects_bad_values(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny(**overrides)


def test_method_semantics_force_quant_and_sigma():
    fp = tiny(method="fp", quant="W2A4", sigma_within=0.3)
    assert (fp.quant, fp.sigma_within, fp.sigma_between) == ("fp", 0.0, 0.0)
    qat = tiny(method="qat", quant="a4w2", sigma_within=0.3, sigma_between=0.1)
    assert (qat.quant, qat.sigma_within, qat.sigma_between) == ("W2A4", 0.0, 0.0)
    vat = tiny(method="vat", quant="W2A4", sigma_within=0.3)
    assert (vat.quant, vat.sigma_within) == ("fp", 0.3)
    qavat = tiny(method="qavat", quant="W2A4", sigma_within=0.3, sigma_between=0.1)
    assert qavat.variability.sigma_between == 0.1
    assert T.TrainConfig.from_dict(json.loads(json.dumps(qavat.to_dict()))) == qavat


def test_bad_config_fails_before_loading_data(tmp_path, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("data was loaded")

    monkeypatch.setattr(T, "load_dataset", no_load)
    with pytest.raises(ValueError, match="divisible"):
        T.train(tiny(batch_size=30), tmp_path / "run", num_devices=4, progress=False)
    with pytest.raises(ValueError, match="does not exist"):
        T.train(tiny(method="ptq", quant="W2A4", from_checkpoint=str(tmp_path / "nope")),
                tmp_path / "run2", num_devices=1, progress=False)


def test_schedules():
    cfg = tiny(epochs=4, lr=0.1, schedule="step", optimizer="sgd")
    s = T.make_schedule(cfg, 10)
    assert [float(s(i)) for i in (0, 19, 20, 30, 39)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.001, 0.001])
    c = T.make_schedule(dataclasses.replace(cfg, schedule="cosine"), 10)
    assert float(c(0)) == pytest.approx(0.1) and float(c(40)) == pytest.approx(0.0, abs=1e-9)


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    a = T.epoch_permutation(3, 5, 100)
    assert np.array_equal(a, T.epoch_permutation(3, 5, 100))
    assert not np.array_equal(a, T.epoch_permutation(3, 6, 100))
    assert sorted(a) == list(range(100))


# --------------------------------------------------------------------------- loop


QAVAT = dict(method="qavat", quant="W2A4", sigma_within=0.3)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Two epochs of qavat in one call."""
    workdir = tmp_path_factory.mktemp("full")
    final = T.train(tiny(**QAVAT), workdir, num_devices=1, progress=False)
    return workdir, final


def test_train_writes_metrics_config_and_checkpoints(uninterrupted):
    workdir, final = uninterrupted
    assert final["epoch"] == 2 and final["step"] == 8
    assert 0.0 <= final["test_acc"] <= 1.0 and np.isfinite(final["train_loss"])
    history = json.loads((workdir / "metrics.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]
    assert (workdir / "metrics.csv").read_text().splitlines()[0].startswith("epoch,step")
    assert T.TrainConfig.from_dict(json.loads((workdir / "config.json").read_text())) == tiny(
        **QAVAT)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1", "2"]
    assert [p.name for p in (workdir / "best").iterdir()] == [str(final["best_epoch"])]


def test_resume_matches_uninterrupted_run(uninterrupted, tmp_path):
    full_dir, full = uninterrupted
    first = T.train(tiny(**QAVAT), tmp_path, stop_after=1, num_devices=1, progress=False)
    assert first["epoch"] == 1
    with pytest.raises(ValueError, match="resume"):  # no silent overwrite of a run
        T.train(tiny(**QAVAT), tmp_path, num_devices=1, progress=False)
    with pytest.raises(ValueError, match="lr"):  # resuming needs the same config
        T.train(tiny(**{**QAVAT, "lr": 1e-2}), tmp_path, resume=True, num_devices=1,
                progress=False)
    resumed = T.train(tiny(**QAVAT), tmp_path, resume=True, num_devices=1, progress=False)
    assert resumed["epoch"] == 2 and resumed["step"] == full["step"]
    assert resumed["train_loss"] == pytest.approx(full["train_loss"], rel=1e-6)
    _, v_full = checkpoint.restore(full_dir)
    _, v_resumed = checkpoint.restore(tmp_path)
    for a, b in zip(jax.tree.leaves(v_full), jax.tree.leaves(v_resumed), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    history = json.loads((tmp_path / "metrics.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = tiny(**QAVAT)
    T.train(cfg, tmp_path, stop_after=1, num_devices=1, progress=False)
    real_step = T.train_step

    def nan_step(state, batch, chip_key, aug_key):
        new_state, metrics = real_step(state, batch, chip_key, aug_key)
        return new_state, {**metrics, "loss": metrics["loss"] * jnp.nan}

    monkeypatch.setattr(T, "train_step", nan_step)
    with pytest.raises(T.TrainingDivergedError, match=r"nan at epoch 2, step 1/4.*checkpoints/1"):
        T.train(cfg, tmp_path, resume=True, num_devices=1, progress=False)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]
    assert checkpoint.read_meta(tmp_path)["epoch"] == 1


def test_non_finite_params_are_never_saved(tmp_path):
    cfg = tiny(**QAVAT)
    state = T.create_train_state(cfg, jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)), 128)
    bad = state.replace(params=jax.tree.map(lambda p: p * jnp.inf, state.params))
    store = checkpoint.CheckpointStore(tmp_path)
    with pytest.raises(T.TrainingDivergedError, match="non-finite"):
        T._save(store, bad, cfg, 1, [{"epoch": 1, "test_acc": 0.0}], True)
    assert store.latest_epoch() is None


# ----------------------------------------------------------------------- sharding


def _one_step_on(mesh, state, images, labels, key):
    batch = T.shard_batch(mesh, images, labels)
    assert len(batch[0].sharding.device_set) == mesh.size
    new_state, metrics = T.train_step(T.replicate(mesh, state), batch, key, key)
    return jax.device_get((new_state.params, new_state.batch_stats, metrics))


def _step_on_one_and_all(cfg):
    """One training step of ``cfg`` on a 1-device mesh and on every host device."""
    ds = load_dataset("mnist", "train", limit=32)
    key = jax.random.PRNGKey(1)
    state = T.create_train_state(cfg, key, jnp.zeros((1, 28, 28, 1)), 128)
    return (_one_step_on(T.make_mesh(k), state, ds.images, ds.labels, key)
            for k in (1, jax.local_device_count()))


def test_sharded_step_equals_unsharded():
    n = jax.local_device_count()
    assert n >= 2, "conftest should provide several host devices"
    cfg = tiny(**QAVAT)
    (p1, s1, m1), (pn, sn, mn) = _step_on_one_and_all(cfg)
    np.testing.assert_allclose(m1["loss"], mn["loss"], rtol=1e-6)
    assert float(m1["acc"]) == float(mn["acc"])
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(sn), strict=True):  # BN and act max
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Adam's first update is about +-lr per element whatever the gradient's size, so where a
    # gradient is ~0 (STE-clipped weights) a last-bit difference can flip its sign: a few
    # elements may differ by up to 2 lr; all others agree to float precision.
    diff = np.concatenate([np.abs(a - b).ravel() for a, b in
                           zip(jax.tree.leaves(p1), jax.tree.leaves(pn), strict=True)])
    assert diff.max() <= 2 * cfg.lr * 1.001
    assert np.mean(diff > 1e-6) < 0.01


@pytest.mark.slow
@pytest.mark.parametrize("chips", [1, 2])
def test_sharded_float_sgd_step_matches_exactly(chips):
    cfg = tiny(method="vat", sigma_within=0.2, chips_per_step=chips, optimizer="sgd", lr=0.05)
    (p1, s1, m1), (pn, sn, mn) = _step_on_one_and_all(cfg)
    np.testing.assert_allclose(m1["loss"], mn["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((pn, sn)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_k_chips_worst_loss_is_at_least_mean():
    cfg = tiny(method="qavat", quant="W2A4", sigma_within=0.5, chips_per_step=3,
               optimizer="sgd")
    ds = load_dataset("mnist", "train", limit=32)
    key = jax.random.PRNGKey(2)
    state = T.create_train_state(cfg, key, normalize(ds.images[:1], "mnist"), 128)
    batch = (jnp.asarray(ds.images), jnp.asarray(ds.labels))
    _, mean_m = T.train_step(state, batch, key, key)
    worst = state.replace(config=dataclasses.replace(cfg, loss="worst"))
    new_worst, worst_m = T.train_step(worst, batch, key, key)
    # "loss" is the mean over the K chips either way; the objective is the mean or the worst
    assert float(worst_m["loss"]) == pytest.approx(float(mean_m["loss"]), rel=1e-6)
    assert float(mean_m["objective"]) == pytest.approx(float(mean_m["loss"]), rel=1e-6)
    assert float(worst_m["objective"]) > float(mean_m["loss"])
    assert int(new_worst.step) == 1


# ---------------------------------------------------------------------------- ptq


def test_ptq_quantizes_a_float_model_and_recalibrates(uninterrupted, tmp_path):
    # A float "vat" checkpoint made of the trained fixture's weights and BN statistics.
    _, trained = checkpoint.restore(uninterrupted[0])
    vat_cfg = tiny(method="vat", sigma_within=0.3)
    float_stats = {k: v for k, v in trained["batch_stats"].items() if k.startswith("BatchNorm")}
    float_state = T.TrainState(
        step=jnp.zeros((), jnp.int32), params=trained["params"], batch_stats=float_stats,
        tune=trained["tune"], opt_state={}, config=vat_cfg, model=None, tx=None)
    vat_dir = tmp_path / "vat"
    checkpoint.save(vat_dir, 1, float_state, vat_cfg)

    ptq_dir = tmp_path / "ptq"
    cfg = tiny(method="ptq", quant="W2A4", sigma_within=0.3, calib_batches=3,
               from_checkpoint=str(vat_dir))
    final = T.train(cfg, ptq_dir, num_devices=1, progress=False)
    assert final["step"] == 0 and 0.0 <= final["test_acc"] <= 1.0
    assert json.loads((ptq_dir / "metrics.json").read_text())[0]["calib_images"] == 96

    model, variables, loaded = checkpoint.load_model(ptq_dir)
    assert loaded.quant == "W2A4" and model.quant.weight_bits == 2 and model.quant.act_bits == 4
    # the weights are the float model's, untouched by calibration
    for a, b in zip(jax.tree.leaves(trained["params"]), jax.tree.leaves(variables["params"]),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the activation clips were recalibrated from their initial 0 ...
    stats = variables["batch_stats"]
    act_max = [v["input_quant"]["act_max"] for k, v in stats.items() if k.startswith("Analog")]
    assert len(act_max) == 5 and all(float(a) > 0 for a in act_max)
    fresh = T.create_train_state(cfg, jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)), 128)
    assert all(float(a) == 0 for k, v in fresh.batch_stats.items() if k.startswith("Analog")
               for a in jax.tree.leaves(v))
    # ... and the BN statistics moved away from the float model's
    assert all(not np.allclose(stats[k]["mean"], float_stats[k]["mean"]) for k in float_stats)
