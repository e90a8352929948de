"""Per-chip conv/dense on an explicit chip axis: every strategy (the CPU one and the GPU/TPU
one, forced on the CPU) against the plain ops chip by chip, and whole models computed as a
chip batch against the plain per-chip vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import numpy_chips, random_variables

from pimjax import introspect, montecarlo, ops, perchip
from pimjax.layers import with_chip
from pimjax.models import get_model
from pimjax.perchip import ACCELERATOR, CPU, Strategy

# No test here claims bit-identity across programs: compile at the "fast" XLA level
# (most optimizations off, see conftest.py).
pytestmark = pytest.mark.xla_level("fast")

STRATEGIES = {"cpu": CPU, "accelerator": ACCELERATOR,
              "map-shared": Strategy("map", "vmap", "map")}


def _normal(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("strides,padding", [((1, 1), "SAME"), ((2, 2), "SAME"), ((1, 1), "VALID")])
def test_conv_matches_plain_conv_per_chip(strategy, shared, strides, padding):
    w = _normal((3, 3, 3, 4, 5), 0)
    x = _normal((2, 7, 7, 4) if shared else (3, 2, 7, 7, 4), 1)
    y = jax.jit(lambda x, w: perchip.conv2d(x, w, strides, padding, STRATEGIES[strategy]))(x, w)
    assert y.shape[0] == 3
    for c in range(3):
        ref = ops.conv2d(x if shared else x[c], w[c], strides, padding)
        np.testing.assert_allclose(y[c], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("shared", [True, False])
def test_dense_matches_plain_matmul_per_chip(strategy, shared):
    w = _normal((3, 6, 4), 2)
    x = _normal((5, 6) if shared else (3, 5, 6), 3)
    y = perchip.dense(x, w, STRATEGIES[strategy])
    for c in range(3):
        ref = np.asarray(x if shared else x[c], np.float64) @ np.asarray(w[c], np.float64)
        np.testing.assert_allclose(y[c], ref, rtol=1e-5, atol=1e-5)


def test_strategies_and_errors():
    assert perchip.default_strategy("cpu") == CPU
    assert perchip.default_strategy("gpu") == perchip.default_strategy("tpu") == ACCELERATOR
    with pytest.raises(ValueError, match="batched_conv='grouped' is unknown.*map.*vmap"):
        Strategy(batched_conv="grouped")
    with pytest.raises(ValueError, match="3 chips on axis 0, the weights 2"):
        perchip.dense(jnp.ones((3, 5, 6)), jnp.ones((2, 6, 4)))
    with pytest.raises(ValueError, match=r"weights must be \[chips, \*kernel\]"):
        perchip.conv2d(jnp.ones((2, 7, 7, 4)), jnp.ones((3, 3, 4, 5)))


# LeNet-5 (quantized) and a quarter-width ResNet-20 (float: its MSE weight-scale searches
# triple the compile time at XLA's default level; the chip path is the same).
MODELS = {"lenet5": dict(quant="W2A4"), "resnet20": dict(quant="fp", width=0.25)}


@pytest.fixture(scope="module", params=sorted(MODELS))
def case(request):
    """A model with calibrated-looking variables, a batch of 3 chips (factors 1 + 0.3 z), 4
    inputs, and the reference logits [3, 4, 10] by jax.vmap of the plain model over chips."""
    name = request.param
    model = get_model(name, **MODELS[name])
    variables = random_variables(model)
    chips = numpy_chips(introspect.analog_kernels(variables), 3)
    x = _normal((4, *model.input_shape), 4)
    ref = jax.jit(jax.vmap(lambda c: model.apply(with_chip(variables, c), x)))(chips)
    assert ref.shape == (3, 4, 10)
    assert not np.allclose(ref[0], ref[1])  # the chips differ
    return name, variables, chips, x, ref


@pytest.mark.parametrize("strategy", ["cpu", "accelerator"])
def test_chip_batch_of_a_model_equals_per_chip_vmap(case, strategy):
    """``get_model(..., perchip=strategy)`` computes a chip batch as the plain model does chip
    by chip, within float rounding (the GEMM shapes differ, so may the summation order)."""
    name, variables, chips, x, ref = case
    model = get_model(name, **MODELS[name], perchip=STRATEGIES[strategy])
    logits = jax.jit(lambda v, c, x: montecarlo.chip_logits(model, v, c, x, mode="layers"))(
        variables, chips, x)
    np.testing.assert_allclose(logits, ref, rtol=2e-4, atol=2e-4)


def test_chip_map_is_a_map_that_keeps_its_loop_for_one_chip():
    """chip_map equals lax.map, and a batch of one chip still compiles to a loop (XLA would
    inline a loop it knows runs once, and round its body's sums in another order)."""
    x = _normal((3, 50, 10), 0)

    def fn(a):
        return {"sum": jnp.sum(jax.nn.log_softmax(a[0], -1)), "row": a[1] * 2}

    want = jax.lax.map(fn, (x, x[:, 0]))
    got = jax.jit(lambda t: perchip.chip_map(fn, t))((x, x[:, 0]))
    np.testing.assert_allclose(got["sum"], want["sum"], rtol=1e-6)
    np.testing.assert_array_equal(got["row"], want["row"])
    hlo = jax.jit(lambda t: perchip.chip_map(fn, t)).lower((x[:1], x[:1, 0])).compile().as_text()
    assert "while(" in hlo
