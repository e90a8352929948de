"""pimjax.introspect and the layer hooks: the analog layers of each model, partial forward
passes (run_to_layer, layer_output, apply_from_layer, capture_mvm) and intercept_mvm edits
on the trained LeNet-5 against the NumPy re-implementation (tests/lenet_oracle.py)."""

import jax
import jax.numpy as jnp
import lenet_oracle
import numpy as np
import pytest
from helpers import numpy_chips

from pimjax import data, introspect
from pimjax.layers import intercept_mvm, with_chip, with_tune
from pimjax.models import get_model

# No test here claims bit-identity across programs: compile at the "fast" XLA level
# (most optimizations off, see conftest.py).
pytestmark = pytest.mark.xla_level("fast")

LENET_LAYERS = lenet_oracle.ANALOG


def assert_mostly_close(got, want, rtol=1e-4, atol=1e-4, fraction=0.995):
    """float32 against float64: all but a rare activation that rounds to the neighbouring
    quantizer level agree closely."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    close = np.isclose(got, want, rtol=rtol, atol=atol)
    assert close.mean() >= fraction, close.mean()


@pytest.fixture(scope="module")
def lenet(trained, mnist):
    """The trained qat LeNet-5 on a chip, with a non-identity tune, and 16 test images."""
    run = trained["qat"]
    template = introspect.analog_kernels(run.variables)
    chip = numpy_chips(template, sigma=0.2, seed=3)
    rng = np.random.default_rng(4)
    tune = jax.tree.map(lambda t: jnp.asarray(t + 0.1 * rng.standard_normal(t.shape),
                                              jnp.float32), run.variables["tune"])
    variables = with_tune(with_chip(run.variables, chip), tune)
    factors = {name: chip[name]["kernel"].states[0] for name in LENET_LAYERS}
    tunes = {name: (tune[name]["gain"], tune[name]["offset"]) for name in LENET_LAYERS}
    x = data.normalize(mnist[1].images[:16], "mnist")
    return run.model, variables, x, dict(factors=factors, tune=tunes)


def oracle(lenet, **kwargs):
    model, variables, x, chip = lenet
    return lenet_oracle.forward(variables, x, **chip, **kwargs)


def test_lenet_analog_layers():
    model = get_model("lenet5", quant="W2A4")
    layers = introspect.analog_layers(model)
    assert [layer.name for layer in layers] == list(LENET_LAYERS)
    assert [layer.path for layer in layers] == [(name,) for name in LENET_LAYERS]
    assert [layer.bn_path for layer in layers] == [
        ("BatchNorm_0",), ("BatchNorm_1",), ("BatchNorm_2",), ("BatchNorm_3",), None]
    assert [layer.bias for layer in layers] == [False] * 4 + [True]
    assert [layer.features for layer in layers] == [6, 16, 120, 84, 10]
    # elements per image in and out: 28x28x1 -> 28x28x6 (SAME), 14x14x6 -> 10x10x16 (VALID)
    assert [(layer.in_size, layer.out_size) for layer in layers] == [
        (784, 4704), (1176, 1600), (400, 120), (120, 84), (84, 10)]
    assert all(layer.bn_epsilon == 1e-5 for layer in layers[:4])
    assert introspect.chip_mode(model) == "layers"  # later inputs are small next to 4704
    # 2 FLOPs per multiply-add: outputs x kernel fan-in
    assert introspect.forward_flops(model) == 2 * (
        4704 * 25 + 1600 * 150 + 120 * 400 + 84 * 120 + 10 * 84)
    assert introspect.input_shape(model) == (28, 28, 1)


def test_resnet_and_digital_layers():
    resnet = get_model("resnet20", width=0.25)
    layers = introspect.analog_layers(resnet)
    assert len(layers) == 19 + 2 + 1  # 19 convs in the stem and blocks, 2 shortcuts, 1 dense
    assert sum(layer.name.endswith("shortcut") for layer in layers) == 2
    assert all(layer.bn_path for layer in layers[:-1]) and layers[-1].bn_path is None
    assert introspect.chip_mode(resnet) == "map"
    dfl = get_model("lenet5", quant="W2A4", digital_first_last=True)
    assert [layer.name for layer in introspect.analog_layers(dfl)] == list(LENET_LAYERS[1:4])
    abstract = introspect.abstract_variables(dfl)
    assert sorted(introspect.analog_kernels(abstract)) == list(LENET_LAYERS[1:4])
    with pytest.raises(ValueError, match="'params' and 'tune'"):
        introspect.analog_kernels({"params": abstract["params"]})
    with pytest.raises(ValueError, match="no input_shape"):
        introspect.input_shape(object())


def test_capture_mvm_against_numpy(lenet):
    model, variables, x, _ = lenet
    got = jax.jit(introspect.capture_mvm, static_argnames="model")(model, variables, x)
    _, want = oracle(lenet)
    assert sorted(got) == sorted(LENET_LAYERS)
    for name in LENET_LAYERS:
        assert_mostly_close(got[name], want[name])


def test_run_to_layer_with_an_edit(lenet):
    """The MVM output of AnalogDense_0, with AnalogConv_1's MVM output halved on the way."""
    model, variables, x, _ = lenet
    path = ("AnalogDense_0",)

    def halve(p, y):
        return 0.5 * y if p == ("AnalogConv_1",) else y

    run = jax.jit(introspect.run_to_layer, static_argnames=("model", "path", "edit"))
    got = run(model, variables, x, path, halve)
    _, want = oracle(lenet, edit=lambda name, y: 0.5 * y if name == "AnalogConv_1" else y)
    assert got.shape == (16, 120)
    assert_mostly_close(got, want["AnalogDense_0"])
    _, unedited = oracle(lenet)
    assert not np.allclose(got, unedited["AnalogDense_0"], atol=1e-2)
    with pytest.raises(ValueError, match="BatchNorm_0 is not an analog layer"):
        jax.eval_shape(lambda v, x: introspect.run_to_layer(model, v, x, ("BatchNorm_0",)),
                       variables, x)


def test_layer_output_applies_tune_and_bias(lenet):
    model, variables, x, chip = lenet
    path = ("AnalogDense_2",)
    got = jax.jit(introspect.layer_output, static_argnames=("model", "path"))(
        model, variables, x, path)
    logits, mvm = oracle(lenet)
    assert_mostly_close(got, logits)  # the last layer's output is the logits
    gain, offset = chip["tune"]["AnalogDense_2"]
    bias = variables["params"]["AnalogDense_2"]["bias"]
    assert_mostly_close(got, mvm["AnalogDense_2"] * gain + offset + bias)


def test_apply_from_layer(lenet):
    """The rest of the network from a given output of AnalogDense_0 (after tune and bias)."""
    model, variables, x, _ = lenet
    path = ("AnalogDense_0",)
    y = jnp.asarray(np.random.default_rng(5).standard_normal((16, 120)), jnp.float32)
    got = jax.jit(introspect.apply_from_layer, static_argnames=("model", "path"))(
        model, variables, x, path, y)
    want, _ = oracle(lenet, start=("AnalogDense_0", y))
    assert_mostly_close(got, want)
    assert not np.allclose(got, oracle(lenet)[0], atol=1e-2)


def test_intercept_mvm_edits_the_mvm_output(lenet):
    """Doubling the last layer's MVM output: logits = 2 mvm * gain + offset + bias."""
    model, variables, x, _ = lenet

    def double_last(path, y):
        return 2.0 * y if path == ("AnalogDense_2",) else y

    @jax.jit
    def edited(variables, x):
        with intercept_mvm(double_last):
            return model.apply(variables, x)

    got = edited(variables, x)
    want, _ = oracle(lenet, edit=lambda name, y: 2.0 * y if name == "AnalogDense_2" else y)
    assert_mostly_close(got, want)
    same = jax.jit(lambda v, x: introspect.apply_with_mvm(model, v, x, double_last))
    np.testing.assert_array_equal(same(variables, x), got)


def test_num_chips_is_the_chip_axis(lenet):
    model, variables, _, _ = lenet
    template = introspect.analog_kernels(variables)
    assert introspect.num_chips(numpy_chips(template)) is None
    assert introspect.num_chips(numpy_chips(template, 3)) == 3
