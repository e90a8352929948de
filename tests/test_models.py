"""Analog layers and models: chips as arguments, determinism, vmap, quantizer wiring, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pimjax.layers import AnalogConv, AnalogDense, analog_kernels, with_chip
from pimjax.models import ModelConfig, get_model
from pimjax.quant import QuantConfig, quantize_activations, quantize_weights, weight_scale
from pimjax.variability import VariabilityModel, nominal_chip, sample_chip, sample_chips

SMALL = {"lenet5": 1.0, "vgg11": 0.125, "resnet20": 0.25, "resnet18": 0.0625}


def _init(model, shape, batch=2, seed=0):
    x = jax.random.normal(jax.random.key(seed + 100), (batch, *shape))
    return jax.jit(model.init)(jax.random.key(seed), x), x


@pytest.fixture(scope="module")
def lenet():
    model = get_model("lenet5", quant="W2A4")
    variables, x = _init(model, (28, 28, 1), batch=4)
    # one train-mode pass so that the running activation clips are set
    _, upd = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, x)
    return model, {**variables, **upd}, x


@pytest.mark.parametrize("name", sorted(SMALL))
def test_nominal_chip_equals_no_chip_bit_for_bit(name):
    model = get_model(name, quant="W2A4", width=SMALL[name])
    variables, x = _init(model, ModelConfig(name).input_shape)
    template = analog_kernels(variables)
    apply = jax.jit(model.apply)
    plain = apply(variables, x)
    nominal = apply(with_chip(variables, nominal_chip(template)), x)
    np.testing.assert_array_equal(plain, nominal)
    noisy = apply(with_chip(variables, sample_chip(jax.random.key(1), VariabilityModel(0.3),
                                                   template)), x)
    assert not np.allclose(plain, noisy)
    assert plain.shape == (2, 10)


def test_vmap_over_chips_equals_python_loop(lenet):
    model, variables, x = lenet
    template = analog_kernels(variables)
    chips = sample_chips(jax.random.key(3), VariabilityModel(0.3, 0.1, "column"), template, 8)
    run = jax.jit(lambda chip: model.apply(with_chip(variables, chip), x))
    batched = jax.jit(jax.vmap(lambda chip: model.apply(with_chip(variables, chip), x)))(chips)
    for i in range(8):
        chip_i = jax.tree_util.tree_map(lambda c, i=i: c[i], chips)
        np.testing.assert_allclose(batched[i], run(chip_i), rtol=1e-5, atol=1e-5)
    assert not np.allclose(batched[0], batched[1])


def test_same_chip_same_logits_different_chips_differ(lenet):
    model, variables, x = lenet
    template = analog_kernels(variables)
    vm = VariabilityModel(0.3)
    run = jax.jit(lambda k: model.apply(with_chip(variables, sample_chip(k, vm, template)), x))
    np.testing.assert_array_equal(run(jax.random.key(5)), run(jax.random.key(5)))
    assert not np.array_equal(run(jax.random.key(5)), run(jax.random.key(6)))


def test_dense_quantizes_then_perturbs():
    quant = QuantConfig(weight_bits=3, act_bits=4, weight_scale="max")
    layer = AnalogDense(5, quant=quant)
    x = jax.random.uniform(jax.random.key(0), (7, 6), maxval=2.0)
    variables = layer.init(jax.random.key(1), x)
    variables = {**variables, "batch_stats": {"input_quant": {"act_max": jnp.array(1.5)}}}
    factor = 1.0 + 0.3 * jax.random.normal(jax.random.key(2), (6, 5))
    got = layer.apply(with_chip(variables, {"kernel": factor}), x)
    w = variables["params"]["kernel"]
    wq = quantize_weights(w, 3, weight_scale(w, 3, "max"))
    want = quantize_activations(x, 4, 1.5) @ (wq * factor)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # perturbing the float weight instead gives a different answer
    assert not np.allclose(got, quantize_activations(x, 4, 1.5) @ quantize_weights(
        w * factor, 3, weight_scale(w * factor, 3, "max")), atol=1e-4)


def test_tune_gain_and_offset_apply_to_mvm_output():
    layer = AnalogConv(3, kernel_size=(3, 3))
    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 2))
    variables = layer.init(jax.random.key(1), x)
    base = layer.apply(variables, x)
    tune = {"gain": jnp.array([2.0, 0.5, 1.0]), "offset": jnp.array([0.0, 1.0, -1.0])}
    got = layer.apply({**variables, "tune": tune}, x)
    np.testing.assert_allclose(got, base * tune["gain"] + tune["offset"], rtol=1e-6)
    _, inter = layer.apply(variables, x, mutable=["intermediates"])
    np.testing.assert_array_equal(inter["intermediates"]["mvm"][0], base)
    # training leaves self-tuning out: it corrects a fabricated chip, after training
    np.testing.assert_array_equal(layer.apply({**variables, "tune": tune}, x, train=True),
                                  layer.apply(variables, x, train=True))


def test_digital_first_last_are_not_analog():
    model = get_model("lenet5", quant="W2A4", digital_first_last=True)
    variables, x = _init(model, (28, 28, 1))
    analog = analog_kernels(variables)
    assert sorted(analog) == ["AnalogConv_1", "AnalogDense_0", "AnalogDense_1"]
    # a chip that only touches analog layers; the digital layers read no chip
    chip = sample_chip(jax.random.key(0), VariabilityModel(0.5), analog)
    full = {**chip, "AnalogConv_0": {"kernel": jnp.zeros((5, 5, 1, 6))}}
    apply = jax.jit(model.apply)
    np.testing.assert_array_equal(apply(with_chip(variables, chip), x),
                                  apply(with_chip(variables, full), x))


def test_running_max_clip_tracks_activations(lenet):
    model, variables, x = lenet
    act_max = variables["batch_stats"]["AnalogConv_0"]["input_quant"]["act_max"]
    assert float(act_max) == pytest.approx(float(jnp.max(jnp.abs(x))), rel=1e-5)
    _, upd = model.apply(variables, 2 * x, train=True, mutable=["batch_stats"])
    new = upd["batch_stats"]["AnalogConv_0"]["input_quant"]["act_max"]
    assert float(new) == pytest.approx(0.9 * float(act_max) + 0.1 * 2 * float(act_max), rel=1e-5)


@pytest.mark.parametrize("weight_scale_method,act_clip,names", [
    ("lsq", "lsq", ("weight_step", "act_step")),
    ("max", "pact", ("pact_alpha",)),
])
def test_learned_quantizer_parameters_receive_gradients(weight_scale_method, act_clip, names):
    quant = QuantConfig(weight_bits=2, act_bits=2, weight_scale=weight_scale_method,
                        act_clip=act_clip, weight_per_channel=True)
    model = get_model("lenet5", quant=quant)
    variables, x = _init(model, (28, 28, 1), batch=8)

    def loss(params):
        logits, _ = model.apply({**variables, "params": params}, x, train=True,
                                mutable=["batch_stats"])
        return jnp.mean(logits**2)

    grads = jax.jit(jax.grad(loss))(variables["params"])
    flat = {"/".join(str(k.key) for k in path): v
            for path, v in jax.tree_util.tree_flatten_with_path(grads)[0]}
    for name in names:
        hits = [v for k, v in flat.items() if k.endswith(name)]
        assert hits, f"no {name} parameter"
        assert any(float(jnp.max(jnp.abs(v))) > 0 for v in hits), f"{name} got no gradient"
    if weight_scale_method == "lsq":
        step = variables["params"]["AnalogConv_1"]["weight_step"]
        assert step.shape == (16,)  # per output channel


def test_per_channel_weight_scale_in_layer():
    quant = QuantConfig(weight_bits=2, weight_scale="max", weight_per_channel=True)
    layer = AnalogDense(4, quant=quant)
    x = jnp.eye(6)
    variables = layer.init(jax.random.key(0), x)
    w = variables["params"]["kernel"]
    out = layer.apply(variables, x)  # identity input: the output is the quantized kernel
    np.testing.assert_allclose(jnp.abs(out), jnp.broadcast_to(jnp.max(jnp.abs(w), 0), w.shape)
                               * (jnp.abs(out) > 0), rtol=1e-6)


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


def test_chip_shape_mismatch(lenet):
    model, variables, x = lenet
    template = analog_kernels(variables)
    bad = jax.tree_util.tree_map(lambda w: jnp.ones(w.shape), template)
    bad["AnalogDense_0"]["kernel"] = jnp.ones((10, 10))
    with pytest.raises(ValueError, match="AnalogDense_0.*analog_kernels"):
        model.apply(with_chip(variables, bad), x)
