"""Analog layers and models: hand-computed quantized layers on a chip, the nominal chip is the
digital model bit for bit, chips as arguments, tuning, quantizer wiring, periphery, errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import factor_chip, numpy_chips, random_variables

from pimjax import devices, introspect
from pimjax.devices import Device, paper, sample_chip
from pimjax.layers import (
    ActQuant,
    AnalogConv,
    AnalogDense,
    intercept_mvm,
    with_chip,
    with_tune,
)
from pimjax.models import ModelConfig, get_model
from pimjax.quant import QuantConfig

# Compile at the "fast" XLA level (most optimizations off, see conftest.py), except the test
# that claims bit-identity, which runs at the default level users run at.
pytestmark = pytest.mark.xla_level("fast")

# LeNet-5 quantized; the CIFAR models small and float (a quantized ResNet's MSE weight-scale
# searches triple its compile time at XLA's default level; the chip path is the same).
MODELS = {"lenet5": (1.0, "W2A4"), "vgg11": (0.125, "fp"), "resnet20": (0.25, "fp"),
          "resnet18": (0.0625, "fp")}


def _inputs(shape, batch=2, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, *shape)), jnp.float32)


@pytest.mark.xla_level("default")
@pytest.mark.parametrize("name", sorted(MODELS))
def test_nominal_chip_equals_no_chip_bit_for_bit(name):
    """A chip whose factors are all exactly 1 computes the digital model's logits bit for bit
    (at XLA's default optimization level), as does the ideal device's chip; the same noisy
    chip gives the same logits, another chip others."""
    width, quant = MODELS[name]
    model = get_model(name, quant=quant, width=width)
    variables = random_variables(model)
    x = _inputs(ModelConfig(name).input_shape)
    template = introspect.analog_kernels(variables)
    apply = jax.jit(model.apply)
    plain = apply(variables, x)
    assert plain.shape == (2, 10) and np.all(np.isfinite(plain))
    ones = factor_chip(template, [1.0] * len(jax.tree.leaves(template)))
    np.testing.assert_array_equal(apply(with_chip(variables, ones), x), plain)
    if name != "lenet5":
        return
    ideal = sample_chip(jax.random.key(1), devices.ideal(), template)  # no state at all
    np.testing.assert_array_equal(apply(with_chip(variables, ideal), x), plain)
    noisy = [apply(with_chip(variables, numpy_chips(template, seed=k)), x) for k in (5, 5, 6)]
    np.testing.assert_array_equal(noisy[0], noisy[1])  # chips are ordinary arguments
    assert not np.allclose(noisy[0], plain) and not np.allclose(noisy[0], noisy[2])


def test_dense_on_a_chip_hand_computed():
    """W2 weights (max scale: levels -1, 0, 1 times max|w|), A4 inputs (clip 1.5, step 0.1),
    then the chip's factors multiply the quantized weights; all by hand."""
    layer = AnalogDense(2, quant=QuantConfig(weight_bits=2, act_bits=4, weight_scale="max"))
    kernel = jnp.array([[0.9, -0.2], [0.4, -0.6], [-1.0, 0.1]])  # max|w| = 1: scale 1
    variables = {"params": {"kernel": kernel},
                 "batch_stats": {"input_quant": {"act_max": jnp.array(1.5)}},
                 "tune": {"gain": jnp.ones(2), "offset": jnp.zeros(2)}}
    x = jnp.array([[1.04, 0.52, 0.27], [2.0, -0.3, 0.06]])
    # x / 0.1 = 10.4, 5.2, 2.7 -> 1.0, 0.5, 0.3;  20 (clipped to 15), -3 (clipped to 0), 0.6
    xq = np.array([[1.0, 0.5, 0.3], [1.5, 0.0, 0.1]])
    wq = np.array([[1.0, 0.0], [0.0, -1.0], [-1.0, 0.0]])  # round(w / 1), clipped to +-1
    np.testing.assert_allclose(layer.apply(variables, x), xq @ wq, rtol=1e-6, atol=1e-7)
    factors = np.array([[2.0, 1.0], [1.0, 1.0], [1.0, 3.0]])
    chip = factor_chip({"kernel": kernel}, [factors])
    got = layer.apply(with_chip(variables, chip), x)
    np.testing.assert_allclose(got, xq @ (wq * factors), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got, [[1.7, -0.5], [3.0 - 0.1, 0.0]], rtol=1e-6, atol=1e-7)


def test_dense_quantizes_then_perturbs():
    """The chip perturbs the quantized weight (not the float weight before quantizing)."""
    quant = QuantConfig(weight_bits=3, act_bits=4, weight_scale="max")
    layer = AnalogDense(5, quant=quant)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(0, 2, (7, 6)), jnp.float32)
    w = rng.standard_normal((6, 5))
    variables = {"params": {"kernel": jnp.asarray(w, jnp.float32)},
                 "batch_stats": {"input_quant": {"act_max": jnp.array(1.5)}},
                 "tune": {"gain": jnp.ones(5), "offset": jnp.zeros(5)}}
    chip = sample_chip(jax.random.key(2), paper(0.3), {"kernel": w})
    factor = np.asarray(chip["kernel"].states[0], np.float64)
    got = layer.apply(with_chip(variables, chip), x)
    s = np.abs(w).max() / 3  # Q = 2^(3-1) - 1 = 3
    wq = s * np.clip(np.round(w / s), -3, 3)
    xq = 0.1 * np.round(np.clip(np.asarray(x) / 0.1, 0, 15))
    np.testing.assert_allclose(got, xq @ (wq * factor), rtol=1e-5, atol=1e-6)
    wf = w * factor  # quantizing the perturbed float weight instead
    sf = np.abs(wf).max() / 3
    assert not np.allclose(got, xq @ (sf * np.clip(np.round(wf / sf), -3, 3)), atol=1e-3)


def test_per_channel_weight_scale_in_layer():
    """W2 per output channel, max scale: column j becomes s_j * {-1, 0, 1} with s_j its max|w|;
    an identity input reads the quantized kernel out."""
    layer = AnalogDense(4, quant=QuantConfig(weight_bits=2, weight_scale="max",
                                             weight_per_channel=True))
    w = np.random.default_rng(3).standard_normal((6, 4))
    variables = {"params": {"kernel": jnp.asarray(w, jnp.float32)},
                 "tune": {"gain": jnp.ones(4), "offset": jnp.zeros(4)}}
    out = np.asarray(layer.apply(variables, jnp.eye(6)))
    s = np.abs(w).max(axis=0)
    want = s * np.clip(np.round(w / s), -1, 1)
    np.testing.assert_allclose(out, want, rtol=1e-6)
    # every column holds its own scale (at least its largest entry), so never all zeros
    np.testing.assert_allclose(np.abs(out).max(axis=0), s, rtol=1e-6)
    assert len(set(np.round(s, 6))) == 4


def test_tune_gain_and_offset_apply_to_the_mvm_output():
    layer = AnalogConv(3, kernel_size=(3, 3))
    x = _inputs((5, 5, 2))
    variables = layer.init(jax.random.key(1), x)
    captured = {}

    def grab(path, y):
        captured["y"] = y
        return y

    with intercept_mvm(grab):
        base = layer.apply(variables, x)
    np.testing.assert_array_equal(captured["y"], base)  # identity tune, no bias
    tune = {"gain": jnp.array([2.0, 0.5, 1.0]), "offset": jnp.array([0.0, 1.0, -1.0])}
    got = layer.apply(with_tune(variables, tune), x)
    np.testing.assert_allclose(got, base * tune["gain"] + tune["offset"], rtol=1e-6)
    # training leaves self-tuning out: it corrects a fabricated chip, after training
    np.testing.assert_array_equal(layer.apply(with_tune(variables, tune), x, train=True),
                                  layer.apply(variables, x, train=True))


def test_digital_first_last_layers_are_not_analog():
    model = get_model("lenet5", quant="W2A4", digital_first_last=True)
    variables = random_variables(model)
    analog = introspect.analog_kernels(variables)
    assert sorted(analog) == ["AnalogConv_1", "AnalogDense_0", "AnalogDense_1"]
    assert sorted(variables["tune"]) == sorted(analog)  # no tune for digital layers
    assert "input_quant" not in variables["batch_stats"].get("AnalogConv_0", {})
    # a chip only for the analog layers; a chip entry for a digital layer is never read
    chip = numpy_chips(analog, sigma=0.5)
    zeros = factor_chip({"k": variables["params"]["AnalogConv_0"]["kernel"]}, [0.0])["k"]
    full = {**chip, "AnalogConv_0": {"kernel": zeros}}
    x = _inputs((28, 28, 1))
    apply = jax.jit(model.apply)
    np.testing.assert_array_equal(apply(with_chip(variables, chip), x),
                                  apply(with_chip(variables, full), x))
    assert not np.allclose(apply(with_chip(variables, chip), x), apply(variables, x))


def test_running_range_tracks_activations():
    """EMA ranges: the first train batch sets them to the batch's, later ones move them by
    momentum 0.9; inference quantizes with them. Unsigned (after a ReLU): 15 levels over
    [0, max]; signed (a network's input): 15 levels over [min, max], all of them used."""
    x = jnp.array([[-2.1, 0.3, 1.4]])
    for signed in (False, True):
        quant = ActQuant(bits=4, clip="ema", momentum=0.9, signed=signed)
        variables = quant.init(jax.random.key(0), x)
        assert all(float(v) == 0.0 for v in jax.tree.leaves(variables))
        _, upd = quant.apply(variables, x, train=True, mutable=["batch_stats"])
        stats = upd["batch_stats"]
        assert float(stats["act_max"]) == pytest.approx(1.4)
        _, upd2 = quant.apply(upd, 2 * x, train=True, mutable=["batch_stats"])
        assert float(upd2["batch_stats"]["act_max"]) == pytest.approx(0.9 * 1.4 + 0.1 * 2.8)
        y = np.asarray(quant.apply(upd, x))
        if not signed:  # step 1.4 / 15: -2.1 -> 0, 0.3 / step = 3.21 -> 3, 1.4 -> 15
            assert "act_min" not in stats
            np.testing.assert_allclose(y, [[0.0, 3 * 1.4 / 15, 1.4]], rtol=1e-6)
            continue
        assert float(stats["act_min"]) == pytest.approx(-2.1)
        assert float(upd2["batch_stats"]["act_min"]) == pytest.approx(0.9 * -2.1 + 0.1 * -4.2)
        # step 3.5 / 15: (0.3 + 2.1) / step = 10.29 -> level 10
        np.testing.assert_allclose(y, [[-2.1, -2.1 + 10 * 3.5 / 15, 1.4]], rtol=1e-6,
                                   atol=1e-6)


@pytest.mark.parametrize("weight_scale,act_clip,names", [
    ("lsq", "lsq", ("weight_step", "act_step")),
    ("max", "pact", ("pact_alpha",)),
])
def test_learned_quantizer_parameters_receive_gradients(weight_scale, act_clip, names):
    quant = QuantConfig(weight_bits=2, act_bits=2, weight_scale=weight_scale,
                        act_clip=act_clip, weight_per_channel=True)
    layer = AnalogDense(8, quant=quant)
    x = jnp.asarray(np.random.default_rng(4).uniform(0, 8, (16, 12)), jnp.float32)
    variables = layer.init(jax.random.key(0), x)

    def loss(params):
        y, _ = layer.apply({**variables, "params": params}, x, train=True,
                           mutable=["batch_stats"])
        return jnp.mean((y - 1.0) ** 2)

    grads = jax.jit(jax.grad(loss))(variables["params"])
    flat = {path[-1].key: g for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
    for name in names:
        assert float(jnp.max(jnp.abs(flat[name]))) > 0, f"{name} got no gradient"
    if weight_scale == "lsq":
        assert variables["params"]["weight_step"].shape == (8,)  # per output channel


def test_read_noise_periphery_uses_the_read_rng():
    """A device with per-read noise takes a fresh key from the Flax rng stream 'read'."""

    @dataclasses.dataclass(frozen=True)
    class ReadNoise:
        sigma: float = 0.1
        needs_key = True

        def forward(self, x, w_eff, w_nominal, key, conv):  # a dense layer: conv is None
            y = x @ w_eff
            return y + self.sigma * jax.random.normal(key, y.shape)

    layer = AnalogDense(3)
    x = _inputs((4,))
    variables = layer.init(jax.random.key(0), x)
    device = Device(periphery=ReadNoise())
    assert device.needs_key and not device.is_ideal
    chip = sample_chip(jax.random.key(1), device, {"kernel": variables["params"]["kernel"]})
    v = with_chip(variables, chip)
    a = layer.apply(v, x, rngs={"read": jax.random.key(2)})
    b = layer.apply(v, x, rngs={"read": jax.random.key(3)})
    ideal = layer.apply(variables, x)
    np.testing.assert_array_equal(a, layer.apply(v, x, rngs={"read": jax.random.key(2)}))
    assert not np.allclose(a, b)
    noise = np.asarray(a - ideal) / 0.1
    assert np.all(np.abs(noise) < 6) and np.std(noise) > 0.2  # unit normal draws
    with pytest.raises(Exception, match="read"):  # no 'read' rng given
        layer.apply(v, x)


def test_unknown_model_and_bad_config():
    with pytest.raises(ValueError, match="model='alexnet'.*lenet5"):
        get_model("alexnet")
    with pytest.raises(ValueError, match="quant"):
        get_model("lenet5", quant="W2A")
    with pytest.raises(ValueError, match="weight_bits"):
        get_model("lenet5", quant="W9A4")
    with pytest.raises(ValueError, match="width"):
        get_model("vgg11", width=0)
    with pytest.raises(ValueError, match="num_classes"):
        get_model("vgg11", num_classes=1)


@pytest.mark.parametrize("name,shape", [("lenet5", (2, 32, 32, 3)), ("resnet20", (2, 28, 28, 1)),
                                        ("vgg11", (32, 32, 3))])
def test_wrong_input_shape_raises_before_compiling(name, shape):
    model = get_model(name, width=0.125)
    with pytest.raises(ValueError, match="expects input of shape"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))


def test_chip_of_another_model_is_rejected():
    model = get_model("lenet5", quant="W2A4")
    variables = random_variables(model)
    other = introspect.analog_kernels(random_variables(get_model("lenet5", width=0.5)))
    chip = numpy_chips(other)
    with pytest.raises(ValueError, match=r"AnalogConv_0 was sampled for a kernel \(5, 5, 1, 3\)"
                                         r".*analog_kernels"):
        jax.eval_shape(model.apply, with_chip(variables, chip), _inputs((28, 28, 1)))
