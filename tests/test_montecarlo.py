"""Monte-Carlo chip sweeps against independent oracles: a NumPy LeNet-5 on each chip, a
per-chip loop of the plain model; chip i's logits bit for bit whatever the chunking or the
device count; self-tuning in the sweep; lognormal between-chip variation with digital
first/last layers; summaries by hand; chunk planning; errors before any work.

The sweeps use the session's trained qavat LeNet-5 (W2A4) and, where the device itself is not
under test, :data:`helpers.HASH_DEVICE`: chip-dependent factors from an integer hash of the
chip key, which NumPy recomputes exactly and XLA compiles in no time (``jax.random`` draws
compile for ~0.8 s per layer at XLA:CPU's default optimization level).
"""

import math

import jax
import jax.numpy as jnp
import lenet_oracle
import numpy as np
import pytest
from helpers import (
    HASH_DEVICE,
    calibrate,
    chip_index,
    hash_factors,
    key_words,
    random_variables,
)

from pimjax import data, devices, introspect, montecarlo, selftune
from pimjax.devices import paper
from pimjax.layers import with_chip, with_tune
from pimjax.models import get_model

KEY = jax.random.PRNGKey(7)
N_IMAGES = 128
ONE = jax.local_devices()[:1]


@pytest.fixture(scope="module")
def run(trained):
    return trained["qavat"]


@pytest.fixture(scope="module")
def test_set(mnist):
    ds = mnist[1]
    return data.normalize(ds.images[:N_IMAGES], "mnist"), ds.labels[:N_IMAGES]


def _metrics(logits, labels):
    """Per-chip accuracy and mean cross-entropy of logits [C, B, classes] (float64)."""
    logits = np.asarray(logits, np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, np.asarray(labels)[None, :, None], -1)[..., 0]
    return (logits.argmax(-1) == labels).mean(-1), nll.mean(-1)


def _sweep(run, dataset, num_chips, device=HASH_DEVICE, **kwargs):
    kwargs.setdefault("mesh_devices", ONE)
    return montecarlo.evaluate_chips(run.model, run.variables, device, KEY, num_chips, dataset,
                                     progress=False, **kwargs)


# ------------------------------------------------------------------------ bit-identity


@pytest.fixture(scope="module")
def per_chip_loop(run, test_set):
    """Logits [N, B, 10] of chips 0..N-1 by a Python loop of the plain model, one chip each."""
    x, _ = test_set
    template = introspect.analog_kernels(run.variables)
    keys = devices.chip_keys(KEY, 6)
    apply = jax.jit(run.model.apply)
    return np.stack([apply(with_chip(run.variables,
                                     devices.sample_chip(keys[i], HASH_DEVICE, template)), x)
                     for i in range(6)])


def test_sweep_equals_a_per_chip_loop(run, test_set, per_chip_loop):
    res = _sweep(run, test_set, 6, chips_per_chunk=4)  # balanced: 2 chunks of 3 chips
    acc, loss = _metrics(per_chip_loop, test_set[1])
    np.testing.assert_array_equal(res.accuracy, acc)
    # the chip batch's GEMMs have other shapes than one chip's, so another summation order:
    # an activation that lands on a quantizer level's edge may round the other way
    np.testing.assert_allclose(res.loss, loss, rtol=1e-3)
    assert res.accuracy.shape == res.loss.shape == (6,) and res.num_images == N_IMAGES
    assert res.plan.chips == 3 and res.plan.num_chip_chunks == 2
    # each image's share of chips that got it right, and the two-way standard error
    right = per_chip_loop.argmax(-1) == test_set[1]  # [chips, images]
    np.testing.assert_allclose(res.image_accuracy, right.mean(0), atol=1e-12)
    se = math.sqrt(right.mean(1).var(ddof=1) / 6 + right.mean(0).var(ddof=1) / N_IMAGES)
    assert res.standard_error == pytest.approx(se, rel=1e-9)
    assert res.summary()["se"] == pytest.approx(se, rel=1e-9)
    ref = montecarlo.evaluate_loop(run.model, run.variables, HASH_DEVICE, KEY, 6, test_set,
                                   batch_size=N_IMAGES)
    np.testing.assert_array_equal(res.accuracy, ref)


def test_chip_logits_are_bit_identical_whatever_the_chunk(run, test_set, per_chip_loop):
    """Chip i's logits do not depend on which chips share its chunk nor on the chip mode."""
    x, _ = test_set
    template = introspect.analog_kernels(run.variables)
    logits = jax.jit(montecarlo.chip_logits, static_argnames=("model", "mode"))

    def chips(start, n):
        keys = devices.chip_keys(KEY, n, start=start)
        return jax.vmap(lambda k: devices.sample_chip(k, HASH_DEVICE, template))(keys)

    all6 = logits(run.model, run.variables, chips(0, 6), x, mode="layers")
    mid = logits(run.model, run.variables, chips(2, 3), x, mode="layers")
    np.testing.assert_array_equal(mid, all6[2:5])
    np.testing.assert_array_equal(logits(run.model, run.variables, chips(0, 6), x, mode="map"),
                                  all6)
    # against the plain model chip by chip: other GEMM shapes, so rare quantizer-edge flips
    close = np.isclose(all6, per_chip_loop, rtol=1e-4, atol=1e-4)
    assert close.mean() > 0.99, close.mean()
    np.testing.assert_array_equal(all6.argmax(-1), per_chip_loop.argmax(-1))


# 6 chips: one chunk of 8 (2 padding chips), or 3 chunks of 2; images in 2 chunks or 1
@pytest.mark.parametrize("chips,images,ndev", [(8, 64, 4), (2, 128, 2)])
def test_sweep_is_the_same_for_any_chunking_and_device_count(run, test_set, chips, images, ndev):
    assert len(jax.devices()) >= 4, "conftest provides 4 host devices"
    ref = _sweep(run, test_set, 6, chips_per_chunk=4, images_per_chunk=N_IMAGES)
    res = _sweep(run, test_set, 6, chips_per_chunk=chips, images_per_chunk=images,
                 mesh_devices=jax.devices()[:ndev], nominal=False)
    assert res.plan.chips % ndev == 0 and res.plan.images == images
    np.testing.assert_array_equal(res.accuracy, ref.accuracy)
    if images == N_IMAGES:  # the same image chunks: the same float32 sums
        np.testing.assert_array_equal(res.loss, ref.loss)
    np.testing.assert_allclose(res.loss, ref.loss, rtol=1e-6)
    assert res.nominal_accuracy is None


# ---------------------------------------------- the rest: no bit-identity claim, fast compiles

# (each compiles at the "fast" XLA level, see conftest.py)


@pytest.mark.xla_level("fast")
def test_sweep_agrees_with_a_numpy_lenet(run, test_set):
    """Per-chip accuracy and loss of the sweep against a float64 NumPy forward pass on each
    chip (weights quantized, times the chip's factors recomputed from the chip key)."""
    x, y = test_set
    res = _sweep(run, test_set, 4)
    shapes = [tuple(k.shape) for k in jax.tree.leaves(introspect.analog_kernels(run.variables))]
    names = sorted(introspect.analog_kernels(run.variables))
    assert names == list(lenet_oracle.ANALOG)
    words = np.asarray(key_words(devices.chip_keys(KEY, 4)))
    logits = []
    for i in range(4):
        factors = {name: hash_factors(words[i], j, shape, 0.3, np)
                   for j, (name, shape) in enumerate(zip(names, shapes, strict=True))}
        logits.append(lenet_oracle.forward(run.variables, x, factors=factors)[0])
    acc, loss = _metrics(np.stack(logits), y)
    nominal_acc, nominal_loss = _metrics(lenet_oracle.forward(run.variables, x)[0][None], y)
    # float32 vs float64 may move an activation across a quantizer level now and then:
    # allow one image per chip to differ, and the loss to 1%
    np.testing.assert_allclose(res.accuracy, acc, atol=1.01 / N_IMAGES)
    np.testing.assert_allclose(res.loss, loss, rtol=1e-2)
    assert abs(res.nominal_accuracy - nominal_acc[0]) <= 1.01 / N_IMAGES
    assert res.nominal_loss == pytest.approx(nominal_loss[0], rel=1e-2)
    assert not np.allclose(acc, nominal_acc[0]) or not np.allclose(loss, nominal_loss[0])


# ------------------------------------------------------------------------------ self-tuning


@pytest.mark.xla_level("fast")
def test_sweep_with_self_tuning_equals_tuning_each_chip(run, test_set, mnist, per_chip_loop):
    """'paired' tuning inside the sweep (chip batches, chunked) equals self_tune on each
    chip alone followed by the plain model."""
    x, y = test_set
    calib = data.normalize(mnist[0].images[:32], "mnist")
    tuning = selftune.SelfTune("paired", calib)
    tuned = montecarlo.tune_chips(run.model, run.variables, HASH_DEVICE, KEY, 3, tuning,
                                  chips_per_chunk=2, mesh_devices=ONE)
    assert (tuned.cost.passes, tuned.cost.images, tuned.cost.nominal_passes) == (1, 32, 1)
    # on four devices (one chunk of 4 chips, one of them padding), with the nominal model
    res = _sweep(run, test_set, 3, tuning=tuning, chips_per_chunk=4,
                 mesh_devices=jax.local_devices()[:4])
    assert res.tune_cost == tuned.cost and res.plan.chips == 4
    template = introspect.analog_kernels(run.variables)
    keys = devices.chip_keys(KEY, 3)
    apply = jax.jit(run.model.apply)
    logits = []
    for i in range(3):
        chip = devices.sample_chip(keys[i], HASH_DEVICE, template)
        one = selftune.self_tune(run.model, run.variables, chip, calib, "paired").tune
        for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(chip_index(tuned.tune, i)),
                        strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        logits.append(apply(with_tune(with_chip(run.variables, chip), one), x))
    acc, loss = _metrics(np.stack(logits), y)
    np.testing.assert_allclose(res.accuracy, acc, atol=1.01 / N_IMAGES)
    np.testing.assert_allclose(res.loss, loss, rtol=1e-3)
    untuned = _metrics(per_chip_loop[:3], y)[1]  # the same chips 0..2, untuned
    assert not np.allclose(untuned, res.loss, rtol=1e-3)  # the tuning did something
    # the nominal model after the same tuning, solved on the ideal chip
    ideal = devices.sample_chip(KEY, devices.ideal(), template)
    one = selftune.self_tune(run.model, run.variables, ideal, calib, "paired").tune
    nominal_tuned = _metrics(apply(with_tune(run.variables, one), x)[None], y)[0][0]
    assert res.nominal_tuned_accuracy == pytest.approx(nominal_tuned, abs=1.01 / N_IMAGES)
    assert res.summary()["drop_mean_tuned"] == pytest.approx(
        res.nominal_tuned_accuracy - res.accuracy.mean())


@pytest.mark.xla_level("fast")
def test_lognormal_between_chips_and_digital_first_last(mnist):
    """Lognormal between-chip (per layer) variation on a LeNet-5 whose first and last layers
    are digital: the tuned sweep equals a per-chip loop, and the digital layers carry no chip
    and no tune."""
    model = get_model("lenet5", quant="W2A4", digital_first_last=True)
    images = data.normalize(mnist[1].images[:N_IMAGES + 32], "mnist")
    x, calib, y = images[:N_IMAGES], images[N_IMAGES:], mnist[1].labels[:N_IMAGES]
    variables = calibrate(model, random_variables(model), images, passes=3)
    analog = ["AnalogConv_1", "AnalogDense_0", "AnalogDense_1"]
    assert [layer.name for layer in introspect.analog_layers(model)] == analog
    device = paper(0.1, 0.3, "layer", "lognormal")
    stats = selftune.nominal_stats(model, variables, calib)
    assert sorted(stats.mean) == analog
    tuning = selftune.SelfTune("channel", calib, stats)
    res = montecarlo.evaluate_chips(model, variables, device, KEY, 4, (x, y), tuning=tuning,
                                    chips_per_chunk=2, mesh_devices=ONE, nominal=False,
                                    progress=False)
    template = introspect.analog_kernels(variables)
    assert sorted(template) == analog
    keys = devices.chip_keys(KEY, 4)
    apply = jax.jit(model.apply)
    logits = []
    for i in range(4):
        chip = devices.sample_chip(keys[i], device, template)
        factors = [np.asarray(layer.states[0]) for layer in
                   jax.tree.leaves(chip, is_leaf=devices.is_chip_layer)]
        assert all(np.all(f > 0) for f in factors)  # lognormal: never sign-flipped
        tune = selftune.self_tune(model, variables, chip, calib, "channel", stats).tune
        assert sorted(tune) == analog and sorted(chip) == analog
        logits.append(apply(with_tune(with_chip(variables, chip), tune), x))
    acc, loss = _metrics(np.stack(logits), y)
    np.testing.assert_allclose(res.accuracy, acc, atol=1.01 / N_IMAGES)
    np.testing.assert_allclose(res.loss, loss, rtol=1e-3)
    # the between-chip factor of a layer is shared by its cells: chips differ layer-wide
    between = jax.tree.leaves(devices.between_factors(keys[0], device.weights[0], template))
    assert all(np.ndim(b) == 0 for b in between) and len({float(b) for b in between}) == 3


# ------------------------------------------------------------------------------ summaries


@pytest.mark.xla_level("fast")
def test_summary_statistics_by_hand():
    acc = [0.9, 0.8, 0.95, 0.85]
    s = montecarlo.summarize(acc, nominal_accuracy=0.97, thresholds=(0.9,), drops=(0.05,),
                             loss=[0.3, 0.5, 0.2, 0.4], nominal_loss=0.1)
    # sorted 0.80 0.85 0.90 0.95; percentiles interpolate linearly at (n - 1) q = 3 q
    want = {"chips": 4, "mean": 0.875, "std": math.sqrt(0.0125 / 3), "min": 0.8,
            "p5": 0.8 + 0.15 * 0.05, "p50": 0.875, "p95": 0.9 + 0.85 * 0.05,
            "yield@0.9": 0.5, "mean_loss": 0.35, "nominal": 0.97, "drop_mean": 0.095,
            "drop_p5": 0.97 - 0.8075, "yield@nominal-0.05": 0.25, "nominal_loss": 0.1}
    assert s.keys() == want.keys()
    for k, v in want.items():
        assert s[k] == pytest.approx(v, abs=1e-12), k
    assert montecarlo.summarize([0.5])["std"] == 0.0
    with pytest.raises(ValueError, match="empty"):
        montecarlo.summarize([])


@pytest.mark.xla_level("fast")
def test_plan_chunks_respects_the_budget(run):
    model = run.model
    per_ci, per_c, per_i = montecarlo.memory_per_chip(model, paper(0.3))
    budget = 40 * (per_c + 100 * per_ci) + 100 * per_i
    plan = montecarlo.plan_chunks(model, 1000, 100, device=paper(0.3), num_devices=4,
                                  budget_bytes=budget)
    assert plan.chips % 4 == 0 and plan.images == 100
    assert plan.estimated_bytes <= budget
    assert plan.chips * plan.num_chip_chunks >= 1000
    assert plan.chips * (plan.num_chip_chunks - 1) < 1000  # no empty chunk
    plan = montecarlo.plan_chunks(model, 10, 1000, chips_per_chunk=3, images_per_chunk=300)
    assert (plan.chips, plan.num_chip_chunks) == (3, 4)
    assert (plan.images, plan.num_image_chunks) == (250, 4)  # balanced: 4 chunks of 250
    plan = montecarlo.plan_chunks(model, 10, 20)
    assert plan.images == montecarlo.MIN_IMAGES_PER_CHUNK  # padded up (masked)


# ------------------------------------------------------------------------------ errors


@pytest.mark.xla_level("fast")
@pytest.mark.parametrize("n", [0, -3, 2.5, True])
def test_bad_num_chips(run, test_set, n):
    with pytest.raises(ValueError, match="num_chips"):
        _sweep(run, test_set, n)


@pytest.mark.xla_level("fast")
def test_bad_dataset(run, test_set):
    x, y = test_set
    with pytest.raises(ValueError, match="empty"):
        _sweep(run, (x[:0], y[:0]), 4)
    with pytest.raises(ValueError, match="28, 28, 1"):
        _sweep(run, (x[:, :20], y), 4)
    with pytest.raises(ValueError, match="float"):
        _sweep(run, (np.zeros((4, 28, 28, 1), np.uint8), y[:4]), 4)
    with pytest.raises(ValueError, match="labels"):
        _sweep(run, (x, y[:5]), 4)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        _sweep(run, (x[:2], np.array([0, 10])), 4)


@pytest.mark.xla_level("fast")
def test_nan_images_are_rejected(run, test_set):
    x, y = test_set
    bad = np.array(x)
    bad[3, 10, 10, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        _sweep(run, (bad, y), 4)
    with pytest.raises(ValueError, match="NaN or infinite"):
        selftune.SelfTune("bn", jnp.asarray(bad)).check(run.model)


@pytest.mark.xla_level("fast")
def test_mismatched_variables(run, test_set):
    other = get_model("lenet5", quant="W2A4", width=0.5)
    with pytest.raises(ValueError, match="do not match"):
        montecarlo.evaluate_chips(other, run.variables, HASH_DEVICE, KEY, 4, test_set,
                                  progress=False)
    with pytest.raises(ValueError, match="do not match"):
        montecarlo.check_variables(get_model("lenet5", num_classes=12), run.variables)


@pytest.mark.xla_level("fast")
def test_bad_device_time_and_chunks(run, test_set):
    with pytest.raises(ValueError, match="pimjax.devices.Device"):
        _sweep(run, test_set, 4, device=devices.VariabilityModel(0.3))
    with pytest.raises(ValueError, match="chips_per_chunk"):
        _sweep(run, test_set, 4, chips_per_chunk=0)
    with pytest.raises(ValueError, match="t=-1"):
        _sweep(run, test_set, 4, t=-1.0)
    with pytest.raises(ValueError, match="mode='grouped'"):
        _sweep(run, test_set, 4, mode="grouped")
