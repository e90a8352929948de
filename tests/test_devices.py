"""Chip sampler: moments against the model, sharing structure, determinism, errors.

Tolerances are derived from the sample size: a sample mean of n i.i.d. draws with
variance v has standard error sqrt(v / n); a sample variance has standard error
about sqrt((m4 - v^2) / n). We allow Z = 5 standard errors (two-sided p ~ 6e-7
per check at the fixed seeds).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pimjax.variability import (
    VariabilityModel,
    between_factors,
    chip_keys,
    nominal_chip,
    sample_chip,
    sample_chips,
    sign_flipped_chips,
)

Z = 5.0
TEMPLATE = {
    "conv": {"kernel": jnp.zeros((3, 3, 4, 8))},
    "dense": {"kernel": jnp.zeros((64, 10))},
}


def _normal_moments(s):
    """Mean, variance and 4th central moment of 1 + s*z."""
    return 1.0, s**2, 3 * s**4


def _lognormal_moments(s):
    """Mean, variance and 4th central moment of exp(s*z)."""
    m = math.exp(s**2 / 2)
    raw = [math.exp(k * k * s**2 / 2) for k in range(5)]  # E[X^k]
    var = raw[2] - m**2
    m4 = raw[4] - 4 * m * raw[3] + 6 * m**2 * raw[2] - 3 * m**4
    return m, var, m4


def _check_moments(x, mean, var, m4):
    n = x.size
    x = np.asarray(x, np.float64)
    assert abs(x.mean() - mean) < Z * math.sqrt(var / n), (x.mean(), mean)
    assert abs(x.var() - var) < Z * math.sqrt((m4 - var**2) / n) + 1e-12, (x.var(), var)


@pytest.mark.parametrize("dist,moments", [("normal", _normal_moments),
                                          ("lognormal", _lognormal_moments)])
@pytest.mark.parametrize("sigma", [0.1, 0.5])
def test_within_factor_moments(dist, moments, sigma):
    template = {"w": jnp.zeros((200, 250))}  # 50,000 cells
    chip = sample_chip(jax.random.key(1), VariabilityModel(sigma, 0.0, distribution=dist), template)
    _check_moments(chip["w"], *moments(sigma))


@pytest.mark.parametrize("dist,moments", [("normal", _normal_moments),
                                          ("lognormal", _lognormal_moments)])
def test_between_factor_moments_across_chips(dist, moments):
    vm = VariabilityModel(0.0, 0.3, "chip", dist)
    chips = sample_chips(jax.random.key(2), vm, {"w": jnp.zeros((2, 3))}, 4000)
    per_chip = chips["w"][:, 0, 0]
    # Shared exactly by all cells of a chip ...
    shared = jnp.broadcast_to(per_chip[:, None, None], (4000, 2, 3))
    np.testing.assert_array_equal(chips["w"], shared)
    # ... with the model's moments across chips.
    _check_moments(per_chip, *moments(0.3))


def test_within_factors_are_independent_across_cells():
    chip = sample_chip(jax.random.key(3), VariabilityModel(0.3), {"w": jnp.zeros((20000, 2))})
    a, b = np.asarray(chip["w"][:, 0]), np.asarray(chip["w"][:, 1])
    r = np.corrcoef(a, b)[0, 1]
    assert abs(r) < Z / math.sqrt(a.size)  # the correlation's standard error is 1/sqrt(n)
    # neighbouring cells along the flat layout too
    flat = np.asarray(chip["w"]).ravel()
    assert abs(np.corrcoef(flat[:-1], flat[1:])[0, 1]) < Z / math.sqrt(flat.size)


def test_layer_granularity_shared_within_layer_independent_across_layers():
    vm = VariabilityModel(0.0, 0.2, "layer")
    template = {f"l{i}": {"kernel": jnp.zeros((3, 4))} for i in range(2)}
    chips = sample_chips(jax.random.key(4), vm, template, 3000)
    l0, l1 = chips["l0"]["kernel"], chips["l1"]["kernel"]
    np.testing.assert_array_equal(l0, jnp.broadcast_to(l0[:, :1, :1], l0.shape))
    np.testing.assert_array_equal(l1, jnp.broadcast_to(l1[:, :1, :1], l1.shape))
    a, b = np.asarray(l0[:, 0, 0]), np.asarray(l1[:, 0, 0])
    assert abs(np.corrcoef(a, b)[0, 1]) < Z / math.sqrt(a.size)
    _check_moments(a, *_normal_moments(0.2))


def test_column_granularity_shared_per_output_column():
    vm = VariabilityModel(0.0, 0.2, "column")
    chips = sample_chips(jax.random.key(5), vm, {"k": jnp.zeros((3, 3, 4, 16))}, 500)
    k = chips["k"]
    # identical down each output column ...
    np.testing.assert_array_equal(k, jnp.broadcast_to(k[:, :1, :1, :1, :], k.shape))
    cols = np.asarray(k[:, 0, 0, 0, :])  # [chips, columns]
    # ... independent across columns and across chips
    assert abs(np.corrcoef(cols[:, 0], cols[:, 1])[0, 1]) < Z / math.sqrt(cols.shape[0])
    _check_moments(cols, *_normal_moments(0.2))


def test_chip_mode_is_shared_across_layers():
    chip = sample_chip(jax.random.key(6), VariabilityModel(0.0, 0.4, "chip"), TEMPLATE)
    v = float(chip["conv"]["kernel"].ravel()[0])
    assert v != 1.0
    for leaf in jax.tree_util.tree_leaves(chip):
        np.testing.assert_array_equal(leaf, v)


@pytest.mark.parametrize("dist", ["normal", "lognormal"])
@pytest.mark.parametrize("granularity", ["chip", "layer", "column"])
def test_total_variance_composes(dist, granularity):
    vm = VariabilityModel(0.2, 0.15, granularity, dist)
    chips = sample_chips(jax.random.key(7), vm, {"k": jnp.zeros((4, 50))}, 3000)
    x = np.asarray(chips["k"], np.float64).ravel()
    # Cells of one chip share the between factor: average per-chip means over chips
    # gives an unbiased mean; its standard error is set by the between component.
    n_chips = chips["k"].shape[0]
    assert abs(x.mean() - vm.factor_mean()) < Z * math.sqrt(vm.factor_variance() / n_chips)
    assert vm.factor_variance() == pytest.approx(0.2**2 + 0.15**2, rel=0.15)
    rel_se = Z * math.sqrt(2.0 / n_chips)  # conservative: at least n_chips effective samples
    assert abs(x.var() / vm.factor_variance() - 1) < rel_se


def test_from_total_splits_variance():
    vm = VariabilityModel.from_total(0.5, 0.36, between_granularity="layer")
    assert vm.sigma_within**2 + vm.sigma_between**2 == pytest.approx(0.25)
    assert vm.sigma_between == pytest.approx(0.3)
    assert vm.between_granularity == "layer"
    with pytest.raises(ValueError, match="between_fraction"):
        VariabilityModel.from_total(0.5, 1.5)


def test_same_key_same_chip_and_different_keys_differ():
    vm = VariabilityModel(0.3, 0.1, "column")
    a = sample_chip(jax.random.key(8), vm, TEMPLATE)
    b = sample_chip(jax.random.key(8), vm, TEMPLATE)
    c = sample_chip(jax.random.key(9), vm, TEMPLATE)
    for x, y, z in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b),
                       jax.tree_util.tree_leaves(c), strict=True):
        np.testing.assert_array_equal(x, y)
        assert not np.array_equal(x, z)
    jitted = jax.jit(lambda k: sample_chip(k, vm, TEMPLATE))(jax.random.key(8))
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(jitted), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)  # eager vs jit: ulps


def test_batched_chips_equal_single_chips():
    vm = VariabilityModel(0.2, 0.1, "layer")
    key = jax.random.key(10)
    chips = sample_chips(key, vm, TEMPLATE, 5)
    keys = chip_keys(key, 5)
    for i in (0, 3):
        single = sample_chip(keys[i], vm, TEMPLATE)
        np.testing.assert_allclose(chips["dense"]["kernel"][i], single["dense"]["kernel"],
                                   rtol=1e-6)
    # chip i's key does not depend on how many chips are drawn or where a chunk starts
    np.testing.assert_array_equal(jax.random.key_data(chip_keys(key, 2, start=3)),
                                  jax.random.key_data(keys[3:5]))


@pytest.mark.parametrize("granularity", ["chip", "layer", "column"])
def test_between_factors_are_what_the_chip_multiplies_in(granularity):
    key = jax.random.key(11)
    vm = VariabilityModel(0.2, 0.3, granularity)
    chip = sample_chip(key, vm, TEMPLATE)
    within_only = sample_chip(key, VariabilityModel(0.2), TEMPLATE)
    between = between_factors(key, vm, TEMPLATE)
    for name in TEMPLATE:
        b = np.asarray(between[name]["kernel"])
        assert b.size == (TEMPLATE[name]["kernel"].shape[-1] if granularity == "column" else 1)
        np.testing.assert_allclose(chip[name]["kernel"], within_only[name]["kernel"] * b,
                                   rtol=1e-6)


def test_sign_flipped_chips_rate_and_definition():
    # two layers, normal between factors 1 + z: a chip flips when either factor is < 0
    n, vm = 4000, VariabilityModel(0.0, 1.0, "layer")
    key = jax.random.key(12)
    flipped = np.asarray(sign_flipped_chips(key, vm, TEMPLATE, n))
    p = 1 - (1 - 0.5 * math.erfc(1 / math.sqrt(2))) ** 2
    assert abs(flipped.mean() - p) < Z * math.sqrt(p * (1 - p) / n), (flipped.mean(), p)
    chips = sample_chips(key, vm, TEMPLATE, 50)  # no within variation: the cells show the sign
    neg = np.any([np.asarray(chips[k]["kernel"] < 0).reshape(50, -1).any(1) for k in TEMPLATE],
                 axis=0)
    np.testing.assert_array_equal(neg, flipped[:50])
    assert not np.any(sign_flipped_chips(key, VariabilityModel(0.0, 1.0, "layer", "lognormal"),
                                         TEMPLATE, 200))


def test_nominal_chip_is_exactly_one_and_sigma_zero_is_nominal():
    ones = nominal_chip(TEMPLATE)
    zero = sample_chip(jax.random.key(0), VariabilityModel(0.0, 0.0), TEMPLATE)
    for a, b in zip(jax.tree_util.tree_leaves(ones), jax.tree_util.tree_leaves(zero), strict=True):
        np.testing.assert_array_equal(a, 1.0)
        np.testing.assert_array_equal(b, 1.0)
    assert VariabilityModel().is_nominal


@pytest.mark.parametrize(
    "kwargs,field",
    [({"sigma_within": -0.1}, "sigma_within"), ({"sigma_between": -1}, "sigma_between"),
     ({"sigma_within": float("nan")}, "sigma_within"), ({"sigma_within": "0.1"}, "sigma_within"),
     ({"between_granularity": "row"}, "between_granularity"),
     ({"distribution": "uniform"}, "distribution")],
)
def test_bad_input(kwargs, field):
    with pytest.raises(ValueError, match=field):
        VariabilityModel(**kwargs)


def test_bad_input_names_allowed_values():
    with pytest.raises(ValueError, match="chip.*layer.*column"):
        VariabilityModel(between_granularity="array")
    with pytest.raises(ValueError, match="normal.*lognormal"):
        VariabilityModel(distribution="gaussian")
    with pytest.raises(ValueError, match="num_chips"):
        chip_keys(jax.random.key(0), 0)
    with pytest.raises(ValueError, match="template"):
        sample_chip(jax.random.key(0), VariabilityModel(0.1), {})
