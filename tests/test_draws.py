"""pimjax.draws against jax.random itself: the same bits for every draw, key kind and shape."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pimjax import devices, draws

KEYS = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.PRNGKey(3),
                                               jnp.arange(5, dtype=jnp.uint32))
SHAPES = [(), (1,), (7,), (3, 4), (5, 5, 2, 3), (1001,), (3, 5, 67)]


def _ref(draw):
    """jax.random's draw over the key batch, jitted as the library's callers are."""
    return jax.jit(jax.vmap(draw))(KEYS)


@pytest.mark.parametrize("shape", SHAPES)
def test_normal_and_uniform_equal_jax_random_bit_for_bit(shape):
    np.testing.assert_array_equal(draws.normal(KEYS, shape),
                                  _ref(lambda k: jax.random.normal(k, shape)))
    np.testing.assert_array_equal(draws.uniform(KEYS, shape),
                                  _ref(lambda k: jax.random.uniform(k, shape)))


@pytest.mark.parametrize("lower", [-1 / 0.3, -2.0])
def test_truncated_normal_equals_jax_random(lower):
    got = jax.jit(lambda k: draws.truncated_normal(k, lower, (2, 3)))(KEYS)
    ref = _ref(lambda k: jax.random.truncated_normal(k, lower, jnp.inf, (2, 3), jnp.float32))
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("data", [0, 7, 2**31 + 5])
def test_fold_in_and_split_equal_jax_random(data):
    np.testing.assert_array_equal(draws.fold_in(KEYS, data),
                                  _ref(lambda k: jax.random.fold_in(k, data)))
    np.testing.assert_array_equal(draws.split(KEYS), _ref(jax.random.split))


def test_normals_draws_each_pair_as_jax_random():
    keys = [KEYS, draws.fold_in(KEYS, 1), draws.fold_in(KEYS, 2)]
    shapes = [(4, 3), (), (2, 5)]
    for got, k, s in zip(draws.normals(keys, shapes), keys, shapes, strict=True):
        np.testing.assert_array_equal(got, jax.jit(jax.vmap(lambda k, s=s: jax.random.normal(
            k, s)))(k))


def test_typed_keys_stay_typed_and_draw_the_same():
    typed = jax.random.wrap_key_data(KEYS)
    np.testing.assert_array_equal(draws.normal(typed, (3,)), draws.normal(KEYS, (3,)))
    folded = draws.fold_in(typed, 4)
    assert jax.dtypes.issubdtype(folded.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(folded), draws.fold_in(KEYS, 4))


def test_chip_and_read_keys_equal_fold_in_chains():
    key = jax.random.PRNGKey(5)
    ids = jnp.arange(4, 9, dtype=jnp.uint32)
    chips = devices.chip_keys(key, 3, start=2)
    np.testing.assert_array_equal(chips, jax.vmap(jax.random.fold_in, (None, 0))(
        key, jnp.arange(2, 5, dtype=jnp.uint32)))

    def per_chip(k):
        root = jax.random.fold_in(jax.random.fold_in(k, devices.base.READ_STREAM), 1)
        return jax.vmap(lambda n: jax.random.fold_in(root, n))(ids)

    want = jax.vmap(per_chip)(chips)
    np.testing.assert_array_equal(devices.read_keys(chips, ids, 1), want)
    typed = devices.read_keys(jax.random.wrap_key_data(chips), ids, 1)  # typed in, typed out
    np.testing.assert_array_equal(jax.random.key_data(typed), want)
    # a layer's read keys: fold_in of its index, for raw and typed key arrays alike
    folded = jax.vmap(jax.vmap(lambda k: jax.random.fold_in(k, 7)))(want)
    for keys in (want, typed):
        np.testing.assert_array_equal(jax.random.key_data(devices.fold_keys(keys, 7)), folded)


@pytest.mark.parametrize("shape", [(9,), (2, 33, 5)])
def test_jitted_draws_equal_single_key_jax_random(shape):
    """Under jit (as the library calls them) and per single key, with no vmap in the oracle."""
    got_n = jax.jit(lambda k: draws.normal(k, shape))(KEYS)
    got_u = jax.jit(lambda k: draws.uniform(k, shape))(KEYS)
    for c in range(KEYS.shape[0]):
        np.testing.assert_array_equal(got_n[c], jax.random.normal(KEYS[c], shape))
        np.testing.assert_array_equal(got_u[c], jax.random.uniform(KEYS[c], shape))
        np.testing.assert_array_equal(draws.normal(KEYS[c], shape),
                                      jax.random.normal(KEYS[c], shape))


def test_typed_keys_equal_jax_random_key():
    key = jax.random.key(11)
    np.testing.assert_array_equal(draws.normal(key, (4, 7)), jax.random.normal(key, (4, 7)))
    np.testing.assert_array_equal(jax.random.key_data(draws.fold_in(key, 3)),
                                  jax.random.key_data(jax.random.fold_in(key, 3)))


def test_fold_in_with_array_data_and_split_of_three():
    data = jnp.arange(5, 12, dtype=jnp.uint32)
    key = jax.random.PRNGKey(9)
    np.testing.assert_array_equal(draws.fold_in(key, data),
                                  jax.vmap(jax.random.fold_in, (None, 0))(key, data))
    np.testing.assert_array_equal(draws.split(KEYS, 3),
                                  _ref(lambda k: jax.random.split(k, 3)))


def test_normals_under_jit_with_odd_sizes():
    keys = [draws.fold_in(KEYS, i) for i in range(4)]
    shapes = [(5, 5, 1, 6), (13,), (), (400, 120)]
    got = jax.jit(lambda ks: draws.normals(ks, shapes))(keys)
    for g, k, s in zip(got, keys, shapes, strict=True):
        np.testing.assert_array_equal(g, _ref_keys(k, lambda kk, s=s: jax.random.normal(kk, s)))


def test_normals_with_repeated_shapes_draw_each_key_on_its_own():
    """Draws of one shape share a hash: each must still be its own key's jax.random draw."""
    keys = [draws.fold_in(KEYS, i) for i in range(5)]
    shapes = [(3, 4), (7,), (3, 4), (3, 4), (7,)]
    got = jax.jit(lambda ks: draws.normals(ks, shapes))(keys)
    for g, k, s in zip(got, keys, shapes, strict=True):
        np.testing.assert_array_equal(g, _ref_keys(k, lambda kk, s=s: jax.random.normal(kk, s)))
    assert not np.array_equal(got[0], got[2])


@pytest.mark.parametrize("typed", [False, True])
def test_fold_ins_equal_fold_in_of_each_index(typed):
    keys = jax.random.wrap_key_data(KEYS) if typed else KEYS
    got = jax.jit(lambda k: draws.fold_ins(k, 6))(keys)
    assert len(got) == 6
    for i, g in enumerate(got):
        assert jax.dtypes.issubdtype(g.dtype, jax.dtypes.prng_key) == typed
        g = jax.random.key_data(g) if typed else g
        np.testing.assert_array_equal(g, _ref(lambda k, i=i: jax.random.fold_in(k, i)))
    one = draws.fold_ins(jax.random.PRNGKey(4), 3)[2]  # a single key, not a batch
    np.testing.assert_array_equal(one, jax.random.fold_in(jax.random.PRNGKey(4), 2))


def _ref_keys(keys, draw):
    """jax.random's draw over a given key batch."""
    return jax.jit(jax.vmap(draw))(keys)


def test_other_settings_fall_back_to_jax_random():
    """Non-partitionable threefry and other PRNG implementations draw with jax.random."""
    with jax.threefry_partitionable(False):
        np.testing.assert_array_equal(draws.normal(KEYS, (3, 5)),
                                      _ref(lambda k: jax.random.normal(k, (3, 5))))
        np.testing.assert_array_equal(draws.fold_in(KEYS, 6),
                                      _ref(lambda k: jax.random.fold_in(k, 6)))
    rbg = jax.random.split(jax.random.key(2, impl="rbg"), 3)
    np.testing.assert_array_equal(draws.uniform(rbg, (4,)),
                                  jax.vmap(lambda k: jax.random.uniform(k, (4,)))(rbg))
    np.testing.assert_array_equal(
        jax.random.key_data(draws.fold_in(rbg, 5)),
        jax.random.key_data(jax.vmap(lambda k: jax.random.fold_in(k, 5))(rbg)))
