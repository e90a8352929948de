"""Self-tuning: exact recovery of injected layer gains, identity on the nominal chip, each
variant's statistics matched on a random chip, BN re-estimation, batching, chip batches,
stored statistics, cost, errors. On the session's trained qat LeNet-5 (W2A4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import factor_chip, numpy_chips

from pimjax import data, devices, introspect, selftune
from pimjax.devices import sample_chip
from pimjax.layers import with_chip, with_tune
from pimjax.models import get_model

# No test here claims bit-identity across programs: compile at the "fast" XLA level
# (most optimizations off, see conftest.py).
pytestmark = pytest.mark.xla_level("fast")

KEY = jax.random.PRNGKey(0)
MATCHING = ("gain", "gain_offset", "channel", "paired")  # variants that target the nominal model
ALPHAS = (2.0, 0.5, 4.0, 0.25, 2.0)  # injected per-layer gains (powers of two: exact in float)


@pytest.fixture(scope="module")
def setup(trained, mnist):
    """The trained qat model, 64 calibration and 32 evaluation test images, nominal stats."""
    run = trained["qat"]
    images = data.normalize(mnist[1].images[:96], "mnist")
    calib, evals = images[:64], images[64:]
    stats = selftune.nominal_stats(run.model, run.variables, calib, batch_size=32)
    return run.model, run.variables, calib, evals, stats


apply_tuned = jax.jit(lambda v, c, t, x, model: model.apply(with_tune(with_chip(v, c), t), x),
                      static_argnames="model")


def scaled_chip(variables, alphas):
    """A chip whose analog layer l computes with alphas[l] times the quantized weights."""
    return factor_chip(introspect.analog_kernels(variables), alphas)


def layer_tune(tune, layer):
    node = tune
    for name in layer.path:
        node = node[name]
    return node


def gains(model, tune):
    return jnp.concatenate([jnp.ravel(layer_tune(tune, layer)["gain"])
                            for layer in introspect.analog_layers(model)])


def offsets(model, tune):
    return jnp.concatenate([jnp.ravel(layer_tune(tune, layer)["offset"])
                            for layer in introspect.analog_layers(model)])


@pytest.mark.parametrize("variant,batch_size", [
    ("gain", None), ("gain_offset", None), ("channel", None), ("paired", None), ("channel", 16)])
def test_undoes_injected_layer_gains(setup, variant, batch_size):
    """A chip that scales each layer by a known power of two is restored: gains 1 / alpha,
    offsets 0, and the nominal logits."""
    model, v, calib, evals, stats = setup
    chip = scaled_chip(v, ALPHAS)
    nominal = jax.jit(model.apply)(v, evals)
    broken = apply_tuned(v, chip, v["tune"], evals, model=model)
    assert float(jnp.max(jnp.abs(broken - nominal))) > 1.0
    result = selftune.self_tune(model, v, chip, calib, variant, stats, batch_size=batch_size)
    for layer, a in zip(introspect.analog_layers(model), ALPHAS, strict=True):
        np.testing.assert_allclose(layer_tune(result.tune, layer)["gain"], 1.0 / a, rtol=1e-5)
    np.testing.assert_allclose(offsets(model, result.tune), 0.0, atol=1e-4)
    restored = apply_tuned(v, chip, result.tune, evals, model=model)
    np.testing.assert_allclose(restored, nominal, rtol=1e-4, atol=1e-4)
    assert result.cost.images == 64
    assert result.cost.passes == (1 if batch_size is None else 5)


@pytest.mark.parametrize("variant", MATCHING + ("bn",))
def test_nominal_chip_changes_nothing(setup, variant):
    """On a chip whose factors are all one the matching variants solve the identity; bn
    re-estimates statistics equal to the stored running ones only up to the calibration
    sample, so it is only required to stay finite."""
    model, v, calib, evals, stats = setup
    chip = scaled_chip(v, (1.0,) * len(ALPHAS))
    result = selftune.self_tune(model, v, chip, calib, variant, stats)
    if variant == "bn":
        assert np.all(np.isfinite(gains(model, result.tune)))
        return
    np.testing.assert_allclose(gains(model, result.tune), 1.0, atol=1e-5)
    np.testing.assert_allclose(offsets(model, result.tune), 0.0, atol=1e-4)
    before = jax.jit(model.apply)(v, evals)
    after = apply_tuned(v, chip, result.tune, evals, model=model)
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4)


def _tuned_moments(model, v, chip, tune, calib):
    """Per-channel mean/var of every analog layer's tuned MVM output (g * mvm + o)."""
    mvm = introspect.capture_mvm(model, with_tune(with_chip(v, chip), tune), calib)
    out = {}
    for layer in introspect.analog_layers(model):
        t = layer_tune(tune, layer)
        y = (mvm[layer.name] * t["gain"] + t["offset"]).reshape(-1, layer.features)
        out[layer.name] = (jnp.mean(y, 0), jnp.var(y, 0))
    return out


tuned_moments = jax.jit(_tuned_moments, static_argnames="model")


@pytest.fixture(scope="module")
def random_chip(setup):
    return numpy_chips(introspect.analog_kernels(setup[1]), sigma=0.3, seed=1)


def test_channel_matches_nominal_statistics(setup, random_chip):
    """After 'channel' tuning, each layer's per-channel mean/std equal the stored nominal ones."""
    model, v, calib, _, stats = setup
    result = selftune.self_tune(model, v, random_chip, calib, "channel", stats)
    moments = tuned_moments(model, v, random_chip, result.tune, calib)
    # stats came from all 64 calibration images in batches of 32: same data, other order
    for name, (mean, var) in moments.items():
        live = stats.var[name] > 1e-6
        assert live.mean() > 0.5
        np.testing.assert_allclose(mean[live], stats.mean[name][live], rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(var[live], stats.var[name][live], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("variant", ["gain", "gain_offset"])
def test_layer_variants_match_layer_statistics(setup, random_chip, variant):
    """'gain' matches each layer's overall std (over channels and positions), 'gain_offset'
    its overall mean too; one gain per layer."""
    model, v, calib, _, stats = setup
    result = selftune.self_tune(model, v, random_chip, calib, variant, stats)
    moments = tuned_moments(model, v, random_chip, result.tune, calib)
    for layer in introspect.analog_layers(model):
        g = layer_tune(result.tune, layer)["gain"]
        np.testing.assert_array_equal(g, g[0])  # one value per layer
        mean, var = moments[layer.name]
        t_mean, t_var = stats.mean[layer.name], stats.var[layer.name]
        # overall variance = mean of the channel variances + variance of the channel means
        total = lambda m, s: float(jnp.mean(s) + jnp.var(m))  # noqa: E731
        assert total(mean, var) == pytest.approx(total(t_mean, t_var), rel=1e-3)
        if variant == "gain_offset":
            assert float(jnp.mean(mean)) == pytest.approx(float(jnp.mean(t_mean)), abs=1e-3)


def test_paired_fits_the_nominal_activations(setup, random_chip):
    """'paired' is per-channel least squares of the nominal MVM outputs on the chip's
    (earlier layers tuned), recomputed here with NumPy's lstsq for the first layer."""
    model, v, calib, _, _ = setup
    result = selftune.self_tune(model, v, random_chip, calib, "paired")
    first = introspect.analog_layers(model)[0]
    y_chip = np.asarray(introspect.run_to_layer(model, with_chip(v, random_chip), calib,
                                                first.path), np.float64)
    y_nom = np.asarray(introspect.run_to_layer(model, v, calib, first.path), np.float64)
    t = layer_tune(result.tune, first)
    for c in range(first.features):
        a = np.stack([y_chip[..., c].ravel(), np.ones(y_chip[..., c].size)], 1)
        (g, o), *_ = np.linalg.lstsq(a, y_nom[..., c].ravel(), rcond=None)
        assert float(t["gain"][c]) == pytest.approx(g, rel=1e-3)
        assert float(t["offset"][c]) == pytest.approx(o, abs=1e-3)


def test_bn_reestimation_normalizes_on_the_chip(setup, random_chip):
    """'bn' gives each batch norm the chip's own statistics: its inputs match its running stats."""
    model, v, calib, _, _ = setup
    result = selftune.self_tune(model, v, random_chip, calib, "bn")
    moments = tuned_moments(model, v, random_chip, result.tune, calib)
    for layer in introspect.analog_layers(model):
        mean, var = moments[layer.name]
        if layer.bn_path is None:  # nothing to re-estimate: identity
            np.testing.assert_array_equal(layer_tune(result.tune, layer)["gain"], 1.0)
            continue
        bn = v["batch_stats"]
        for name in layer.bn_path:
            bn = bn[name]
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
    np.testing.assert_allclose(gains(model, one.tune), gains(model, many.tune), rtol=1e-4)
    np.testing.assert_allclose(offsets(model, one.tune), offsets(model, many.tune), rtol=1e-4,
                               atol=1e-4)


def test_chip_batch_equals_vmap_of_single_chips(setup):
    """A chip batch tuned at once (both chip modes) equals jax.vmap of the one-chip solve."""
    model, v, calib, _, stats = setup
    chips = numpy_chips(introspect.analog_kernels(v), 2, sigma=0.2, seed=2)
    batch = selftune.self_tune(model, v, chips, calib[:32], "gain_offset", stats)
    mapped = selftune.self_tune(model, v, chips, calib[:32], "gain_offset", stats, mode="map")
    vmapped = jax.vmap(
        lambda c: selftune.self_tune(model, v, c, calib[:32], "gain_offset", stats).tune)(chips)
    assert gains(model, batch.tune).shape == (2 * (6 + 16 + 120 + 84 + 10),)
    np.testing.assert_allclose(gains(model, mapped.tune), gains(model, batch.tune), rtol=1e-4)
    np.testing.assert_allclose(gains(model, vmapped), gains(model, batch.tune), rtol=1e-4)
    np.testing.assert_allclose(offsets(model, vmapped), offsets(model, batch.tune), rtol=1e-4,
                               atol=1e-4)
    assert not np.allclose(layer_tune(batch.tune, introspect.analog_layers(model)[0])["gain"][0],
                           layer_tune(batch.tune, introspect.analog_layers(model)[0])["gain"][1])


def test_stats_save_load_roundtrip(setup, tmp_path):
    model, _, _, _, stats = setup
    assert stats.num_images == 64
    path = selftune.save_stats(tmp_path / "run" / "nominal_stats.npz", stats)
    loaded = selftune.load_stats(path)
    assert loaded.num_images == 64
    selftune.check_stats(model, loaded)
    for name in stats.mean:
        np.testing.assert_array_equal(loaded.mean[name], stats.mean[name])
        np.testing.assert_array_equal(loaded.var[name], stats.var[name])


def test_nominal_stats_are_the_moments_of_the_mvm_outputs(setup):
    model, v, calib, _, stats = setup
    mvm = jax.jit(introspect.capture_mvm, static_argnames="model")(model, v, calib)
    for layer in introspect.analog_layers(model):
        y = np.asarray(mvm[layer.name], np.float64).reshape(-1, layer.features)
        np.testing.assert_allclose(stats.mean[layer.name], y.mean(0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(stats.var[layer.name], y.var(0), rtol=1e-3, atol=1e-6)


def test_cost_report(setup):
    model = setup[0]
    cost = selftune.tune_cost(model, "paired", 1000, batch_size=256)
    assert (cost.images, cost.batches, cost.passes, cost.nominal_passes) == (1000, 4, 5, 5)
    assert "1000 unlabeled images" in str(cost) and not cost.labels_used
    assert selftune.tune_cost(model, "bn", 64).passes == 1
    recipe = selftune.SelfTune("channel", jnp.zeros((64, 28, 28, 1)), batch_size=100)
    assert recipe.batch is None and recipe.uses_stats
    assert recipe.cost(model) == selftune.tune_cost(model, "channel", 64)


def test_identity_tune_layout(setup):
    model, v = setup[:2]
    tune = selftune.identity_tune(model, num_chips=3)
    assert jax.tree.structure(tune) == jax.tree.structure(v["tune"])
    assert all(leaf.shape[0] == 3 for leaf in jax.tree.leaves(tune))


def test_uncalibrated_model_warns(setup):
    model, v, calib, _, _ = setup
    raw = {**v, "batch_stats": jax.tree.map(jnp.zeros_like, v["batch_stats"])}
    with pytest.warns(UserWarning, match="act_max = 0 \\(never trained\\)"):
        selftune.nominal_stats(model, raw, calib, batch_size=32)


def test_bad_inputs(setup):
    model, v, calib, _, stats = setup
    chip = sample_chip(KEY, devices.ideal(), introspect.analog_kernels(v))
    with pytest.raises(ValueError, match="tune='magic' is unknown"):
        selftune.self_tune(model, v, chip, calib, "magic", stats)
    with pytest.raises(ValueError, match="needs the nominal stats"):
        selftune.self_tune(model, v, chip, calib, "channel")
    with pytest.raises(ValueError, match="empty"):
        selftune.self_tune(model, v, chip, calib[:0], "bn")
    with pytest.raises(ValueError, match="28, 28, 1"):
        selftune.self_tune(model, v, chip, calib[:, :20], "bn")
    with pytest.raises(ValueError, match="NaN or infinite"):
        selftune.self_tune(model, v, chip, calib.at[0, 0, 0, 0].set(jnp.inf), "bn")
    with pytest.raises(ValueError, match="batch_size"):
        selftune.self_tune(model, v, chip, calib, "bn", batch_size=0)
    with pytest.raises(ValueError, match="not a chip"):
        selftune.self_tune(model, v, {"AnalogConv_0": 1.0}, calib, "bn")
    with pytest.raises(ValueError, match="mode='grouped'"):
        selftune.self_tune(model, v, chip, calib, "bn", mode="grouped")
    other = get_model("lenet5", quant="W2A4", width=0.5)
    with pytest.raises(ValueError, match="another model"):
        selftune.check_stats(other, stats)
    with pytest.raises(ValueError, match="tune='magic'"):
        selftune.SelfTune("magic", calib).check(model)
