"""Self-tuning: exact recovery of injected gains, identity at sigma 0, BN re-estimation, errors."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pimjax import data, layers, selftune
from pimjax.models import get_model
from pimjax.variability import VariabilityModel, nominal_chip, sample_chips

KEY = jax.random.PRNGKey(0)
MATCHING = ("gain", "gain_offset", "channel", "paired")  # methods that target the nominal model
ALPHAS = (2.0, 0.5, 4.0, 0.25, 2.0)  # injected per-layer gains (powers of two: exact in float)


@pytest.fixture(scope="module")
def setup():
    """LeNet-5 W4A4 with BN statistics and activation clips set by one pass, and MNIST batches."""
    model = get_model("lenet5", quant="W4A4")
    train = data.load_dataset("mnist", "train", limit=128)
    x = data.normalize(train.images, "mnist")
    v = jax.jit(model.init)(KEY, x[:2])
    _, upd = jax.jit(partial(model.apply, train=True, mutable=["batch_stats"]))(v, x)
    v = {**v, **upd}
    test = data.load_dataset("mnist", "test", limit=96)
    xt = data.normalize(test.images, "mnist")
    calib, evals = xt[:64], xt[64:]
    stats = selftune.nominal_stats(model, v, calib, batch_size=32)
    return model, v, calib, evals, stats


apply_tuned = jax.jit(
    lambda v, c, t, x, model: model.apply(selftune.with_tune(layers.with_chip(v, c), t), x),
    static_argnames="model")


def scaled_chip(model, v, alphas):
    """The nominal chip with every cell of analog layer l multiplied by alphas[l]."""
    chip = nominal_chip(layers.analog_kernels(v))
    for layer, a in zip(selftune.analog_layers(model), alphas, strict=True):
        node = chip
        for name in layer.path:
            node = node[name]
        node["kernel"] = node["kernel"] * a
    return chip


def gains(tune):
    return jnp.concatenate([jnp.ravel(t["gain"]) for t in jax.tree_util.tree_leaves(
        tune, is_leaf=lambda t: isinstance(t, dict) and "gain" in t)])


def offsets(tune):
    return jnp.concatenate([jnp.ravel(t["offset"]) for t in jax.tree_util.tree_leaves(
        tune, is_leaf=lambda t: isinstance(t, dict) and "gain" in t)])


def test_analog_layers_and_bn_links(setup):
    model = setup[0]
    info = selftune.analog_layers(model)
    assert [layer.name for layer in info] == [
        "AnalogConv_0", "AnalogConv_1", "AnalogDense_0", "AnalogDense_1", "AnalogDense_2"]
    assert [layer.bn_path for layer in info] == [
        ("BatchNorm_0",), ("BatchNorm_1",), ("BatchNorm_2",), ("BatchNorm_3",), None]
    assert [layer.bias for layer in info] == [False] * 4 + [True]
    assert selftune.chip_mode(model) == "layers"
    resnet = selftune.analog_layers(get_model("resnet20", width=0.25))
    assert len(resnet) == 22 and all(layer.bn_path for layer in resnet[:-1])
    assert selftune.chip_mode(get_model("resnet20", width=0.25)) == "map"


@pytest.mark.parametrize("method,batch_size", [
    ("gain", None), ("gain_offset", None), ("channel", None), ("paired", None), ("channel", 16)])
def test_undoes_injected_layer_gains(setup, method, batch_size):
    """A nominal chip with a known gain per layer is restored exactly (logits and gains)."""
    model, v, calib, evals, stats = setup
    chip = scaled_chip(model, v, ALPHAS)
    nominal = apply_tuned(v, nominal_chip(layers.analog_kernels(v)), v["tune"], evals, model=model)
    broken = apply_tuned(v, chip, v["tune"], evals, model=model)
    assert float(jnp.max(jnp.abs(broken - nominal))) > 1.0
    result = selftune.self_tune(model, v, chip, calib, method, stats, batch_size=batch_size)
    for layer, a in zip(selftune.analog_layers(model), ALPHAS, strict=True):
        g = selftune._get(result.tune, layer.path)["gain"]
        np.testing.assert_allclose(g, 1.0 / a, rtol=1e-5)
    restored = apply_tuned(v, chip, result.tune, evals, model=model)
    np.testing.assert_allclose(restored, nominal, rtol=1e-4, atol=1e-4)
    assert result.cost.images == 64
    assert result.cost.passes == (1 if batch_size is None else 5)


@pytest.mark.parametrize("method", MATCHING)
def test_sigma_zero_changes_nothing(setup, method):
    model, v, calib, evals, stats = setup
    chip = nominal_chip(layers.analog_kernels(v))
    result = selftune.self_tune(model, v, chip, calib, method, stats)
    np.testing.assert_allclose(gains(result.tune), 1.0, atol=1e-5)
    np.testing.assert_allclose(offsets(result.tune), 0.0, atol=1e-4)
    before = apply_tuned(v, chip, v["tune"], evals, model=model)
    after = apply_tuned(v, chip, result.tune, evals, model=model)
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4)


def _tuned_moments(model, v, chip, tune, calib):
    """Per-channel mean/var of every analog layer's tuned MVM output on ``calib``."""
    _, state = model.apply(selftune.with_tune(layers.with_chip(v, chip), tune), calib,
                           mutable=["intermediates"])
    out = {}
    for layer in selftune.analog_layers(model):
        y = selftune._get(state["intermediates"], layer.path)["mvm"][0]
        y = y.reshape(-1, y.shape[-1])
        out[layer.name] = (jnp.mean(y, 0), jnp.var(y, 0))
    return out


@pytest.fixture(scope="module")
def random_chip(setup):
    model, v = setup[:2]
    vm = VariabilityModel(0.3, 0.2, between_granularity="layer")
    chips = sample_chips(KEY, vm, layers.analog_kernels(v), 1)
    return jax.tree_util.tree_map(lambda f: f[0], chips)


def test_channel_matches_nominal_statistics(setup, random_chip):
    """After 'channel' tuning, each layer's per-channel mean/std equal the stored nominal ones."""
    model, v, calib, _, stats = setup
    result = selftune.self_tune(model, v, random_chip, calib, "channel", stats)
    moments = jax.jit(_tuned_moments, static_argnames="model")(model, v, random_chip,
                                                               result.tune, calib)
    # stats came from all 64 calibration images in batches of 32: same data, other order
    for name, (mean, var) in moments.items():
        live = stats.var[name] > 1e-6
        np.testing.assert_allclose(mean[live], stats.mean[name][live], rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(var[live], stats.var[name][live], rtol=1e-3, atol=1e-4)


def test_bn_reestimation_normalizes_on_the_chip(setup, random_chip):
    """'bn' gives each batch norm the chip's own statistics: its inputs match its running stats."""
    model, v, calib, _, _ = setup
    result = selftune.self_tune(model, v, random_chip, calib, "bn")
    moments = jax.jit(_tuned_moments, static_argnames="model")(model, v, random_chip,
                                                               result.tune, calib)
    for layer in selftune.analog_layers(model):
        mean, var = moments[layer.name]
        if layer.bn_path is None:  # nothing to re-estimate: identity
            np.testing.assert_array_equal(selftune._get(result.tune, layer.path)["gain"], 1.0)
            continue
        bn = selftune._get(v["batch_stats"], layer.bn_path)
        eps = layer.bn_epsilon
        np.testing.assert_allclose(mean, bn["mean"], rtol=1e-3, atol=1e-3)
        # (z - mu') / sqrt(v' + eps) * sqrt(var + eps): var of the tuned z = (var+eps) v'/(v'+eps)
        np.testing.assert_allclose(var + eps * (var / (bn["var"] + eps)), bn["var"],
                                   rtol=2e-3, atol=1e-4)


def test_single_pass_equals_batched_passes(setup, random_chip):
    model, v, calib, _, stats = setup
    one = selftune.self_tune(model, v, random_chip, calib, "channel", stats)
    many = selftune.self_tune(model, v, random_chip, calib, "channel", stats, batch_size=16)
    assert (one.cost.passes, many.cost.passes) == (1, 5)
    assert (one.cost.batches, many.cost.batches) == (1, 4)
    np.testing.assert_allclose(gains(one.tune), gains(many.tune), rtol=1e-4)
    np.testing.assert_allclose(offsets(one.tune), offsets(many.tune), rtol=1e-4, atol=1e-4)


def test_vmap_over_chips_equals_chip_batch(setup):
    """vmap of the one-chip solve, and the chip-batch solve in both modes, agree."""
    model, v, calib, _, stats = setup
    chips = sample_chips(KEY, VariabilityModel(0.2, 0.1), layers.analog_kernels(v), 2)
    batch = selftune.self_tune(model, v, chips, calib[:32], "gain_offset", stats)
    mapped = selftune.self_tune(model, v, chips, calib[:32], "gain_offset", stats, mode="map")
    vmapped = jax.vmap(
        lambda c: selftune.self_tune(model, v, c, calib[:32], "gain_offset", stats).tune)(chips)
    assert gains(batch.tune).shape == (2 * (6 + 16 + 120 + 84 + 10),)
    np.testing.assert_allclose(gains(mapped.tune), gains(batch.tune), rtol=1e-4)
    np.testing.assert_allclose(gains(vmapped), gains(batch.tune), rtol=1e-4)
    np.testing.assert_allclose(offsets(vmapped), offsets(batch.tune), rtol=1e-4, atol=1e-4)


def test_stats_save_load_roundtrip(setup, tmp_path):
    model, _, _, _, stats = setup
    path = selftune.save_stats(tmp_path / "run" / "nominal_stats.npz", stats)
    loaded = selftune.load_stats(path)
    assert loaded.num_images == 64
    selftune.check_stats(model, loaded)
    for name in stats.mean:
        np.testing.assert_array_equal(loaded.mean[name], stats.mean[name])
        np.testing.assert_array_equal(loaded.var[name], stats.var[name])


def test_cost_report(setup):
    model = setup[0]
    cost = selftune.tune_cost(model, "paired", 1000, batch_size=256)
    assert (cost.images, cost.batches, cost.passes, cost.nominal_passes) == (1000, 4, 5, 5)
    assert "1000 unlabeled images" in str(cost)
    assert selftune.tune_cost(model, "bn", 64).passes == 1


def test_bad_inputs(setup):
    model, v, calib, _, stats = setup
    chip = nominal_chip(layers.analog_kernels(v))
    with pytest.raises(ValueError, match="method"):
        selftune.self_tune(model, v, chip, calib, "magic", stats)
    with pytest.raises(ValueError, match="needs the nominal stats"):
        selftune.self_tune(model, v, chip, calib, "channel")
    with pytest.raises(ValueError, match="empty"):
        selftune.self_tune(model, v, chip, calib[:0], "bn")
    with pytest.raises(ValueError, match="28, 28, 1"):
        selftune.self_tune(model, v, chip, calib[:, :20], "bn")
    with pytest.raises(ValueError, match="batch_size"):
        selftune.self_tune(model, v, chip, calib, "bn", batch_size=0)
    other = get_model("lenet5", quant="W4A4", width=0.5)
    with pytest.raises(ValueError, match="another model"):
        selftune.check_stats(other, stats)
    with pytest.raises(ValueError, match="method"):
        selftune.SelfTune("magic", calib).check(model)
