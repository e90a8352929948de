"""Training: config validation, that training learns and that qavat beats qat under
variation, the per-epoch chip evaluation, resume == uninterrupted (bit for bit), divergence
guards, data parallelism, ptq, the optimizer options.

Most tests read the session's shared qat/qavat runs (``trained`` in conftest.py) or copies of
their run directories, instead of training their own. The tests that claim no bit-identity
come last and compile at the "fast" XLA level (see conftest.py), so the level switches once.
"""

import dataclasses
import gzip
import json
import math
import shutil
import struct

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    BATCH,
    EPOCHS,
    EVAL_CHIPS,
    SIGMA,
    TRAIN_IMAGES,
    assert_trees_equal,
    random_variables,
    run_config,
)

from pimjax import checkpoint, devices, montecarlo
from pimjax import data as pdata
from pimjax import train as T
from pimjax.devices import DeviceConfig
from pimjax.distributed import make_mesh, replicate, shard_rows
from pimjax.models import ModelConfig, get_model
from pimjax.quant import QuantConfig
from pimjax.train import loop

W2A4 = QuantConfig(weight_bits=2, act_bits=4)
Z = 5.0  # standard errors a statistical difference must clear


def subset(ds, n):
    """The first ``n`` examples of a dataset."""
    return dataclasses.replace(ds, images=ds.images[:n], labels=ds.labels[:n])


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("build, match", [
    (lambda: T.TrainConfig(train_method="sgd"), r"train_method='sgd' is unknown.*qavat"),
    (lambda: ModelConfig("resnet50"), r"model='resnet50' is unknown.*resnet20"),
    (lambda: T.DataConfig("imagenet"), r"data.name='imagenet' is unknown.*cifar10"),
    (lambda: T.OptimConfig(optimizer="lamb"), r"optim.optimizer='lamb' is unknown.*adam"),
    (lambda: T.OptimConfig(schedule="linear"), r"optim.schedule='linear' is unknown.*cosine"),
    (lambda: T.TrainConfig(loss="median"), r"loss='median' is unknown.*worst"),
    (lambda: DeviceConfig(distribution="uniform"), r"distribution='uniform' is unknown.*lognormal"),
    (lambda: DeviceConfig(between_granularity="row"), r"between_granularity='row'.*column"),
])
def test_config_rejects_unknown_choices(build, match):
    with pytest.raises(ValueError, match=match):
        build()


QAT = dict(train_method="qat", quant=W2A4)
QAVAT = dict(train_method="qavat", quant=W2A4, device=DeviceConfig(sigma_within=0.3))


@pytest.mark.parametrize("build, match", [
    (lambda: QuantConfig(weight_bits=9), "weight_bits"),
    (lambda: QuantConfig(act_bits=0), "act_bits"),
    (lambda: DeviceConfig(sigma_within=-0.1), "sigma_within"),
    (lambda: DeviceConfig(sigma_between=float("nan")), "sigma_between"),
    (lambda: T.OptimConfig(batch_size=0), "optim.batch_size"),
    (lambda: T.OptimConfig(lr=-1.0), "optim.lr"),
    (lambda: T.OptimConfig(momentum=1.0), "optim.momentum"),
    (lambda: T.OptimConfig(grad_clip=0.0), "optim.grad_clip"),
    (lambda: T.OptimConfig(epochs=2, warmup_epochs=2), "optim.warmup_epochs"),
    (lambda: T.OptimConfig(nesterov=True), "optim.nesterov needs optimizer 'sgd'"),
    (lambda: T.DataConfig(train_images=0), "data.train_images"),
    (lambda: T.EvalConfig(chips=5), "eval.chips=5 would score identical ideal chips"),
    (lambda: T.EvalConfig(chips=5, device=DeviceConfig(preset="ideal")), "ideal chips"),
    (lambda: T.TrainConfig(train_method="qat"), "trains a quantized model"),
    (lambda: T.TrainConfig(train_method="fp", quant=W2A4), "trains a float model.*qat"),
    (lambda: T.TrainConfig(train_method="vat", quant=W2A4), "trains a float model.*qavat"),
    (lambda: T.TrainConfig(**QAT, device=DeviceConfig(sigma_within=0.3)),
     "trains without variation.*qavat"),
    (lambda: T.TrainConfig(train_method="qavat", quant=W2A4), "trains under variation.*qat"),
    (lambda: T.TrainConfig(train_method="ptq", quant=W2A4), "ptq.from_checkpoint"),
    (lambda: T.TrainConfig(**QAT, ptq=T.PTQConfig(from_checkpoint="x")), "only used by"),
    (lambda: T.TrainConfig(model=ModelConfig("resnet20")), "cannot train on dataset 'mnist'"),
    (lambda: T.TrainConfig(**QAT, chips_per_step=4), "chips_per_step=4 needs variation"),
    (lambda: T.TrainConfig(**QAVAT, loss="worst"), "chips_per_step >= 2"),
    (lambda: T.TrainConfig(model="lenet5"), "model must be a ModelConfig"),
    (lambda: T.TrainConfig(max_loss_ratio=1.0), "max_loss_ratio"),
])
def test_config_rejects_bad_values(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_config_round_trips_through_json():
    cfg = T.TrainConfig(**QAVAT, optim=T.OptimConfig(optimizer="sgd", nesterov=True,
                                                     grad_clip=1.0, warmup_epochs=1.5),
                        eval=T.EvalConfig(chips=3, device=DeviceConfig(
                            sigma_within=0.2, sigma_between=0.1, distribution="lognormal")),
                        chips_per_step=2, loss="worst")
    assert T.TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match=r"unknown TrainConfig field\(s\) \['method'\]"):
        T.TrainConfig.from_dict({**cfg.to_dict(), "method": "qat"})


def test_bad_config_fails_before_loading_data(tmp_path, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("data was loaded")

    monkeypatch.setattr(pdata, "load_dataset", no_load)
    cfg = T.TrainConfig(optim=T.OptimConfig(batch_size=30))
    with pytest.raises(ValueError, match="optim.batch_size=30 must be divisible by the 4"):
        T.train(cfg, workdir=tmp_path / "run", num_devices=4, progress=False)
    with pytest.raises(ValueError, match="num_devices=9"):
        T.train(cfg, num_devices=9, progress=False)
    ptq = T.TrainConfig(train_method="ptq", quant=W2A4,
                        ptq=T.PTQConfig(from_checkpoint=str(tmp_path / "nope")))
    with pytest.raises(ValueError, match="does not exist"):
        T.train(ptq, workdir=tmp_path / "run2", num_devices=1, progress=False)
    with pytest.raises(ValueError, match="resume needs a workdir"):
        T.train(T.TrainConfig(), resume=True, progress=False)
    with pytest.raises(ValueError, match="stop_after"):
        T.train(T.TrainConfig(), stop_after=0, progress=False)
    assert not (tmp_path / "run").exists()


def test_train_rejects_data_of_another_dataset(mnist):
    cfg = T.TrainConfig(data=T.DataConfig("fashion_mnist"))
    with pytest.raises(ValueError, match="train_data is 'mnist' but the config trains on "
                                         "'fashion_mnist'"):
        T.train(cfg, train_data=mnist[0], test_data=mnist[1], progress=False)


@pytest.mark.parametrize("split, label", [("train", 37), ("train", -5), ("test", 10)])
def test_labels_out_of_range_are_refused(mnist, split, label):
    """A Dataset refuses labels outside [0, num_classes) when made, and train() checks them
    again (the arrays can change in place after that)."""
    ds = mnist[split == "test"]
    labels = ds.labels[:100].copy()
    labels[7] = label
    with pytest.raises(ValueError, match=rf"the mnist {split} split has label {label} at index "
                                         r"7 \(1 out of range\): labels must be in \[0, 10\)"):
        dataclasses.replace(subset(ds, 100), labels=labels)
    changed = dataclasses.replace(ds, labels=ds.labels.copy())  # not the shared split's
    changed.labels[7] = label
    data = dict(train_data=mnist[0], test_data=mnist[1])
    data[f"{split}_data"] = changed
    with pytest.raises(ValueError, match=rf"{split} split has label {label} at index 7"):
        T.train(run_config("qat"), num_devices=1, progress=False, **data)


@pytest.mark.parametrize("split, n, match", [
    ("train", 0, r"train_data \(the mnist train split\) holds 0 images: pass at least "
                 r"optim.batch_size=64"),
    ("train", 10, r"train_data \(the mnist train split\) holds 10 images"),
    ("test", 0, r"test_data \(the mnist test split\) holds 0 images: pass at least one"),
])
def test_too_small_splits_are_refused_before_training(mnist, tmp_path, split, n, match):
    data = dict(train_data=mnist[0], test_data=mnist[1])
    data[f"{split}_data"] = subset(mnist[split == "test"], n)
    with pytest.raises(ValueError, match=match):
        T.train(run_config("qat"), workdir=tmp_path / "run", num_devices=1, progress=False,
                **data)
    assert not (tmp_path / "run").exists()


def test_an_idx_file_of_no_images_is_refused(tmp_path):
    for name, magic, dims in (("train-images-idx3-ubyte", 2051, (0, 28, 28)),
                              ("train-labels-idx1-ubyte", 2049, (0,))):
        header = struct.pack(f">I{len(dims)}I", magic, *dims)
        (tmp_path / f"{name}.gz").write_bytes(gzip.compress(header))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.gz holds 0 images"):
        pdata.load_dataset("mnist", "train", data_dir=tmp_path, cache_dir=tmp_path / "cache")


# --------------------------------------------------------------------------- learning


def test_training_learns(trained):
    """LeNet-5 W2A4 is far above chance after 300 qat steps on the bundled MNIST.

    Chance is 10%: a guessing model's accuracy on the 500 test images has a standard
    deviation of sqrt(0.1 * 0.9 / 500) = 1.3%, so a threshold of 50% is 30 standard
    deviations above chance; the run measured 97%, clearing it by a wide margin.
    """
    for method in ("qat", "qavat"):
        history = trained[method].result.history
        assert [row["epoch"] for row in history] == list(range(1, EPOCHS + 1))
        assert history[-1]["step"] == EPOCHS * TRAIN_IMAGES // BATCH
        assert history[-1]["test_acc"] > 0.5, (method, history[-1]["test_acc"])
        # the training loss fell well below its first value (ln 10 = 2.3 at chance)
        assert history[-1]["train_loss"] < 0.3 * history[0]["first_loss"]


def test_qavat_beats_qat_under_variation(trained, mnist):
    """Under sigma_within 0.5, qavat's chips are more accurate than qat's, by a margin the
    sample resolves: 64 chips x 500 test images each, the same chips for both models; the
    difference of the mean accuracies must exceed Z = 5 standard errors (from the per-chip
    spread of each model, unpaired). Measured: 0.900 vs 0.774, a difference of 0.126 with a
    standard error of 0.014 (9 standard errors)."""
    device = devices.paper(SIGMA)
    key = jax.random.PRNGKey(2022)
    res = {}
    for method in ("qat", "qavat"):
        run = trained[method]
        # chunks of the per-epoch evaluation's shape on one device: its compiled programs
        res[method] = montecarlo.evaluate_chips(
            run.model, run.variables, device, key, 4 * EVAL_CHIPS, mnist[1],
            chips_per_chunk=EVAL_CHIPS, mesh_devices=jax.local_devices()[:1], nominal=False,
            progress=False)
    a, b = res["qavat"].accuracy, res["qat"].accuracy
    diff = a.mean() - b.mean()
    se = math.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size)
    assert diff > Z * se, (a.mean(), b.mean(), se)
    # montecarlo.difference: the paired difference over the same chips and images
    d_img = res["qavat"].image_accuracy - res["qat"].image_accuracy
    paired_se = math.sqrt((a - b).var(ddof=1) / a.size + d_img.var(ddof=1) / d_img.size)
    assert montecarlo.difference(res["qavat"], res["qat"]) == pytest.approx((diff, paired_se))


def test_per_epoch_chips_use_the_evaluation_device(trained, mnist):
    """qat trains on an ideal device; its per-epoch chips come from EvalConfig.device
    (sigma_within 0.5), not from the training device: their mean accuracy is far from the
    nominal one and equals montecarlo.evaluate_chips on the same chips."""
    run = trained["qat"]
    assert run.config.device.is_ideal and run.config.eval.chips == EVAL_CHIPS
    for row in run.result.history:
        assert "test_acc_chips_mean" in row and "test_acc_chips_min" in row
    last = run.result.history[-1]
    res = montecarlo.evaluate_chips(run.model, run.variables, devices.paper(SIGMA),
                                    T.run_keys(run.config.seed).eval_chips, EVAL_CHIPS,
                                    mnist[1], mesh_devices=jax.local_devices()[:1],
                                    nominal=False, progress=False)
    assert last["test_acc_chips_mean"] == pytest.approx(float(res.accuracy.mean()), abs=1e-12)
    assert last["test_acc_chips_min"] == pytest.approx(float(res.accuracy.min()), abs=1e-12)
    se = res.accuracy.std(ddof=1) / math.sqrt(EVAL_CHIPS)
    assert last["test_acc"] - last["test_acc_chips_mean"] > Z * se
    assert "test_acc_chips_mean" not in trained["qavat"].result.history[-1]


def test_run_directory_holds_metrics_config_and_checkpoints(trained):
    run = trained["qat"]
    history = json.loads((run.workdir / "metrics.json").read_text())
    assert history == json.loads(json.dumps(run.result.history))
    header = (run.workdir / "metrics.csv").read_text().splitlines()[0]
    assert header.startswith("epoch,step,lr,train_loss,train_acc,test_loss,test_acc")
    saved = json.loads((run.workdir / "config.json").read_text())
    assert T.TrainConfig.from_dict(saved) == run.config
    assert sorted(p.name for p in (run.workdir / "checkpoints").iterdir()) == ["2", "3"]
    best = max(history, key=lambda r: r["test_acc"])["epoch"]
    assert run.result.summary["best_epoch"] == best
    assert [p.name for p in (run.workdir / "best").iterdir()] == [str(best)]
    assert (run.workdir / ".pimjax.lock").read_text() == ""  # released cleanly


# ---------------------------------------------------------------------------- resume


@pytest.fixture
def interrupted(trained, tmp_path):
    """A copy of the qat run as if stopped after epoch 2 (epoch 3's checkpoint removed)."""
    workdir = tmp_path / "run"
    shutil.copytree(trained["qat"].workdir, workdir)
    shutil.rmtree(workdir / "checkpoints" / "3")
    return workdir


def test_resume_matches_uninterrupted_run_bit_for_bit(trained, mnist, interrupted):
    full = trained["qat"]
    kwargs = dict(train_data=mnist[0], test_data=mnist[1], num_devices=1, progress=False)
    with pytest.raises(ValueError, match="already holds checkpoints.*resume"):
        T.train(full.config, workdir=interrupted, **kwargs)  # no silent overwrite of a run
    other = run_config("qat", optim=dataclasses.replace(full.config.optim, lr=1e-2))
    with pytest.raises(ValueError, match=r"config differs.*optim.lr: 0.003 -> 0.01"):
        T.train(other, workdir=interrupted, resume=True, **kwargs)
    resumed = T.train(full.config, workdir=interrupted, resume=True, **kwargs)
    assert [row["epoch"] for row in resumed.history] == [1, 2, 3]
    assert int(resumed.state.step) == int(full.result.state.step)
    assert_trees_equal(resumed.state.params, full.result.state.params)
    assert_trees_equal(resumed.state.batch_stats, full.result.state.batch_stats)
    assert_trees_equal(resumed.state.opt_state, full.result.state.opt_state)
    for a, b in zip(resumed.history, full.result.history, strict=True):
        for key in ("train_loss", "train_acc", "test_loss", "test_acc", "test_acc_chips_mean"):
            assert a[key] == b[key], key
    history = json.loads((interrupted / "metrics.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2, 3]


def test_stop_after_ends_early(trained, mnist, tmp_path):
    run = trained["qat"]
    first = T.train(run.config, train_data=mnist[0], test_data=mnist[1], workdir=tmp_path,
                    stop_after=1, num_devices=1, progress=False)
    assert [row["epoch"] for row in first.history] == [1]
    assert checkpoint.CheckpointStore(tmp_path).epochs() == [1]
    assert int(first.state.step) == TRAIN_IMAGES // BATCH
    # the same first epoch as the uninterrupted run's, exactly
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "test_acc_chips_mean"):
        assert first.history[0][key] == run.result.history[0][key], key


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(trained, mnist, interrupted,
                                                           monkeypatch):
    real_step = loop.train_step

    def nan_step(state, batch, *keys):
        new_state, metrics = real_step(state, batch, *keys)
        return new_state, {**metrics, "loss": metrics["loss"] * jnp.nan}

    monkeypatch.setattr(loop, "train_step", nan_step)
    with pytest.raises(T.TrainingDivergedError,
                       match=r"is nan at epoch 3, step 1/100.*checkpoints/2 \(epoch 2\)"):
        T.train(trained["qat"].config, train_data=mnist[0], test_data=mnist[1],
                workdir=interrupted, resume=True, num_devices=1, progress=False)
    assert checkpoint.CheckpointStore(interrupted).epochs() == [2]


def test_non_finite_params_are_never_saved(trained, mnist, interrupted, monkeypatch):
    """Finite losses but infinite parameters: the epoch is not saved."""
    real_step = loop.train_step
    good = {}

    def inf_step(state, batch, *keys):  # trains on, but hands the loop infinite params
        new_state, metrics = real_step(good.get("state", state), batch, *keys)
        good["state"] = new_state
        return new_state.replace(params=jax.tree.map(lambda p: p * jnp.inf,
                                                     new_state.params)), metrics

    monkeypatch.setattr(loop, "train_step", inf_step)
    with pytest.raises(T.TrainingDivergedError, match="non-finite parameters after epoch 3"):
        T.train(trained["qat"].config, train_data=mnist[0], test_data=mnist[1],
                workdir=interrupted, resume=True, num_devices=1, progress=False)
    assert checkpoint.CheckpointStore(interrupted).epochs() == [2]


# ----------------------------------------------------------------------- sharding


def _one_step_on(num_devices, state, images, labels, key):
    mesh = make_mesh("batch", jax.local_devices()[:num_devices])
    batch = shard_rows((images, labels), mesh)
    assert len(batch[0].sharding.device_set) == num_devices
    new_state, metrics = T.train_step(replicate(state, mesh), batch, key, key, key)
    return jax.device_get((new_state.params, new_state.batch_stats, metrics))


def _step_on_one_and_all(cfg, state=None):
    """One training step of ``cfg`` on one device and on every host device."""
    ds = pdata.load_dataset("mnist", "train", limit=cfg.optim.batch_size)
    key = jax.random.PRNGKey(1)
    if state is None:
        state = T.create_train_state(cfg, key, pdata.normalize(ds.images[:1], "mnist"),
                                     TRAIN_IMAGES)
    return [_one_step_on(k, state, ds.images, ds.labels, key)
            for k in (1, jax.local_device_count())]


@pytest.mark.xla_level("fast")  # no bit-identity claim: compile quickly
def test_sharded_step_equals_unsharded(trained):
    assert jax.local_device_count() >= 2, "conftest should provide several host devices"
    run = trained["qavat"]
    (p1, s1, m1), (pn, sn, mn) = _step_on_one_and_all(run.config, run.result.state)
    np.testing.assert_allclose(m1["loss"], mn["loss"], rtol=1e-6)
    assert float(m1["acc"]) == float(mn["acc"])
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(sn), strict=True):  # BN and act max
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Adam's update is about +-lr per element whatever the gradient's size, so where a
    # gradient is ~0 (STE-clipped weights) a last-bit difference can flip its sign: a few
    # elements may differ by up to 2 lr; all others agree to float precision.
    diff = np.concatenate([np.abs(a - b).ravel() for a, b in
                           zip(jax.tree.leaves(p1), jax.tree.leaves(pn), strict=True)])
    assert diff.max() <= 2 * run.config.optim.lr * 1.001
    assert np.mean(diff > 1e-6) < 0.01


@pytest.mark.xla_level("fast")  # no bit-identity claim: compile quickly
@pytest.mark.slow
@pytest.mark.parametrize("chips", [1, 2])
def test_sharded_float_sgd_step_matches_exactly(chips):
    cfg = T.TrainConfig("vat", device=DeviceConfig(sigma_within=0.2), chips_per_step=chips,
                        optim=T.OptimConfig(optimizer="sgd", lr=0.05, batch_size=32))
    (p1, s1, m1), (pn, sn, mn) = _step_on_one_and_all(cfg)
    np.testing.assert_allclose(m1["loss"], mn["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((pn, sn)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.xla_level("fast")  # no bit-identity claim: compile quickly
@pytest.mark.slow
def test_k_chips_worst_loss_is_at_least_mean():
    cfg = T.TrainConfig("qavat", quant=W2A4, device=DeviceConfig(sigma_within=0.5),
                        chips_per_step=3, optim=T.OptimConfig(optimizer="sgd", batch_size=32))
    ds = pdata.load_dataset("mnist", "train", limit=32)
    key = jax.random.PRNGKey(2)
    state = T.create_train_state(cfg, key, pdata.normalize(ds.images[:1], "mnist"), 128)
    batch = (jnp.asarray(ds.images), jnp.asarray(ds.labels))
    _, mean_m = T.train_step(state, batch, key, key, key)
    worst = state.replace(config=dataclasses.replace(cfg, loss="worst"))
    new_worst, worst_m = T.train_step(worst, batch, key, key, key)
    # "loss" is the mean over the K chips either way; the objective is the mean or the worst
    assert float(worst_m["loss"]) == pytest.approx(float(mean_m["loss"]), rel=1e-6)
    assert float(mean_m["objective"]) == pytest.approx(float(mean_m["loss"]), rel=1e-6)
    assert float(worst_m["objective"]) > float(mean_m["loss"])
    assert int(new_worst.step) == 1


# ---------------------------------------------------------------------------- ptq


@pytest.mark.xla_level("fast")  # no bit-identity claim: compile quickly
def test_ptq_quantizes_a_float_model_and_recalibrates(trained, mnist, tmp_path):
    # A float "vat" checkpoint made of the trained qat run's weights and BN statistics.
    state = trained["qat"].result.state
    vat_cfg = T.TrainConfig("vat", device=DeviceConfig(sigma_within=0.3),
                            optim=T.OptimConfig(batch_size=BATCH))
    float_stats = {k: v for k, v in state.batch_stats.items() if k.startswith("BatchNorm")}
    vat_dir = tmp_path / "vat"
    checkpoint.CheckpointStore(vat_dir).save(
        1, state.replace(batch_stats=float_stats, opt_state={}, config=vat_cfg),
        {"epoch": 1, "config": vat_cfg.to_dict(), "history": [], "metrics": {}}, best=True)

    ptq_dir = tmp_path / "ptq"
    cfg = T.TrainConfig("ptq", quant=W2A4, device=DeviceConfig(sigma_within=0.3),
                        optim=T.OptimConfig(batch_size=BATCH),
                        ptq=T.PTQConfig(from_checkpoint=str(vat_dir), calib_batches=3))
    result = T.train(cfg, train_data=mnist[0], test_data=mnist[1], workdir=ptq_dir,
                     num_devices=1, progress=False)
    assert result.summary["step"] == 0 and result.history[0]["calib_images"] == 3 * BATCH
    assert json.loads((ptq_dir / "metrics.json").read_text())[0]["calib_images"] == 3 * BATCH

    model, variables, loaded = T.load_model(ptq_dir)
    assert loaded == cfg and model.quant == W2A4
    # the weights are the float model's, untouched by calibration
    assert_trees_equal(variables["params"], state.params)
    # the activation clips were recalibrated from their initial 0 ...
    stats = variables["batch_stats"]
    act_max = [v["input_quant"]["act_max"] for k, v in stats.items() if k.startswith("Analog")]
    assert len(act_max) == 5 and all(float(a) > 0 for a in act_max)
    fresh = T.create_train_state(cfg, jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)), 128)
    assert all(float(a) == 0 for k, v in fresh.batch_stats.items() if k.startswith("Analog")
               for a in jax.tree.leaves(v))
    # ... and the BN statistics moved away from the float model's under the sampled chips
    assert all(not np.allclose(stats[k]["mean"], float_stats[k]["mean"]) for k in float_stats)
    # the calibrated model is far above chance (10%) on the 500 test images
    assert result.history[0]["test_acc"] > 0.5


@pytest.mark.xla_level("fast")  # no bit-identity claim: compile quickly
def test_ptq_rejects_a_quantized_source(trained, tmp_path):
    cfg = T.TrainConfig("ptq", quant=W2A4, device=DeviceConfig(sigma_within=0.3),
                        ptq=T.PTQConfig(from_checkpoint=str(trained["qat"].workdir)))
    with pytest.raises(ValueError, match="holds a W2A4 model: ptq quantizes a float"):
        T.train(cfg, progress=False, num_devices=1)


@pytest.mark.xla_level("fast")  # no bit-identity claim: compile quickly
def test_exploding_loss_raises_and_saves_nothing(mnist, tmp_path):
    """Adam at lr 1e6: the loss exceeds max_loss_ratio x its first value within the first
    epoch, which is neither saved as 'last' nor as 'best'. (A float model: the quick compile.)"""
    cfg = T.TrainConfig("fp", optim=T.OptimConfig(lr=1e6, epochs=1, batch_size=BATCH))
    with pytest.raises(T.TrainingDivergedError,
                       match=r"exceeds 100 x its first value .* at epoch 1.*no checkpoint"):
        T.train(cfg, train_data=subset(mnist[0], 4 * BATCH), test_data=mnist[1],
                workdir=tmp_path, num_devices=1, progress=False)
    assert checkpoint.CheckpointStore(tmp_path).epochs() == []
    assert not (tmp_path / "best").exists() or not any((tmp_path / "best").iterdir())
    assert not (tmp_path / "metrics.json").exists()


# ------------------------------------------------------------------------ optimizer


@pytest.mark.xla_level("fast")  # no bit-identity claim: compile quickly
def test_step_and_cosine_schedules():
    optim = T.OptimConfig(lr=0.1, schedule="step", optimizer="sgd", epochs=4)
    s = T.make_schedule(optim, 10)  # 40 steps: x0.1 at 20 and at 30
    assert [float(s(i)) for i in (0, 19, 20, 29, 30, 39)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    c = T.make_schedule(dataclasses.replace(optim, schedule="cosine"), 10)
    # 0.1 * (1 + cos(pi s / 40)) / 2
    assert [float(c(i)) for i in (0, 10, 20, 40)] == pytest.approx(
        [0.1, 0.05 * (1 + math.cos(math.pi / 4)), 0.05, 0.0], abs=1e-7)
    k = T.make_schedule(dataclasses.replace(optim, schedule="constant"), 10)
    assert float(k(0)) == float(k(39)) == pytest.approx(0.1)


@pytest.mark.xla_level("fast")  # no bit-identity claim: compile quickly
@pytest.mark.parametrize("schedule", ["cosine", "step", "constant"])
def test_warmup(schedule):
    """A linear warmup from 0 reaches the peak lr at the end of warmup, then the schedule."""
    optim = T.OptimConfig(lr=0.1, schedule=schedule, warmup_epochs=1, epochs=4)
    s = T.make_schedule(optim, 10)  # 10 warmup steps of 40
    assert float(s(0)) == 0.0
    assert float(s(5)) == pytest.approx(0.05)
    assert float(s(10)) == pytest.approx(0.1)
    if schedule == "cosine":  # cosine over the remaining 30 steps, to 0 at the end
        assert float(s(25)) == pytest.approx(0.05, abs=1e-7)
        assert float(s(40)) == pytest.approx(0.0, abs=1e-7)
    if schedule == "step":  # the drops stay at 50% and 75% of all 40 steps
        assert [float(s(i)) for i in (19, 20, 29, 30)] == pytest.approx(
            [0.1, 0.01, 0.01, 0.001])


def _updates(optim, grads, params, steps=2):
    tx = T.make_optimizer(optim, 10)
    state = tx.init(params)
    update = jax.jit(tx.update)  # one compile instead of one per eager op and leaf shape
    out = []
    for g in grads[:steps]:
        u, state = update(g, state, params)
        out.append(u)
        params = optax.apply_updates(params, u)
    return out


def _norm(tree):
    return math.sqrt(sum(float(np.sum(np.asarray(x, np.float64) ** 2))
                         for x in jax.tree.leaves(tree)))


GRAD = {"a": jnp.array([[3.0, 0.0], [0.0, 4.0]]), "b": {"c": jnp.array([0.0, 0.0, 0.0])}}


@pytest.mark.xla_level("fast")  # no bit-identity claim: compile quickly
@pytest.mark.parametrize("scale, clipped", [(2.0, True), (0.1, False)])
def test_grad_clip_bounds_the_global_norm(scale, clipped):
    """SGD lr 1 without momentum: the update is -clip(g), of global norm min(|g|, 1)."""
    optim = T.OptimConfig(optimizer="sgd", lr=1.0, momentum=0.0, grad_clip=1.0,
                          schedule="constant")
    g = jax.tree.map(lambda x: x * scale, GRAD)  # |g| = 5 * scale
    (u,) = _updates(optim, [g], jax.tree.map(jnp.zeros_like, GRAD), steps=1)
    assert _norm(u) == pytest.approx(1.0 if clipped else 5 * scale, rel=1e-6)
    factor = 1.0 / (5 * scale) if clipped else 1.0
    np.testing.assert_allclose(u["a"], -factor * g["a"], rtol=1e-6)


@pytest.mark.xla_level("fast")  # no bit-identity claim: compile quickly
def test_nesterov_update():
    """Nesterov momentum: t_k = g_k + m t_{k-1}, update -lr (g_k + m t_k), as optax.sgd's."""
    lr, m = 0.1, 0.9
    optim = T.OptimConfig(optimizer="sgd", lr=lr, momentum=m, nesterov=True,
                          schedule="constant", epochs=2)
    params = {"w": jnp.array([1.0, -2.0])}
    grads = [{"w": jnp.array([0.5, 1.0])}, {"w": jnp.array([-1.0, 2.0])}]
    got = _updates(optim, grads, params)
    g1, g2 = (np.asarray(g["w"], np.float64) for g in grads)
    t1 = g1
    t2 = g2 + m * t1
    want = [-lr * (g1 + m * t1), -lr * (g2 + m * t2)]
    for u, w in zip(got, want, strict=True):
        np.testing.assert_allclose(u["w"], w, rtol=1e-6)
    ref = optax.sgd(lr, momentum=m, nesterov=True)
    state, p = ref.init(params), params
    for g, u in zip(grads, got, strict=True):
        r, state = ref.update(g, state, p)
        np.testing.assert_allclose(u["w"], r["w"], rtol=1e-6)
        p = optax.apply_updates(p, r)
    plain = _updates(dataclasses.replace(optim, nesterov=False), grads, params)
    assert not np.allclose(plain[1]["w"], got[1]["w"])  # the flag matters


@pytest.mark.xla_level("fast")  # no bit-identity claim: compile quickly
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_weight_decay_applies_to_kernels_only(optimizer):
    """With zero gradients the first update is -lr * wd * p on kernels, 0 on biases, BN
    scales/biases and scalar quantizer parameters."""
    lr, wd = 0.1, 0.01
    model = get_model("lenet5", quant=QuantConfig(2, 4, act_clip="pact"))
    params = random_variables(model)["params"]
    optim = T.OptimConfig(optimizer=optimizer, lr=lr, weight_decay=wd, schedule="constant")
    (u,) = _updates(optim, [jax.tree.map(jnp.zeros_like, params)], params, steps=1)
    names = set()
    for (path, p), du in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                             jax.tree.leaves(u), strict=True):
        name = path[-1].key
        names.add(name)
        if name == "kernel":
            np.testing.assert_allclose(du, -lr * wd * np.asarray(p), rtol=1e-5, atol=1e-12)
        else:
            np.testing.assert_array_equal(du, 0.0)
    assert names == {"kernel", "bias", "scale", "pact_alpha"}


@pytest.mark.xla_level("fast")  # no bit-identity claim: compile quickly
def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    a = T.epoch_permutation(3, 5, 100)
    assert np.array_equal(a, T.epoch_permutation(3, 5, 100))
    assert not np.array_equal(a, T.epoch_permutation(3, 6, 100))
    assert sorted(a) == list(range(100))


@pytest.mark.xla_level("fast")
def test_data_parallel_float_training_matches_one_device(mnist):
    """A float LeNet-5 with batch norm trained for 8 Adam steps on 1, 2 and 4 devices ends
    with the same parameters and batch statistics up to float32 rounding: the batch norms see
    the global batch, not each device's share (a per-device batch norm would move a running
    mean by the difference of the shares' means, ~10% of the leaf).

    Tolerance: each device count sums the batch reductions (batch-norm moments, loss,
    weight gradients, n = 32 images x up to 784 positions) in another order, which changes
    a sum of condition number k by about k * log2(n) * 2^-24 ~ k * 1e-6 relative; with k up
    to ~1e2 after a batch norm's centering, ~1e-4 per step. Adam divides each gradient by its
    own magnitude, so the few elements whose gradient is itself near rounding level may move
    by up to lr per step (one of 48000 did, by 1.7e-3 of its value): leaves are compared by
    norm, ||a - b|| <= 1e-4 ||a||. (Quantized training, qat/qavat, is not covered: rounding
    to 2-bit weights and 4-bit activations turns such differences into other steps.)
    """
    config = run_config(
        "fp", quant=QuantConfig(weight_bits=None, act_bits=None), eval=T.EvalConfig(),
        data=T.DataConfig("mnist", train_images=256, test_images=64),
        optim=T.OptimConfig(lr=3e-3, epochs=1, batch_size=32))
    train_ds, test_ds = (dataclasses.replace(ds, images=ds.images[:n], labels=ds.labels[:n])
                         for ds, n in zip(mnist, (256, 64), strict=True))
    states = {}
    for n in (1, 2, 4):
        res = T.train(config, train_data=train_ds, test_data=test_ds, num_devices=n,
                      progress=False)
        states[n] = jax.device_get((res.state.params, res.state.batch_stats))
    for n in (2, 4):
        flat = jax.tree_util.tree_flatten_with_path(states[1])[0]
        for (path, a), b in zip(flat, jax.tree.leaves(states[n]), strict=True):
            diff = float(np.linalg.norm(np.asarray(b) - a)) / float(np.linalg.norm(a))
            assert diff <= 1e-4, (n, jax.tree_util.keystr(path), diff)
