"""pimjax.analog.convert on a user's own Flax models written here: a CNN (nn.Conv, nn.Dense,
nn.BatchNorm), a tiny ViT (patch-embedding conv, nn.MultiHeadDotProductAttention whose
projections are nn.DenseGeneral, nn.LayerNorm, MLP) and nn.Einsum layers. Converted with
quantization off on the ideal device each computes the user's float model bit for bit; a
training step under a sampled chip has finite gradients; the Monte-Carlo sweep agrees with a
one-chip-at-a-time loop and chip i is the same under any chunk plan or chip mode; bad rules
fail with one line, before any compile.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import HASH_DEVICE, calibrate

from pimjax import analog, devices, introspect, montecarlo
from pimjax.analog import Rule
from pimjax.layers import CHIP, TUNE, with_chip
from pimjax.quant import QuantConfig

KEY = jax.random.PRNGKey(3)
SHAPE = (8, 8, 1)
N_IMAGES = 64  # montecarlo.MIN_IMAGES_PER_CHUNK: one image chunk
ONE = jax.local_devices()[:1]
# max-abs weight scales: the default MSE search runs op by op in an eager init (~1 s a layer)
W4A4 = QuantConfig(weight_bits=4, act_bits=4, weight_scale="max")


class CNN(nn.Module):
    """A user's CNN, plain Flax: conv-BN-relu, strided conv, flatten, two dense layers."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3))(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
        x = nn.relu(nn.Conv(6, (3, 3), strides=2, padding="VALID")(x))
        x = x.reshape(x.shape[:-3] + (-1,))  # keeps any leading (chip) axes
        x = nn.relu(nn.Dense(16)(x))
        return nn.Dense(10)(x)


class Block(nn.Module):
    """A pre-norm transformer block: attention and an MLP, each with a residual."""

    @nn.compact
    def __call__(self, x):
        x = x + nn.MultiHeadDotProductAttention(num_heads=2)(nn.LayerNorm()(x))
        h = nn.gelu(nn.Dense(16)(nn.LayerNorm()(x)))
        return x + nn.Dense(8)(h)


class ViT(nn.Module):
    """A user's tiny ViT: 4x4 patches embedded by a conv, two blocks, mean-pooled head."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(8, (4, 4), strides=4, padding="VALID")(x)
        x = x.reshape(x.shape[:-3] + (-1, 8))  # [..., tokens, 8], any leading (chip) axes
        x = x + self.param("pos", nn.initializers.normal(0.02), x.shape[-2:])
        for _ in range(2):
            x = Block()(x)
        return nn.Dense(10)(jnp.mean(nn.LayerNorm()(x), axis=-2))


MODELS = {"cnn": CNN, "vit": ViT}
CNN_LAYERS = ["Conv_0", "Conv_1", "Dense_0", "Dense_1"]
ATTENTION = [f"MultiHeadDotProductAttention_0/{p}" for p in ("query", "key", "value", "out")]
VIT_LAYERS = ["Conv_0", *(f"Block_{b}/{p}" for b in (0, 1)
                          for p in (*ATTENTION, "Dense_0", "Dense_1")), "Dense_0"]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((N_IMAGES, *SHAPE)), jnp.float32)
    y = np.asarray(rng.integers(0, 10, N_IMAGES), np.int32)
    return x, y


@pytest.mark.parametrize("name,layers", [("cnn", CNN_LAYERS), ("vit", VIT_LAYERS)])
def test_ideal_float_conversion_is_the_user_model_bit_for_bit(data, name, layers):
    x, _ = data
    model = MODELS[name]()
    converted = analog.convert(model, SHAPE)
    ref = model.init(jax.random.PRNGKey(0), x)
    variables = converted.init(jax.random.PRNGKey(0), x)
    # the user's parameters, same names, shapes and initial values; plus identity tuning
    chex_equal = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), ref["params"],
                              variables["params"])
    assert all(jax.tree.leaves(chex_equal))
    # the same ops on the same operands (a dense's [rows, K] x [K, N] GEMM, the same
    # lax.conv, the bias after), so the same bits
    for train in (False, True):
        want = model.apply(ref, x, train=train, mutable=["batch_stats"])
        got = converted.apply(variables, x, train=train, mutable=["batch_stats"])
        np.testing.assert_array_equal(got[0], want[0])
    ideal = devices.sample_chip(KEY, devices.ideal(), introspect.analog_kernels(variables))
    np.testing.assert_array_equal(converted.apply(with_chip(variables, ideal), x),
                                  model.apply(ref, x))
    assert [layer.name for layer in introspect.analog_layers(converted)] == layers
    if name == "cnn":
        assert introspect.analog_layers(converted)[0].bn_path == ("BatchNorm_0",)
    else:  # the projections' [d, heads, head_dim] kernels sit on [d, heads * head_dim] crossbars
        query = ref["params"]["Block_0"]["MultiHeadDotProductAttention_0"]["query"]["kernel"]
        assert query.shape == (8, 2, 4)
        chip_kernel = introspect.analog_kernels(variables)["Block_0"][
            "MultiHeadDotProductAttention_0"]["query"]["kernel"]
        np.testing.assert_array_equal(chip_kernel, query.reshape(8, 8))


def test_rules_choose_layers_bits_and_digital(data):
    x, _ = data
    rules = (Rule("Conv_0", analog=False), Rule("Dense_1", quant=QuantConfig(weight_bits=8)),
             Rule("Conv_1|Dense_0"))
    converted = analog.convert(CNN(), SHAPE, rules, quant=W4A4)
    variables = converted.init(jax.random.PRNGKey(0), x)
    assert sorted(variables[TUNE]) == ["Conv_1", "Dense_0", "Dense_1"]  # Conv_0 is digital
    stats = variables["batch_stats"]
    assert "act_min" in stats["Conv_0"]["input_quant"]  # signed inputs by default
    assert sorted(stats["Conv_1"]["input_quant"]) == ["act_max", "act_min"]
    unsigned = analog.convert(CNN(), SHAPE, (Rule("Conv_1", input_signed=False),), quant=W4A4)
    assert sorted(unsigned.init(KEY, x)["batch_stats"]["Conv_1"]["input_quant"]) == ["act_max"]
    assert "input_quant" not in stats.get("Dense_1", {})  # 8-bit weights, float activations
    # a layer no rule matches stays the user's float layer
    partial = analog.convert(CNN(), SHAPE, (Rule("Dense_.*"),))
    assert sorted(partial.init(jax.random.PRNGKey(0), x)[TUNE]) == ["Dense_0", "Dense_1"]


@pytest.mark.parametrize("name", ["cnn", "vit"])
def test_gradient_step_under_a_sampled_chip(data, name):
    x, y = data
    converted = analog.convert(MODELS[name](), SHAPE, quant=W4A4)
    variables = converted.init(jax.random.PRNGKey(0), x)
    # the paper's device on the CNN; on the ViT's 14 layers a hash-noise device, whose
    # sampler compiles in no time (jax.random draws compile for ~0.8 s per layer)
    device = devices.paper(0.3) if name == "cnn" else HASH_DEVICE
    template = introspect.analog_kernels({"params": variables["params"],
                                          TUNE: variables[TUNE]})
    chip = devices.sample_chip(KEY, device, template)

    def loss_fn(params):
        v = {**variables, "params": params, CHIP: chip}
        logits, updates = converted.apply(v, x, train=True, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates

    (loss, updates), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        variables["params"])
    assert np.isfinite(float(loss))
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads["Conv_0"]))
    assert float(updates["batch_stats"]["Dense_0"]["input_quant"]["act_max"]) > 0
    if name == "vit":
        attention = grads["Block_0"]["MultiHeadDotProductAttention_0"]
        assert float(jnp.abs(attention["query"]["kernel"]).max()) > 0
    # the chip changes the outputs (it is read at every converted layer)
    plain = converted.apply(variables, x)
    assert not np.array_equal(converted.apply({**variables, CHIP: chip}, x), plain)


@pytest.fixture(scope="module", params=["cnn", "vit"])
def calibrated(data, request):
    x, _ = data
    converted = analog.convert(MODELS[request.param](), SHAPE, quant=W4A4, num_classes=10)
    variables = calibrate(converted, converted.init(jax.random.PRNGKey(0), x), x)
    return converted, variables


def test_sweep_equals_a_one_chip_loop_for_any_chunk_plan(calibrated, data):
    model, variables = calibrated
    x, y = data
    template = introspect.analog_kernels(variables)
    keys = devices.chip_keys(KEY, 5)
    apply = jax.jit(model.apply)
    loop = np.stack([apply(with_chip(variables, devices.sample_chip(k, HASH_DEVICE, template)),
                           x) for k in keys])
    res = montecarlo.evaluate_chips(model, variables, HASH_DEVICE, KEY, 5, (x, y),
                                    chips_per_chunk=2, mesh_devices=ONE, progress=False)
    np.testing.assert_array_equal(res.accuracy, (loop.argmax(-1) == y).mean(-1))
    ref = montecarlo.evaluate_loop(model, variables, HASH_DEVICE, KEY, 5, (x, y))
    np.testing.assert_array_equal(res.accuracy, ref)
    other = montecarlo.evaluate_chips(model, variables, HASH_DEVICE, KEY, 5, (x, y),
                                      chips_per_chunk=8, mesh_devices=ONE, nominal=False,
                                      progress=False)
    assert (res.plan.chips, other.plan.chips) == (2, 5)
    np.testing.assert_array_equal(other.accuracy, res.accuracy)
    np.testing.assert_array_equal(other.loss, res.loss)  # same image chunk: same float sums


def test_chip_logits_are_the_same_whatever_the_chunk_or_mode(calibrated, data):
    model, variables = calibrated
    x, _ = data
    template = introspect.analog_kernels(variables)
    logits = jax.jit(montecarlo.chip_logits, static_argnames=("model", "mode"))

    def chips(start, n):
        keys = devices.chip_keys(KEY, n, start=start)
        return jax.vmap(lambda k: devices.sample_chip(k, HASH_DEVICE, template))(keys)

    all5 = logits(model, variables, chips(0, 5), x, mode="map")
    np.testing.assert_array_equal(logits(model, variables, chips(1, 3), x, mode="map"),
                                  all5[1:4])
    layers = logits(model, variables, chips(0, 5), x, mode="layers")
    np.testing.assert_array_equal(layers.argmax(-1), all5.argmax(-1))
    np.testing.assert_allclose(layers, all5, rtol=1e-4, atol=1e-4)


def test_a_rule_matching_nothing_names_its_pattern():
    with pytest.raises(ValueError, match=r"rule 'Dense_7' matches no Dense/Conv layer") as e:
        analog.convert(CNN(), SHAPE, (Rule("Dense_.*"), Rule("Dense_7")))
    assert "\n" not in str(e.value) and "Conv_0" in str(e.value)
    with pytest.raises(ValueError, match="rule 'Dense_1' matches no"):  # shadowed: first wins
        analog.convert(CNN(), SHAPE, (Rule("Dense_.*"), Rule("Dense_1")))
    with pytest.raises(ValueError, match="not a regular expression"):
        Rule("(")


class Mixer(nn.Module):
    """Weights applied by nn.Einsum: an equation given to the layer or to its call."""

    transposed: bool = False  # a [out, in] kernel: no crossbar product

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape(x.shape[:-3] + (16, 4))  # [..., tokens, 4]
        x = nn.Einsum((4, 2, 3), "...tk,khd->...thd", name="heads")(x)
        x = x.reshape(x.shape[:-2] + (6,))
        if self.transposed:
            return nn.Einsum((5, 6), name="mix")(x, "btk,ok->bto")
        return nn.Einsum((6, 5), name="mix")(x, "btk,ko->bto")


def test_einsum_layers_convert_bit_for_bit(data):
    x, _ = data
    model = Mixer()
    converted = analog.convert(model, SHAPE)
    ref, variables = model.init(KEY, x), converted.init(KEY, x)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)),
                                            ref["params"], variables["params"])))
    np.testing.assert_array_equal(converted.apply(variables, x), model.apply(ref, x))
    kernels = introspect.analog_kernels(variables)
    assert kernels["heads"]["kernel"].shape == (4, 6) and kernels["mix"]["kernel"].shape == (6, 5)
    # a chip batch of 3 through every layer equals each chip alone (float rounding)
    keys = devices.chip_keys(KEY, 3)
    chips = jax.vmap(lambda k: devices.sample_chip(k, HASH_DEVICE, kernels))(keys)
    batch = montecarlo.chip_logits(converted, variables, chips, x[:4], mode="layers")
    one = [converted.apply(with_chip(variables, devices.sample_chip(k, HASH_DEVICE, kernels)),
                           x[:4]) for k in keys]
    np.testing.assert_allclose(batch, np.stack(one), rtol=1e-5, atol=1e-6)


def test_a_layer_without_an_analog_form_names_its_path():
    with pytest.raises(ValueError) as e:
        analog.convert(Mixer(transposed=True), SHAPE)
    msg = str(e.value)
    assert msg.startswith("mix: nn.Einsum 'btk,ok->bto' cannot be converted") and "\n" not in msg
    converted = analog.convert(Mixer(True), SHAPE, (Rule("heads"),))  # mix left digital
    x = jnp.ones((2, *SHAPE))
    np.testing.assert_array_equal(converted.apply(converted.init(KEY, x), x),
                                  Mixer(True).apply(Mixer(True).init(KEY, x), x))

    class Upsample(nn.Module):  # no train flag: train_arg=None
        @nn.compact
        def __call__(self, x):
            return nn.ConvTranspose(2, (2, 2), strides=(2, 2))(nn.Conv(2, (3, 3))(x))

    with pytest.raises(ValueError, match=r"^Upsample.__call__ takes no 'train' keyword"):
        analog.convert(Upsample(), SHAPE)
    with pytest.raises(ValueError, match=r"^ConvTranspose_0: ConvTranspose cannot be converted"):
        analog.convert(Upsample(), SHAPE, train_arg=None)
    assert analog.convert(Upsample(), SHAPE, (Rule("Conv_0"),), train_arg=None).init(
        KEY, jnp.ones((1, *SHAPE)))[TUNE].keys() == {"Conv_0"}

    class Dilated(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return nn.Conv(2, (3, 3), kernel_dilation=2, name="stem")(x)

    with pytest.raises(ValueError, match=r"^stem: nn.Conv with kernel_dilation=2"):
        analog.convert(Dilated(), SHAPE)


def test_vit_rules_attention_bits_and_digital_ends(data):
    """First and last layer digital, the attention projections at 8 bits, the rest W4A4."""
    x, _ = data
    rules = (Rule("Conv_0|Dense_0", analog=False, quant=QuantConfig()),
             Rule(r".*/MultiHeadDotProductAttention_0/\w+",
                  quant=QuantConfig(8, 8, weight_scale="max")),
             Rule(".*"))
    converted = analog.convert(ViT(), SHAPE, rules, quant=W4A4)
    variables = converted.init(KEY, x)
    assert "Conv_0" not in variables[TUNE] and "Dense_0" not in variables[TUNE]
    assert sorted(variables[TUNE]["Block_1"]["MultiHeadDotProductAttention_0"]) == \
        ["key", "out", "query", "value"]
    stats = variables["batch_stats"]
    assert "Conv_0" not in stats  # float: no input quantizer
    assert "act_min" in stats["Block_0"]["MultiHeadDotProductAttention_0"]["query"]["input_quant"]
    logits = converted.apply(variables, x)
    assert logits.shape == (N_IMAGES, 10) and bool(jnp.all(jnp.isfinite(logits)))
    # the same variables with the attention at W4A4: other logits, so the rule's bits apply
    four = analog.convert(ViT(), SHAPE, (rules[0], rules[2]), quant=W4A4)
    assert not np.array_equal(four.apply(variables, x), logits)
