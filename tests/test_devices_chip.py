"""Devices inside models: a PCM chip through the analog layers, the Monte-Carlo sweep and
self-tuning, drift compensation against a NumPy oracle, config errors, and a new part that
needs no edit of the layers or the sweep.

The model is a small conv + dense net (its dense layer has 600 rows: two crossbar tiles) whose
batch norm and activation clips are set by one train-mode pass (an untrained running-max clip
would clip at each batch's max, which legitimately differs between a chip batch and a vmap).
Its labels are the nominal model's predictions, so a chip's accuracy is its agreement with
the digital model. Small, so that each test compiles in seconds.
"""

import dataclasses
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pimjax import devices, introspect, layers, montecarlo, selftune
from pimjax.devices import (
    PCM,
    Device,
    DeviceConfig,
    GlobalDriftCompensation,
    Periphery,
)
from pimjax.ops import max_pool_2x2
from pimjax.quant import QuantConfig, quantize_weights, weight_scale

KEY = jax.random.key(0)
DAY = 86400.0


class Net(nn.Module):
    """conv 3x3 (6) - BN - relu - pool - dense (10): two analog layers, W4A8."""

    num_classes: int = 10
    quant: QuantConfig = QuantConfig(weight_bits=4, act_bits=8)
    input_shape: tuple = (20, 20, 1)

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = layers.AnalogConv(6, kernel_size=(3, 3), quant=self.quant, input_signed=True)(
            x, train)
        x = max_pool_2x2(nn.relu(nn.BatchNorm(use_running_average=not train)(x)))
        x = x.reshape(x.shape[:-3] + (-1,))
        return layers.AnalogDense(self.num_classes, quant=self.quant, use_bias=True)(x, train)


@pytest.fixture(scope="module")
def net():
    """The calibrated net, 128 images and the nominal model's labels."""
    model = Net()
    x = jax.random.normal(jax.random.key(1), (128, *model.input_shape))
    v = jax.jit(model.init)(jax.random.PRNGKey(0), x[:2])
    _, upd = jax.jit(partial(model.apply, train=True, mutable=["batch_stats"]))(v, x)
    v = {**v, **upd}
    labels = np.asarray(jnp.argmax(jax.jit(model.apply)(v, x), -1), np.int32)
    return model, v, x, labels


def template(v):
    return introspect.analog_kernels(v)


def logits_fn(model):
    return jax.jit(lambda v, chip, x: model.apply(layers.with_chip(v, chip), x))


def quantized(model, v, name):
    kernel = v["params"][name]["kernel"]
    q = model.quant
    return quantize_weights(kernel, q.weight_bits,
                            weight_scale(kernel, q.weight_bits, q.weight_scale,
                                         q.weight_per_channel))


# ------------------------------------------------------------------ chips in the layers


def test_single_chip_batch_and_vmap_give_the_same_logits(net):
    model, v, x, _ = net
    device = devices.pcm(sigma_between=0.1, drift_compensation=True)  # every kind of part
    x = x[:32]
    n = 2
    reads = devices.read_keys(devices.chip_keys(KEY, n), jnp.arange(x.shape[0], dtype=jnp.uint32))
    batch = devices.at_time(devices.sample_chips(KEY, device, template(v), n), DAY)
    f = logits_fn(model)
    y_batch = f(v, devices.with_read_keys(batch, reads), x)
    assert y_batch.shape == (n, x.shape[0], 10)
    assert [len(devices.periphery.split_sizes(r, 512)) for r in (9, 600)] == [1, 2]
    chips = [jax.tree_util.tree_map(lambda a, i=i: a[i], batch) for i in range(n)]
    # chip i sampled on its own is chip i of the batch
    alone = devices.at_time(devices.sample_chip(devices.chip_keys(KEY, n)[1], device,
                                                template(v)), DAY)
    jax.tree_util.tree_map(np.testing.assert_array_equal, alone, chips[1])
    y_single = jnp.stack([f(v, devices.with_read_keys(c, reads[i]), x)
                          for i, c in enumerate(chips)])
    y_vmap = jax.jit(jax.vmap(lambda c, r: model.apply(
        layers.with_chip(v, devices.with_read_keys(c, r)), x)))(batch, reads)
    # the same computation: equal but where float rounding (which differs with the GEMM
    # shapes) tips a converter (ADC) across a rounding boundary, a rare one-level difference
    for y in (y_single, y_vmap):
        same = np.isclose(y, y_batch, rtol=1e-6, atol=1e-6)
        assert same.mean() > 0.99, same.mean()
        np.testing.assert_allclose(y, y_batch, atol=0.05)
    # the chips differ from each other (the test compares something)
    assert float(jnp.abs(y_batch[0] - y_batch[1]).max()) > 1e-3


@pytest.mark.xla_level("fast")  # no bit-identity claim across programs
def test_output_noise_is_redrawn_per_read_but_the_chip_is_not(net):
    model, v, x, _ = net
    x = x[:64]
    chip = devices.at_time(devices.sample_chip(KEY, devices.pcm(), template(v)), DAY)
    f = jax.jit(lambda chip, k: model.apply(layers.with_chip(v, chip), x, rngs={"read": k}))
    y1, y1b, y2 = f(chip, jax.random.key(1)), f(chip, jax.random.key(1)), f(chip, jax.random.key(2))
    np.testing.assert_array_equal(y1, y1b)
    assert float(jnp.abs(y1 - y2).max()) > 1e-4  # a new read key: new output noise
    # the chip's weights are fixed: the same state gives the same weights at every read
    layer = chip["AnalogDense_0"]["kernel"]
    w = quantized(model, v, "AnalogDense_0")
    np.testing.assert_array_equal(jax.jit(layer.weights)(w), jax.jit(layer.weights)(w))
    # without output noise the read key changes nothing
    quiet = Device(weights=(PCM(),), periphery=Periphery(out_noise=0.0))
    chip_q = devices.at_time(devices.sample_chip(KEY, quiet, template(v)), DAY)
    g = jax.jit(lambda k: model.apply(layers.with_chip(v, chip_q), x, rngs={"read": k}))
    np.testing.assert_array_equal(g(jax.random.key(1)), g(jax.random.key(2)))
    assert not quiet.needs_key and devices.pcm().needs_key


@pytest.mark.xla_level("fast")  # no bit-identity claim across programs
def test_stored_read_keys_are_per_image(net):
    """Image i's noise depends on its own key only: reading it in another batch is the same."""
    model, v, x, _ = net
    chip = devices.at_time(devices.sample_chip(KEY, devices.pcm(), template(v)), DAY)
    reads = devices.read_keys(KEY[None], jnp.arange(x.shape[0], dtype=jnp.uint32))[0]
    f = logits_fn(model)
    y_all = f(v, devices.with_read_keys(chip, reads), x)
    y_perm = f(v, devices.with_read_keys(chip, reads[::-1]), x[::-1])
    np.testing.assert_allclose(y_perm[::-1], y_all, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------ Monte-Carlo


def test_evaluate_chips_pcm_is_chunk_mode_and_device_invariant(net):
    model, v, x, y = net
    kw = dict(t=DAY, progress=False, nominal=False)
    ref = montecarlo.evaluate_loop(model, v, devices.pcm(), KEY, 4, (x, y), t=DAY)
    a = montecarlo.evaluate_chips(model, v, devices.pcm(), KEY, 4, (x, y), chips_per_chunk=4,
                                  images_per_chunk=128, mode="layers",
                                  mesh_devices=jax.devices()[:1], **kw)
    b = montecarlo.evaluate_chips(model, v, devices.pcm(), KEY, 4, (x, y), chips_per_chunk=2,
                                  images_per_chunk=64, mode="map",
                                  mesh_devices=jax.devices()[:2], **kw)
    assert a.plan.num_image_chunks == 1 and b.plan.num_image_chunks == 2
    np.testing.assert_array_equal(a.accuracy, ref)
    np.testing.assert_array_equal(b.accuracy, ref)
    np.testing.assert_allclose(a.loss, b.loss, rtol=1e-5)
    assert len(set(ref.tolist())) > 1  # the chips differ


# ------------------------------------------------------------------------ self-tuning


@pytest.fixture(scope="module")
def tuning(net):
    model, v, x, _ = net
    calib = x[:64]
    return calib, selftune.nominal_stats(model, v, calib)


def test_self_tune_needs_a_key_on_a_noisy_device(net, tuning):
    model, v, _, _ = net
    calib, stats = tuning
    chip = devices.sample_chip(KEY, devices.pcm(), template(v))
    with pytest.raises(ValueError, match="key="):
        selftune.self_tune(model, v, chip, calib, "channel", stats)
    with pytest.raises(ValueError, match="read keys"):
        selftune.self_tune(model, v, devices.with_read_keys(chip, jnp.zeros((64,), jnp.uint32)),
                           calib, "channel", stats, key=KEY)


def test_self_tune_with_key_matches_the_monte_carlo_tuning(net, tuning):
    model, v, _, _ = net
    calib, stats = tuning
    n, i, t = 3, 1, DAY
    close = partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5)
    recipe = selftune.SelfTune("channel", calib, stats)
    mc = montecarlo.tune_chips(model, v, devices.pcm(), KEY, n, recipe, t=t, chips_per_chunk=n)
    # chip i alone, with its own key, reads as chip i of the Monte-Carlo chip batch
    key_i = devices.chip_keys(KEY, n)[i]
    chip = devices.at_time(devices.sample_chip(key_i, devices.pcm(), template(v)), t)
    one = selftune.self_tune(model, v, chip, calib, "channel", stats, key=key_i)
    jax.tree_util.tree_map(lambda a, b: close(a, b[i]), one.tune, mc.tune)
    # calibration batches see the same per-image reads: the same moments, to float rounding
    split = selftune.self_tune(model, v, chip, calib, "channel", stats, batch_size=24, key=key_i)
    jax.tree_util.tree_map(partial(np.testing.assert_allclose, rtol=2e-4, atol=2e-5),
                           split.tune, one.tune)
    # another key: other read noise, another tune
    other = selftune.self_tune(model, v, chip, calib, "channel", stats, key=jax.random.key(9))
    diff = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), other.tune, one.tune)
    assert max(jax.tree_util.tree_leaves(diff)) > 1e-4


# ---------------------------------------------------------------- drift compensation


def np_round_half_even(x, tol=1e-4):
    """Round to nearest; within ``tol`` of a half-integer, to the even neighbour (the
    converters' documented rule, robust to float error)."""
    f = np.floor(x)
    tie = np.abs(x - f - 0.5) <= tol
    return np.where(tie, f + np.mod(f, 2.0), np.round(x))


def np_drifted_weights(w, state, t, scale):
    """Drift only (no programming or read noise, no re-conversion), from aihwkit's formulas."""
    wn = np.asarray(w, np.float64) / scale
    out = 0.0
    for side, sign in (("plus", 1.0), ("minus", -1.0)):
        g = 25.0 * np.clip(sign * wn, 0, 1)
        g_rel = np.maximum(g / 25.0, 1e-7)
        mu = np.clip(-0.0155 * np.log(g_rel) + 0.0244, 0.049, 0.1)
        sd = np.clip(-0.0125 * np.log(g_rel) - 0.0059, 0.008, 0.045)
        nu = np.abs(mu + sd * np.asarray(state[f"nu_{side}"], np.float64))
        out = out + sign * g * ((t + 20.0) / 20.0) ** (-nu)
    return out / 25.0 * scale


def np_readout(w_eff, scale, z, out_noise=0.06):
    """aihwkit's reference read: mean |ADC(identity read + output noise)|, floored at 1e-4."""
    u = np.asarray(w_eff, np.float64) / scale + out_noise * np.asarray(z, np.float64)
    step = 24.0 / 510.0
    q = np.clip(np_round_half_even(u / step) * step, -12.0, 12.0)
    return max(np.abs(q).mean(), 1e-4)


@pytest.mark.xla_level("fast")  # no bit-identity claim across programs
def test_compensation_gain_is_baseline_over_readout():
    pcm = PCM(prog_noise_scale=0.0, read_noise_scale=0.0, reconvert=False)
    device = Device(weights=(pcm,), periphery=Periphery(), compensation=GlobalDriftCompensation())
    w = jnp.array([[0.5, -0.25, 0.0], [1.0, 0.125, -0.75]], jnp.float32)  # hand-picked levels
    w = jnp.tile(w, (8, 4))  # 16 x 12: enough cells for a stable mean
    chip = devices.sample_chip(KEY, device, {"k": w})["k"]
    scale = float(np.abs(np.asarray(w)).max())
    z = np.asarray(chip.compensation)
    for t in (1.0, DAY, 365 * DAY):
        layer = chip.replace(t=jnp.float32(t))
        gain = float(device.compensation.gain(layer, w, layer.compensation))
        base = np_readout(np_drifted_weights(w, chip.states[0], 0.0, scale), scale, z[0])
        now = np_readout(np_drifted_weights(w, chip.states[0], t, scale), scale, z[1])
        assert gain == pytest.approx(base / now, rel=1e-5)
        assert gain > 1.0  # drift lowers the conductances; the gain restores them
        # the layer's output is the uncompensated output times the gain
        x = jax.random.normal(jax.random.key(3), (5, w.shape[0]))
        plain = layer.replace(device=dataclasses.replace(device, compensation=None))
        rk = jax.random.key(4)
        y = layer.forward(x, w, None, rk)
        np.testing.assert_allclose(y, gain * plain.forward(x, w, None, rk), rtol=1e-5, atol=1e-6)


@pytest.mark.xla_level("fast")  # no bit-identity claim across programs
def test_compensation_gain_is_one_at_time_zero_without_read_noise(net):
    model, v, x, _ = net
    device = Device(weights=(PCM(),), periphery=Periphery(out_noise=0.0),
                    compensation=GlobalDriftCompensation())
    chip = devices.sample_chip(KEY, device, template(v))
    for name in ("AnalogConv_0", "AnalogDense_0"):
        layer = chip[name]["kernel"]
        assert float(device.compensation.gain(layer, quantized(model, v, name),
                                              layer.compensation)) == 1.0
        later = layer.replace(t=jnp.float32(DAY))
        assert float(device.compensation.gain(later, quantized(model, v, name),
                                              later.compensation)) > 1.0


# ------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("kwargs,field", [
    (dict(sigma_within=0.1), "sigma_within"),
    (dict(sigma_between=-0.1), "sigma_between"),
    (dict(stuck_zero=-0.1), "stuck_zero"),
    (dict(stuck_gmax=1.5), "stuck_gmax"),
    (dict(stuck_zero=0.6, stuck_gmax=0.6), "stuck_zero"),
    (dict(drift_compensation="yes"), "drift_compensation"),
    (dict(periphery=None), "periphery"),
    (dict(between_granularity="wafer"), "between_granularity"),
    (dict(distribution="cauchy"), "distribution"),
])
def test_device_config_pcm_errors_are_one_line_and_name_the_field(kwargs, field):
    with pytest.raises(ValueError) as e:
        DeviceConfig(preset="pcm", **kwargs)
    msg = str(e.value)
    assert "\n" not in msg and f"device.{field}" in msg


def test_device_config_pcm_settings_only_with_the_pcm_preset():
    with pytest.raises(ValueError, match="device.drift_compensation"):
        DeviceConfig(preset="paper", sigma_within=0.1, drift_compensation=True)
    d = DeviceConfig(preset="pcm", drift_compensation=True, stuck_zero=0.01, sigma_between=0.1)
    device = d.build()
    assert device.needs_key and device.compensation is not None and len(device.weights) == 2


# ------------------------------------------------------------ a new part, no other edit


@dataclasses.dataclass(frozen=True)
class ConductanceOffset:
    """A test part: an additive offset ``sigma * max|w| * z`` on every weight (z ~ N(0, 1))."""

    sigma: float = 0.05

    def sample(self, key, template):
        leaves, treedef = jax.tree_util.tree_flatten(template)
        out = [jax.random.normal(jax.random.fold_in(key, i), jnp.shape(leaf), jnp.float32)
               for i, leaf in enumerate(leaves)]
        return jax.tree_util.tree_unflatten(treedef, out)

    def apply(self, w, state, t):
        axes = tuple(range(jnp.ndim(t), w.ndim))  # a chip batch (t of shape (C,)) keeps its axis
        m = jax.lax.stop_gradient(jnp.max(jnp.abs(w), axis=axes, keepdims=True))
        return w + self.sigma * m * state


def test_a_new_part_composes_and_sweeps_without_edits(net):
    model, v, x, y = net
    device = Device(weights=(PCM(), ConductanceOffset(0.05)), name="pcm+offset")
    tmpl = template(v)
    # composition: part 1 samples from part_key(chip key, 1) and acts on part 0's output
    chip = devices.at_time(devices.sample_chip(KEY, device, tmpl), DAY)
    layer = chip["AnalogDense_0"]["kernel"]
    w = quantized(model, v, "AnalogDense_0")
    w_pcm = np.asarray(PCM().apply(w, layer.states[0], jnp.float32(DAY)), np.float64)
    z = np.asarray(jax.random.normal(
        jax.random.fold_in(devices.part_key(KEY, 1), 1), w.shape, jnp.float32), np.float64)
    want = w_pcm + 0.05 * np.abs(w_pcm).max() * z
    np.testing.assert_allclose(layer.weights(w), want, rtol=1e-5, atol=1e-6)
    # the sweep: chunked chip batches equal the single-chip loop, and the part matters
    kw = dict(t=DAY, progress=False, nominal=False)
    ref = montecarlo.evaluate_loop(model, v, device, KEY, 4, (x, y), t=DAY)
    got = montecarlo.evaluate_chips(model, v, device, KEY, 4, (x, y), chips_per_chunk=2, **kw)
    np.testing.assert_array_equal(got.accuracy, ref)
    plain = montecarlo.evaluate_chips(model, v, Device(weights=(PCM(),)), KEY, 4, (x, y),
                                      chips_per_chunk=2, **kw)
    assert np.any(plain.accuracy != got.accuracy)
