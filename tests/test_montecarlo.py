"""Monte-Carlo chip sweeps: fast per-chip layers, chunk/device invariance, summaries, errors."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pimjax import data, layers, montecarlo, ops, perchip, selftune
from pimjax.models import get_model
from pimjax.variability import VariabilityModel, sample_chips

KEY = jax.random.PRNGKey(0)
VM = VariabilityModel(sigma_within=0.3, sigma_between=0.1, between_granularity="column")


def calibrated(name, quant, n=64, **kwargs):
    """A freshly initialised model whose BN statistics and activation clips are set by one pass."""
    model = get_model(name, quant=quant, **kwargs)
    if name == "lenet5":
        ds = data.load_dataset("mnist", "train", limit=n)
        x = data.normalize(ds.images, "mnist")
    else:
        x = jax.random.normal(KEY, (n, *model.input_shape))
    v = jax.jit(model.init)(KEY, x[:2])
    _, upd = jax.jit(partial(model.apply, train=True, mutable=["batch_stats"]))(v, x)
    return model, {**v, **upd}


@pytest.fixture(scope="module")
def lenet():
    return calibrated("lenet5", "W4A4")


@pytest.fixture(scope="module")
def mnist():
    ds = data.load_dataset("mnist", "test", limit=96)
    return data.normalize(ds.images, "mnist"), ds.labels


fast_logits = jax.jit(montecarlo.chip_logits, static_argnames=("model", "mode"))
apply_chip = jax.jit(lambda v, c, x, model: model.apply(layers.with_chip(v, c), x),
                     static_argnames="model")


def per_chip_loop(model, variables, chips, x, tune=None):
    apply = partial(apply_chip, model=model)
    out = []
    for i in range(jax.tree_util.tree_leaves(chips)[0].shape[0]):
        v = variables
        if tune is not None:
            v = selftune.with_tune(v, jax.tree_util.tree_map(lambda t, i=i: t[i], tune))
        out.append(apply(v, jax.tree_util.tree_map(lambda c, i=i: c[i], chips), x))
    return jnp.stack(out)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("strides,padding", [((1, 1), "SAME"), ((2, 2), "SAME"), ((1, 1), "VALID")])
def test_perchip_conv_matches_plain(shared, strides, padding):
    k1, k2 = jax.random.split(KEY)
    w = jax.random.normal(k1, (3, 3, 3, 4, 5))
    x = jax.random.normal(k2, (2, 7, 7, 4) if shared else (3, 2, 7, 7, 4))
    y = perchip.conv2d(x, w, strides, padding)
    for c in range(3):
        ref = ops.conv2d(x if shared else x[c], w[c], strides, padding)
        np.testing.assert_allclose(y[c], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shared", [True, False])
def test_perchip_dense_matches_plain(shared):
    k1, k2 = jax.random.split(KEY)
    w = jax.random.normal(k1, (3, 6, 4))
    x = jax.random.normal(k2, (5, 6) if shared else (3, 5, 6))
    y = perchip.dense(x, w)
    for c in range(3):
        np.testing.assert_allclose(y[c], (x if shared else x[c]) @ w[c], rtol=1e-5, atol=1e-5)


def test_perchip_rejects_mismatched_chips():
    with pytest.raises(ValueError, match="chips"):
        perchip.dense(jnp.ones((2, 5, 6)), jnp.ones((3, 6, 4)))


@pytest.mark.parametrize("name,kwargs,modes", [
    ("lenet5", {}, ("layers", "map")),
    ("lenet5", {"digital_first_last": True}, ("layers",)),
    ("resnet20", {"width": 0.25}, ("layers", "map")),
])
def test_chip_batch_equals_per_chip_apply(name, kwargs, modes):
    """The explicit chip axis (fast path) gives each chip's plain forward within float rounding."""
    model, v = calibrated(name, "fp", n=8, **kwargs)
    x = jax.random.normal(jax.random.PRNGKey(3), (4, *model.input_shape))
    chips = sample_chips(KEY, VM, layers.analog_kernels(v), 3)
    fast = jax.jit(lambda v, c, x: [montecarlo.chip_logits(model, v, c, x, mode=m)
                                    for m in modes])(v, chips, x)
    ref = per_chip_loop(model, v, chips, x)
    assert ref.shape == (3, 4, 10)
    for out in fast:
        np.testing.assert_allclose(out, ref, rtol=2e-4, atol=2e-4)
    if len(modes) == 2:
        np.testing.assert_array_equal(fast[0], fast[1])  # both modes: the same operations
    if name == "lenet5" and not kwargs:
        # K-chip training vmaps the plain layers over chips: that path still works and agrees
        vm = jax.jit(jax.vmap(lambda c, x: model.apply(layers.with_chip(v, c), x), (0, None)))
        np.testing.assert_allclose(vm(chips, x), ref, rtol=2e-4, atol=2e-4)


def test_chip_batch_with_per_chip_tune(lenet):
    model, v = lenet
    x = jax.random.normal(jax.random.PRNGKey(4), (4, *model.input_shape))
    chips = sample_chips(KEY, VM, layers.analog_kernels(v), 2)
    tune = jax.tree_util.tree_map(
        lambda t: 1.0 + 0.1 * jax.random.normal(KEY, (2, *t.shape)), v["tune"])
    fast = fast_logits(model, v, chips, x, tune)
    ref = per_chip_loop(model, v, chips, x, tune)
    # quantized activations: compare decisions and the bulk of the logits
    assert float(jnp.mean(jnp.argmax(fast, -1) == jnp.argmax(ref, -1))) == 1.0
    assert float(jnp.mean(jnp.abs(fast - ref) < 1e-3)) > 0.95


@pytest.fixture(scope="module")
def sweep_reference(lenet, mnist):
    model, v = lenet
    return montecarlo.evaluate_chips(model, v, VM, KEY, 10, mnist, chips_per_chunk=4,
                                     images_per_chunk=96, devices=jax.devices()[:1],
                                     progress=False)


def test_sweep_equals_sequential_loop(lenet, mnist, sweep_reference):
    model, v = lenet
    loop = montecarlo.evaluate_loop(model, v, VM, KEY, 10, mnist, batch_size=96)
    np.testing.assert_array_equal(sweep_reference.accuracy, loop)
    assert sweep_reference.accuracy.shape == sweep_reference.loss.shape == (10,)
    assert sweep_reference.nominal_accuracy is not None


@pytest.mark.parametrize("chips,images,ndev", [(8, 32, 4), (2, 64, 2)])
def test_chunk_and_device_invariance(lenet, mnist, sweep_reference, chips, images, ndev):
    """Chip i's result does not depend on the chunking or on the number of devices."""
    assert len(jax.devices()) >= 4, "conftest provides 4 host devices"
    model, v = lenet
    r = montecarlo.evaluate_chips(model, v, VM, KEY, 10, mnist, chips_per_chunk=chips,
                                  images_per_chunk=images, devices=jax.devices()[:ndev],
                                  nominal=False, progress=False)
    assert r.plan.chips % ndev == 0
    np.testing.assert_array_equal(r.accuracy, sweep_reference.accuracy)
    np.testing.assert_allclose(r.loss, sweep_reference.loss, rtol=1e-5)


def test_sweep_with_tuning_matches_manual(lenet, mnist):
    model, v = lenet
    x, y = mnist
    tuning = selftune.SelfTune("paired", x[:32])
    one = jax.devices()[:1]
    tuned = montecarlo.tune_chips(model, v, VM, KEY, 2, tuning, devices=one)
    assert tuned.cost.passes == 1 and tuned.cost.images == 32 and tuned.cost.nominal_passes == 1
    r = montecarlo.evaluate_chips(model, v, VM, KEY, 2, (x[:64], y[:64]), tuning=tuning,
                                  devices=one, nominal=False, progress=False)
    assert r.tune_cost == tuned.cost
    chips = sample_chips(KEY, VM, layers.analog_kernels(v), 2)
    logits = fast_logits(model, v, chips, x[:64], tuned.tune)
    acc = np.asarray(jnp.mean(jnp.argmax(logits, -1) == y[:64], axis=-1))
    np.testing.assert_allclose(r.accuracy, acc, atol=1.5 / 64)


def test_summary_statistics():
    acc = np.linspace(0.5, 0.99, 100)
    s = montecarlo.summarize(acc, nominal_accuracy=0.99, thresholds=(0.9,), drops=(0.05,))
    assert s["chips"] == 100
    assert s["mean"] == pytest.approx(acc.mean())
    assert s["std"] == pytest.approx(acc.std(ddof=1))
    assert s["min"] == pytest.approx(0.5)
    assert s["p5"] == pytest.approx(np.percentile(acc, 5))
    assert s["p50"] == pytest.approx(np.median(acc))
    assert s["yield@0.9"] == pytest.approx(np.mean(acc >= 0.9))
    assert s["yield@nominal-0.05"] == pytest.approx(np.mean(acc >= 0.94 - 1e-12))
    assert s["drop_mean"] == pytest.approx(0.99 - acc.mean())
    with pytest.raises(ValueError, match="empty"):
        montecarlo.summarize([])


def test_plan_chunks_respects_budget(lenet):
    model, _ = lenet
    per_ci, per_c, per_i = montecarlo.memory_per_chip(model)
    budget = 40 * (per_c + 100 * per_ci) + 100 * per_i
    plan = montecarlo.plan_chunks(model, 1000, 100, num_devices=4, budget_bytes=budget)
    assert plan.chips % 4 == 0 and plan.images == 100
    assert plan.estimated_bytes <= budget
    assert plan.chips * plan.num_chip_chunks >= 1000
    assert plan.chips * (plan.num_chip_chunks - 1) < 1000  # no empty chunk
    plan = montecarlo.plan_chunks(model, 10, 1000, chips_per_chunk=3, images_per_chunk=300)
    assert (plan.chips, plan.num_chip_chunks) == (3, 4)
    assert (plan.images, plan.num_image_chunks) == (250, 4)  # balanced: 4 chunks of 250


@pytest.mark.parametrize("n", [0, -3, 2.5, True])
def test_bad_num_chips(lenet, mnist, n):
    model, v = lenet
    with pytest.raises(ValueError, match="num_chips"):
        montecarlo.evaluate_chips(model, v, VM, KEY, n, mnist, progress=False)


def test_empty_dataset(lenet, mnist):
    model, v = lenet
    x, y = mnist
    with pytest.raises(ValueError, match="empty"):
        montecarlo.evaluate_chips(model, v, VM, KEY, 4, (x[:0], y[:0]), progress=False)


def test_bad_dataset(lenet, mnist):
    model, v = lenet
    x, y = mnist
    with pytest.raises(ValueError, match="28, 28, 1"):
        montecarlo.evaluate_chips(model, v, VM, KEY, 4, (x[:, :20], y), progress=False)
    with pytest.raises(ValueError, match="float"):
        montecarlo.evaluate_chips(model, v, VM, KEY, 4, (np.zeros((4, 28, 28, 1), np.uint8),
                                                          y[:4]), progress=False)
    with pytest.raises(ValueError, match="labels"):
        montecarlo.evaluate_chips(model, v, VM, KEY, 4, (x, y[:5]), progress=False)


def test_mismatched_variables(lenet, mnist):
    model, v = lenet
    other = get_model("lenet5", quant="W4A4", width=0.5)
    with pytest.raises(ValueError, match="do not match"):
        montecarlo.evaluate_chips(other, v, VM, KEY, 4, mnist, progress=False)
    with pytest.raises(ValueError, match="do not match"):
        montecarlo.check_variables(get_model("lenet5", num_classes=12), v)


def test_bad_variability_and_chunks(lenet, mnist):
    model, v = lenet
    with pytest.raises(ValueError, match="VariabilityModel"):
        montecarlo.evaluate_chips(model, v, 0.3, KEY, 4, mnist, progress=False)
    with pytest.raises(ValueError, match="chips_per_chunk"):
        montecarlo.evaluate_chips(model, v, VM, KEY, 4, mnist, chips_per_chunk=0, progress=False)


def test_experiment_rejects_mismatched_checkpoint(lenet, monkeypatch, tmp_path):
    """experiments/montecarlo.py stops with a clear message when a checkpoint's model differs."""
    import importlib.util
    from pathlib import Path
    from types import SimpleNamespace

    import pimjax.checkpoint

    _, v = lenet
    wrong = get_model("lenet5", quant="W4A4", width=0.5)
    config = SimpleNamespace(dataset="mnist", data_dir=None, model="lenet5", quant="W4A4",
                             method="qat")
    monkeypatch.setattr(pimjax.checkpoint, "load_model", lambda path: (wrong, v, config))
    path = Path(__file__).resolve().parents[1] / "experiments" / "montecarlo.py"
    spec = importlib.util.spec_from_file_location("mc_experiment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit, match="do not match"):
        module.main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "out")])
