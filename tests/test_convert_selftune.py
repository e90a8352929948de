"""Self-tuning of converted models (pimjax.analog.convert): every variant that applies works on
the converted CNN (BatchNorm) and ViT (LayerNorm only, attention projections whose
DenseGeneral kernels [D, heads, head_dim] tune heads * head_dim channels); in the sweep it
equals tuning each chip alone, on chips with a per-layer between-chip gain it brings each
layer's output moments back to the nominal ones, and 'bn' on the ViT fails with one line.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import HASH_DEVICE, calibrate, chip_index
from test_convert import CNN, SHAPE, W4A4, ViT

from pimjax import analog, devices, introspect, montecarlo, selftune
from pimjax.layers import with_chip, with_tune

KEY = jax.random.PRNGKey(5)
N_IMAGES = 64  # montecarlo.MIN_IMAGES_PER_CHUNK: one image chunk
N_CALIB = 128
ONE = jax.local_devices()[:1]
VARIANTS = {"cnn": selftune.TUNE_VARIANTS,
            "vit": tuple(v for v in selftune.TUNE_VARIANTS if v != "bn")}  # no BatchNorm
CASES = [(m, v) for m in ("cnn", "vit") for v in VARIANTS[m]]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.standard_normal((N_IMAGES + 2 * N_CALIB, *SHAPE)), jnp.float32)
    labels = np.asarray(rng.integers(0, 10, N_IMAGES), np.int32)
    return images[:N_IMAGES], labels, images[N_IMAGES:N_IMAGES + N_CALIB], \
        images[N_IMAGES + N_CALIB:]


@pytest.fixture(scope="module")
def models(data):
    """The converted CNN and ViT at W4A4, calibrated, with their nominal stats."""
    x, _, calib, _ = data
    out = {}
    for name, cls in (("cnn", CNN), ("vit", ViT)):
        model = analog.convert(cls(), SHAPE, quant=W4A4, num_classes=10)
        variables = calibrate(model, model.init(jax.random.PRNGKey(0), x), x)
        out[name] = model, variables, selftune.nominal_stats(model, variables, calib)
    return out


def test_layer_widths_are_the_tuned_channels(models):
    """A DenseGeneral attention projection tunes heads * head_dim channels, not head_dim."""
    model, variables, stats = models["vit"]
    layers = {layer.name: layer for layer in introspect.analog_layers(model)}
    query = layers["Block_0/MultiHeadDotProductAttention_0/query"]
    assert query.features == 8  # kernel [8, 2 heads, 4]
    assert stats.mean[query.name].shape == (8,)
    for layer in layers.values():
        node = variables["tune"]
        for name in layer.path:
            node = node[name]
        assert node["gain"].shape == (layer.features,)
    selftune.check_stats(model, stats)  # raised 'stats belong to another model' before


@pytest.mark.parametrize("name,variant", CASES)
def test_sweep_with_self_tuning_equals_tuning_each_chip(models, data, name, variant):
    """evaluate_chips with tuning (chip batches of 2, 3 chips) equals self_tune on each chip
    alone followed by the plain model; the tuning changes the chips' outputs."""
    model, variables, stats = models[name]
    x, y, calib, _ = data
    calib = calib[:32]
    tuning = selftune.SelfTune(variant, calib, stats if variant in selftune.NEEDS_STATS
                               else None)
    res = montecarlo.evaluate_chips(model, variables, HASH_DEVICE, KEY, 3, (x, y),
                                    tuning=tuning, chips_per_chunk=2, mesh_devices=ONE,
                                    nominal=False, progress=False)
    template = introspect.analog_kernels(variables)
    keys = devices.chip_keys(KEY, 3)
    chips = jax.vmap(lambda k: devices.sample_chip(k, HASH_DEVICE, template))(keys)
    batch = selftune.self_tune(model, variables, chips, calib, variant, tuning.stats,
                               mode="layers").tune
    apply = jax.jit(model.apply)
    tuned, untuned = [], []
    for i in range(3):
        chip = chip_index(chips, i)
        one = selftune.self_tune(model, variables, chip, calib, variant, tuning.stats).tune
        for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(chip_index(batch, i)),
                        strict=True):  # a chip batch on the chip axis: the same solve
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        tuned.append(apply(with_tune(with_chip(variables, chip), one), x))
        untuned.append(apply(with_chip(variables, chip), x))
    tuned, untuned = np.stack(tuned), np.stack(untuned)
    np.testing.assert_allclose(res.accuracy, (tuned.argmax(-1) == y).mean(-1),
                               atol=1.01 / N_IMAGES)
    logp = jax.nn.log_softmax(jnp.asarray(tuned, jnp.float32))
    loss = -np.take_along_axis(np.asarray(logp), y[None, :, None], -1)[..., 0].mean(-1)
    np.testing.assert_allclose(res.loss, loss, rtol=1e-3)
    assert not np.allclose(tuned, untuned, atol=1e-3)  # the tuning did something


def _layer_moments(model, variables, chip, tune, images):
    """Every analog layer's tuned MVM output ``g * mvm + o`` (earlier layers tuned too):
    per-channel mean and variance over images and positions."""
    v = with_tune(with_chip(variables, chip), tune)
    mvm = jax.jit(introspect.capture_mvm, static_argnums=0)(model, v, images)
    out = {}
    for layer in introspect.analog_layers(model):
        node = tune
        for p in layer.path:
            node = node[p]
        y = mvm[layer.name]
        y = np.asarray(y, np.float64).reshape(-1, layer.features)
        y = y * np.asarray(node["gain"]) + np.asarray(node["offset"])
        out[layer.name] = (y.mean(0), y.var(0))
    return out


@pytest.mark.parametrize("name", ["cnn", "vit"])
def test_tuning_undoes_a_between_chip_layer_gain(models, data, name):
    """Chips of the paper's device with a per-layer gain (sigma 0.3): on held-out images
    each tuned layer's output spread is the nominal one (within the sampling error of
    N_CALIB calibration images), while untuned, the compounded gains are far off; 'channel'
    matches every channel's mean and variance on the calibration images themselves."""
    model, variables, stats = models[name]
    _, _, calib, held = data
    template = introspect.analog_kernels(variables)
    device = devices.paper(0.02, 0.3, "layer")
    chip = jax.jit(devices.sample_chip, static_argnums=1)(jax.random.PRNGKey(2), device,
                                                          template)
    identity = selftune.identity_tune(model)
    nominal = _layer_moments(model, variables, None, identity, held)
    before = _layer_moments(model, variables, chip, identity, held)
    # a std estimated from n independent samples has a relative error ~ 1 / sqrt(2 n); with
    # the N_CALIB images as the (conservative) sample count, 3 such errors
    tol = 3.0 / np.sqrt(2 * N_CALIB)

    def log_ratio(m, layer):
        return 0.5 * np.log(m[layer][1].mean() / nominal[layer][1].mean())

    worst = max(abs(log_ratio(before, k)) for k in nominal)
    assert worst > tol  # the chip's layer gains are visible
    for variant in VARIANTS[name]:
        if variant == "bn":
            continue  # checked below, against the batch norm's running statistics
        tune = selftune.self_tune(model, variables, chip, calib, variant, stats).tune
        after = _layer_moments(model, variables, chip, tune, held)
        for layer in nominal:
            assert abs(log_ratio(after, layer)) < tol, (variant, layer, log_ratio(after, layer))
        if variant == "channel":
            exact = _layer_moments(model, variables, chip, tune, calib)
            for layer in nominal:
                np.testing.assert_allclose(exact[layer][0], stats.mean[layer], rtol=1e-3,
                                           atol=1e-3 * np.sqrt(stats.var[layer].max()))
                np.testing.assert_allclose(exact[layer][1], stats.var[layer], rtol=1e-3,
                                           atol=1e-6)
    if name == "cnn":  # bn: the batch norm after Conv_0 sees its running mean/var
        tune = selftune.self_tune(model, variables, chip, calib, "bn").tune
        got = _layer_moments(model, variables, chip, tune, calib)["Conv_0"]
        bn = variables["batch_stats"]["BatchNorm_0"]
        bias = np.asarray(variables["params"]["Conv_0"]["bias"])
        eps = introspect.analog_layers(model)[0].bn_epsilon
        np.testing.assert_allclose(got[0] + bias, bn["mean"], rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(got[1] + eps * got[1] / (bn["var"] + eps), bn["var"],
                                   rtol=1e-3, atol=1e-5)
        later = tune["Dense_0"]
        np.testing.assert_array_equal(later["gain"], 1.0)  # no batch norm reads it


def test_bn_on_a_model_without_batch_norm_is_one_line_before_any_compile(models, data,
                                                                         caplog):
    model, variables, stats = models["vit"]
    x, y, calib, _ = data
    chip = devices.sample_chip(KEY, devices.ideal(), introspect.analog_kernels(variables))
    with jax.log_compiles(), caplog.at_level(logging.DEBUG):
        caplog.clear()
        with pytest.raises(ValueError) as e:
            selftune.self_tune(model, variables, chip, calib, "bn")
        msg = str(e.value)
        assert msg.startswith("tune='bn' cannot apply to ViT: no batch norm") and "\n" not in msg
        with pytest.raises(ValueError, match=r"^tune='bn' cannot apply to ViT"):
            montecarlo.evaluate_chips(model, variables, HASH_DEVICE, KEY, 2, (x, y),
                                      tuning=selftune.SelfTune("bn", calib), progress=False)
        compiled = {m.split("(")[1].split(")")[0] for m in (r.getMessage() for r in caplog.records)
                    if m.startswith("Compiling jit(")}
        assert compiled <= {"isfinite", "_reduce_all"}, compiled  # only the input checks
