"""Quantizers: exact levels and scales, STE gradients, config parsing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pimjax.quant import (
    QuantConfig,
    act_levels,
    lsq_init_scale,
    pact_quantize,
    parse_bits,
    quantize_activations,
    quantize_weights,
    round_ste,
    scale_grad,
    sign_ste,
    weight_levels,
    weight_scale,
)


@pytest.mark.parametrize("bits,q", [(1, 1), (2, 1), (3, 3), (4, 7), (8, 127)])
def test_weight_levels(bits, q):
    assert weight_levels(bits) == q


def test_two_bit_weights_are_ternary_on_hand_made_tensor():
    w = jnp.array([-0.9, -0.3, -0.1, 0.0, 0.24, 0.26, 0.8])
    out = quantize_weights(w, 2, 0.5)
    np.testing.assert_array_equal(out, [-0.5, -0.5, 0.0, 0.0, 0.0, 0.5, 0.5])


def test_four_bit_weights_levels_and_clip():
    w = jnp.array([-2.0, -0.74, -0.26, 0.1, 0.76, 5.0])
    out = quantize_weights(w, 4, 0.25)  # Q = 7: levels k/4, k in -7..7
    np.testing.assert_allclose(out, [-1.75, -0.75, -0.25, 0.0, 0.75, 1.75])


def test_one_bit_is_scaled_sign():
    w = jnp.array([[0.2, -0.4], [-0.6, 0.0]])
    s = weight_scale(w, 1)
    np.testing.assert_allclose(s, 0.3)
    np.testing.assert_allclose(quantize_weights(w, 1, s), [[0.3, -0.3], [-0.3, 0.3]])


def test_max_scale_per_tensor_and_per_channel():
    w = jnp.array([[0.5, -2.0], [-1.5, 1.0]])  # columns are output channels
    np.testing.assert_allclose(weight_scale(w, 3, "max"), 2.0 / 3)
    np.testing.assert_allclose(weight_scale(w, 3, "max", per_channel=True), [1.5 / 3, 2.0 / 3])
    wq = quantize_weights(w, 3, weight_scale(w, 3, "max", per_channel=True))
    # Per-channel: each column's largest magnitude is an exact level.
    np.testing.assert_allclose(jnp.max(jnp.abs(wq), axis=0), [1.5, 2.0], rtol=1e-6)


def test_mse_scale_beats_max_and_is_optimal_on_grid():
    w = jax.random.normal(jax.random.key(0), (4096,))
    w = w.at[0].set(12.0)  # one outlier: max scaling wastes the levels
    s_mse = weight_scale(w, 2, "mse")
    s_max = weight_scale(w, 2, "max")

    def mse(s):
        return float(jnp.mean((quantize_weights(w, 2, s) - w) ** 2))

    assert mse(s_mse) < 0.5 * mse(s_max)
    for ratio in (0.9, 1.1):  # a local optimum over nearby scales
        assert mse(s_mse) <= mse(s_mse * ratio) + 1e-7


def test_activation_levels_unsigned_and_signed():
    x = jnp.array([-1.0, 0.1, 0.2, 0.5, 0.99, 3.0])
    out = quantize_activations(x, 2, 1.0)  # L = 3 levels above zero: k/3
    np.testing.assert_allclose(out, [0.0, 0.0, 1 / 3, 2 / 3, 1.0, 1.0], rtol=1e-6)
    out = quantize_activations(x, 3, 1.5, signed=True)  # L = 3: k/2 for k in -3..3
    np.testing.assert_allclose(out, [-1.0, 0.0, 0.0, 0.5, 1.0, 1.5], rtol=1e-6)
    assert act_levels(4) == 15 and act_levels(4, signed=True) == 7


def test_float_passthrough():
    x = jnp.array([-3.0, 0.3])
    assert quantize_weights(x, None, 1.0) is x
    assert quantize_activations(x, None, 1.0) is x


def test_ste_gradient_inside_one_outside_zero():
    w = jnp.array([-3.0, -0.9, 0.1, 0.6, 0.99, 1.2])
    g = jax.grad(lambda w: jnp.sum(quantize_weights(w, 2, 1.0)))(w)  # range [-1, 1]
    np.testing.assert_array_equal(g, [0, 1, 1, 1, 1, 0])
    x = jnp.array([-0.5, 0.2, 1.9, 2.5])
    g = jax.grad(lambda x: jnp.sum(quantize_activations(x, 4, 2.0)))(x)
    np.testing.assert_array_equal(g, [0, 1, 1, 0])
    g = jax.grad(lambda w: jnp.sum(sign_ste(w)))(jnp.array([-2.0, -0.5, 0.5, 1.5]))
    np.testing.assert_array_equal(g, [0, 1, 1, 0])
    np.testing.assert_array_equal(jax.grad(lambda x: round_ste(x))(0.3), 1.0)


def test_lsq_step_gradient_matches_paper():
    # Esser et al. 2020, eq. 3: d q/d s = round(v) - v inside, -Q / +Q below / above.
    w = jnp.array([-5.0, -0.3, 0.74, 5.0])
    s = 0.5
    g = jax.grad(lambda s, w: quantize_weights(w, 3, s), argnums=0)
    v = w / s
    expected = [-3.0, float(jnp.round(v[1]) - v[1]), float(jnp.round(v[2]) - v[2]), 3.0]
    got = [float(g(s, w[i])) for i in range(4)]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # scale_grad multiplies the gradient and leaves the value.
    f = lambda s: scale_grad(s, 0.1) * 3.0
    assert float(f(2.0)) == 6.0 and float(jax.grad(f)(2.0)) == pytest.approx(0.3)
    np.testing.assert_allclose(lsq_init_scale(jnp.array([1.0, -3.0]), 3), 2 * 2.0 / jnp.sqrt(3.0))


def test_pact_alpha_gradient_counts_clipped_inputs():
    x = jnp.array([-1.0, 0.5, 2.0, 3.0, 7.0])
    g = jax.grad(lambda a: jnp.sum(pact_quantize(x, 4, a)))(2.5)
    assert float(g) == 2.0  # the two inputs above alpha
    g = jax.grad(lambda a: jnp.sum(pact_quantize(x, None, a)))(2.5)
    assert float(g) == 2.0


@pytest.mark.parametrize(
    "spec,w,a",
    [("W2A4", 2, 4), ("W4A8", 4, 8), ("W1A1", 1, 1), ("A8W4", 4, 8), ("fp", None, None),
     ("W4Afp", 4, None), ("w2a4", 2, 4)],
)
def test_parse(spec, w, a):
    cfg = QuantConfig.parse(spec)
    assert (cfg.weight_bits, cfg.act_bits) == (w, a)
    assert QuantConfig.parse(cfg.name) == cfg


@pytest.mark.parametrize("spec", ["W0A4", "W9A4", "W2A0", "W2A9", "W2", "X2A4", "W2A4B", "", "2/4"])
def test_parse_rejects_malformed(spec):
    with pytest.raises(ValueError, match="quant|bits"):
        parse_bits(spec)


@pytest.mark.parametrize(
    "kwargs,field",
    [({"weight_bits": 0}, "weight_bits"), ({"act_bits": 9}, "act_bits"),
     ({"weight_bits": 2.0}, "weight_bits"), ({"weight_scale": "l2"}, "weight_scale"),
     ({"act_clip": "max"}, "act_clip"), ({"act_momentum": 1.0}, "act_momentum")],
)
def test_config_rejects_bad_fields(kwargs, field):
    with pytest.raises(ValueError, match=field):
        QuantConfig(**kwargs)


def test_bad_bits_name_allowed_values():
    with pytest.raises(ValueError, match=r"1\.\.8"):
        QuantConfig(weight_bits=9)
