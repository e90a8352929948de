"""Stuck-at faults: fractions within binomial tolerances, hand-computed cases, chip-fixed."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pimjax.devices.faults import StuckAt


@pytest.mark.parametrize("p_zero,p_gmax", [(0.05, 0.1), (0.001, 0.0), (0.0, 0.02)])
def test_stuck_fractions_are_binomial(p_zero, p_gmax):
    part = StuckAt(p_zero, p_gmax)
    shape = (500, 200)
    state = part.sample(jax.random.key(0), jnp.zeros(shape))
    half = jnp.full(shape, 0.5)
    up, um = part.stick(half, half, state)
    n = math.prod(shape)
    for u in (np.asarray(up), np.asarray(um)):
        for p, value in ((p_zero, 0.0), (p_gmax, 1.0)):
            tol = 5 * math.sqrt(max(p * (1 - p), 1e-12) / n) + 1 / n
            assert abs(np.mean(u == value) - p) < tol
    # the two devices of a pair fail independently
    both = np.mean((np.asarray(up) == 0.0) & (np.asarray(um) == 0.0))
    assert abs(both - p_zero**2) < 5 * math.sqrt(max(p_zero**2 * (1 - p_zero**2), 1e-12) / n) \
        + 1 / n


def test_hand_computed_weights():
    """w = [1, 0.5, -0.5] (scale 1): cell 0's g+ stuck at 0, cell 1's g- at g_max, cell 2 ok."""
    part = StuckAt(p_zero=0.02, p_gmax=0.03)
    state = {"plus": jnp.array([0.01, 0.9, 0.5]), "minus": jnp.array([0.9, 0.04, 0.6])}
    got = part.apply(jnp.array([1.0, 0.5, -0.5]), state)
    np.testing.assert_allclose(got, [0.0, 0.5 - 1.0, -0.5])


def test_per_column_scale():
    part = StuckAt(p_zero=0.0, p_gmax=0.5, per_column=True)
    w = jnp.array([[1.0, -4.0], [0.0, 2.0]])
    state = {"plus": jnp.array([[0.9, 0.1], [0.9, 0.9]]), "minus": jnp.full((2, 2), 0.9)}
    # column 1 has scale 4: its cell (0, 1) = -4 gets g+ = g_max -> (1 - 1) * 4 = 0
    np.testing.assert_allclose(part.apply(w, state), [[1.0, 0.0], [0.0, 2.0]])


def test_chip_fixed_and_batched():
    part = StuckAt(0.1, 0.1)
    tmpl = {"a": jnp.zeros((30, 10)), "b": jnp.zeros((5, 5, 2, 3))}
    s1 = part.sample(jax.random.key(1), tmpl)
    s2 = part.sample(jax.random.key(1), jax.tree_util.tree_map(lambda x: x + 1, tmpl))
    jax.tree_util.tree_map(np.testing.assert_array_equal, s1, s2)
    s3 = part.sample(jax.random.key(2), tmpl)
    assert not np.array_equal(s1["a"]["plus"], s3["a"]["plus"])
    w = jax.random.normal(jax.random.key(3), (30, 10))
    states = jax.vmap(lambda k: part.sample(k, w))(jax.random.split(jax.random.key(4), 2))
    batch = part.apply(jnp.stack([w, w]), states, jnp.zeros((2,)))
    for c in range(2):
        np.testing.assert_array_equal(
            batch[c], part.apply(w, jax.tree_util.tree_map(lambda a, c=c: a[c], states)))


@pytest.mark.parametrize("kwargs,field", [({"p_zero": -0.1}, "p_zero"),
                                          ({"p_gmax": 1.5}, "p_gmax"),
                                          ({"p_zero": 0.6, "p_gmax": 0.6}, "p_zero")])
def test_bad_fractions_raise(kwargs, field):
    with pytest.raises(ValueError, match=field):
        StuckAt(**kwargs)
