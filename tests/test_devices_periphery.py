"""Periphery: DAC/ADC/tiles exact against hand-computed cases and a NumPy oracle; noise moments."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pimjax import perchip
from pimjax.devices import periphery
from pimjax.devices.periphery import (
    Periphery,
    conv_patches,
    in_blocks,
    kernel_rows,
    read_noise,
    split_sizes,
)

ADC_STEP = 24.0 / 510  # 9 bits over +-12: 2 * 12 / (2^9 - 2)
DAC_STEP = 2.0 / 126  # 7 bits over +-1


def np_periphery(x, w, scale, sizes, inp_bits=7, out_bits=9, out_bound=12.0, noise=None,
                 bm_rounds=1):
    """NumPy oracle of aihwkit's AnalogMVM (ONE_PASS, ABS_MAX) per tile and input vector."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64) / scale
    y, lo = 0.0, 0
    for j, n in enumerate(sizes):
        xt, wt = x[..., lo:lo + n], w[lo:lo + n]
        a = np.abs(xt).max(axis=-1, keepdims=True)
        a[a == 0] = 1.0
        chosen, done = None, np.zeros(xt.shape[:-1] + (1,), bool)
        for r in range(bm_rounds):
            red = 2.0**r
            xs = xt / (a * red)
            if inp_bits:
                st = 2.0 / (2**inp_bits - 2)
                xs = np.round(xs / st) * st
            xs = np.clip(xs, -1, 1)
            yt = xs @ wt
            if noise is not None:
                yt = yt + 0.06 * noise[j]
            if out_bits:
                st = 2 * out_bound / (2**out_bits - 2)
                yt = np.round(yt / st) * st
            clips = np.any(np.abs(yt) > out_bound, axis=-1, keepdims=True)
            yt = np.clip(yt, -out_bound, out_bound) * a * red
            chosen = yt if chosen is None else np.where(done, chosen, yt)
            done = done | ~clips
        y = y + chosen
        lo += n
    return y * scale


def test_split_sizes_like_aihwkit():
    assert split_sizes(400, 512) == [400]
    assert split_sizes(512, 512) == [512]
    assert split_sizes(513, 512) == [257, 256]
    assert split_sizes(1024, 512) == [512, 512]
    assert split_sizes(1100, 512) == [367, 367, 366]
    assert split_sizes(1100, 0) == [1100]


def test_hand_computed_dac_adc():
    """x = [0.2, -1, 0.6] (abs-max 1), w/scale = [[1, -.5], [.5, .25], [-1, 1]], scale 2."""
    per = Periphery(out_noise=0.0)
    x = jnp.array([[0.2, -1.0, 0.6]])
    w = jnp.array([[2.0, -1.0], [1.0, 0.5], [-2.0, 2.0]])
    y = np.asarray(per.matmul(x, w, 2.0))
    # DAC: 0.2 * 63 = 12.6 -> 13/63; -1 -> -63/63; 0.6 * 63 = 37.8 -> 38/63
    # normalised sums: 13/63 - 0.5 - 38/63 = -0.896825...; -6.5/63 - 0.25 + 38/63 = 0.25
    # ADC (step 24/510): -19.06 -> -19; 5.3125 -> 5; times a = 1 and scale = 2
    np.testing.assert_allclose(y, [[-19 * ADC_STEP * 2, 5 * ADC_STEP * 2]], rtol=1e-6)


def test_hand_computed_noise_management_and_clip():
    """Abs-max 0.5 scales the input up to 1; a 40-row all-ones sum clips at 12."""
    per = Periphery(out_noise=0.0)
    x = jnp.full((1, 40), 0.5)
    y = np.asarray(per.matmul(x, jnp.ones((40, 1)), 1.0))
    np.testing.assert_allclose(y, [[12.0 * 0.5]], rtol=1e-6)


def test_hand_computed_tiles_each_through_its_adc():
    """1024 rows = 2 tiles of 512: each clips at 12 (times its own abs-max) before the sum."""
    per = Periphery(out_noise=0.0)
    x = jnp.concatenate([jnp.full((1, 512), 0.5), jnp.ones((1, 512))], axis=1)
    w = jnp.ones((1024, 1))
    np.testing.assert_allclose(per.matmul(x, w, 1.0), [[12 * 0.5 + 12 * 1.0]], rtol=1e-6)
    one_tile = Periphery(out_noise=0.0, max_input_size=0)
    np.testing.assert_allclose(one_tile.matmul(x, w, 1.0), [[12.0]], rtol=1e-6)


@pytest.mark.parametrize("k", [300, 1100])
@pytest.mark.parametrize("per_column", [False, True])
def test_matmul_matches_numpy_oracle(k, per_column):
    rng = np.random.default_rng(k)
    x = rng.normal(size=(64, k)).astype(np.float32)
    w = rng.normal(size=(k, 24)).astype(np.float32)
    scale = np.abs(w).max(axis=0) if per_column else np.abs(w).max()
    per = Periphery(out_noise=0.0)
    got = np.asarray(per.matmul(jnp.asarray(x), jnp.asarray(w), jnp.asarray(scale)))
    want = np_periphery(x, w, scale, split_sizes(k, 512))
    # float32 vs float64 may round a value sitting on a DAC/ADC half-step differently
    mismatch = np.abs(got - want) > 1e-4 * np.abs(want).max()
    assert mismatch.mean() < 0.01


def test_output_noise_moments_and_redraw():
    per = Periphery(out_bits=None, out_bound=math.inf)
    n = 100_000
    x = jnp.broadcast_to(jnp.array([0.5, -0.25, 0.1]), (n, 3))
    w = jnp.array([[1.0, 0.0], [0.5, -1.0], [0.0, 0.25]])
    keys = jax.random.split(jax.random.key(0), n)
    y = np.asarray(per.matmul(x, w, 2.0, keys), np.float64)
    clean = np.asarray(Periphery(out_noise=0.0, out_bits=None).matmul(x[:1], w, 2.0))
    sigma = 0.06 * 0.5 * 2.0  # out_noise x abs-max x scale
    dev = y - clean
    assert np.all(np.abs(dev.mean(axis=0)) < 5 * sigma / math.sqrt(n))
    assert np.all(np.abs(dev.std(axis=0) - sigma) < 5 * sigma / math.sqrt(2 * n))
    # re-drawn per key, fixed by the key
    k1, k2 = jax.random.key(1), jax.random.key(2)
    a, b = per.matmul(x[:4], w, 2.0, k1), per.matmul(x[:4], w, 2.0, k2)
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, per.matmul(x[:4], w, 2.0, k1))


def test_per_row_keys_do_not_depend_on_chunking():
    per = Periphery()
    x = jax.random.normal(jax.random.key(3), (8, 20))
    w = jax.random.normal(jax.random.key(4), (20, 5))
    keys = jax.random.split(jax.random.key(5), 8)
    full = per.matmul(x, w, 3.0, keys)
    halves = jnp.concatenate([per.matmul(x[:4], w, 3.0, keys[:4]),
                              per.matmul(x[4:], w, 3.0, keys[4:])])
    np.testing.assert_array_equal(full, halves)


def test_missing_key_raises():
    with pytest.raises(ValueError, match="key"):
        Periphery().matmul(jnp.ones((2, 3)), jnp.ones((3, 2)), 1.0)


def np_patches(x, kh, kw):
    """VALID im2col with rows in (c, kh, kw) order, NumPy loops (torch's unfold order)."""
    b, h, wd, c = x.shape
    out = np.zeros((b, h - kh + 1, wd - kw + 1, c * kh * kw), x.dtype)
    for i in range(h - kh + 1):
        for j in range(wd - kw + 1):
            out[:, i, j] = x[:, i:i + kh, j:j + kw, :].transpose(0, 3, 1, 2).reshape(b, -1)
    return out


def test_conv_patches_and_kernel_rows_order():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, 7, 6, 3)).astype(np.float32)
    w = rng.normal(size=(3, 2, 3, 4)).astype(np.float32)  # HWIO
    p = np.asarray(conv_patches(jnp.asarray(x), (3, 2), padding="VALID"))
    np.testing.assert_array_equal(p, np_patches(x, 3, 2))
    rows = np.asarray(kernel_rows(jnp.asarray(w)))
    np.testing.assert_array_equal(rows, w.transpose(2, 0, 1, 3).reshape(-1, 4))


def lax_patches(x, kernel_size, strides, padding):
    """The oracle: JAX's own im2col (a one-hot grouped conv), rows in (c, kh, kw) order."""
    lead = x.shape[:-3]
    p = jax.lax.conv_general_dilated_patches(
        x.reshape((-1, *x.shape[-3:])), kernel_size, strides, padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return p.reshape((*lead, *p.shape[-3:]))


@pytest.mark.parametrize("shape, kernel_size, strides, padding", [
    ((2, 28, 28, 1), (5, 5), (1, 1), "SAME"),
    ((3, 2, 14, 14, 6), (5, 5), (1, 1), "VALID"),  # a chip batch
    ((9, 9, 9, 3), (3, 3), (2, 2), "SAME"),  # 9 images: blocks of 1
    ((2, 8, 7, 4), (3, 2), (2, 1), ((1, 2), (0, 1))),
    ((7, 7, 5), (1, 1), (2, 2), "VALID"),  # one image, no batch
])
def test_conv_patches_equal_lax_patches(shape, kernel_size, strides, padding):
    x = jax.random.normal(jax.random.key(11), shape)
    got = jax.jit(conv_patches, static_argnums=(1, 2, 3))(x, kernel_size, strides, padding)
    np.testing.assert_array_equal(got, lax_patches(x, kernel_size, strides, padding))
    g = jax.grad(lambda x: jnp.sum(jnp.sin(conv_patches(x, kernel_size, strides, padding))))(x)
    g_ref = jax.grad(lambda x: jnp.sum(jnp.sin(lax_patches(x, kernel_size, strides, padding))))(x)
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("key_shape, rest, count", [((3, 4), (5, 6), 1), ((3, 4), (5, 6), 2),
                                                    ((13,), (7,), 1), ((), (4, 3), 3)])
def test_read_noise_is_jax_random_normal_per_key(key_shape, rest, count):
    keys = jax.random.split(jax.random.key(12), max(1, math.prod(key_shape))).reshape(key_shape)
    flat = keys.reshape(-1)
    want = jax.vmap(lambda k: jax.random.normal(k, (count, *rest)))(flat)
    want = jnp.moveaxis(want.reshape((*key_shape, count, *rest)), len(key_shape), 0)
    got = jax.jit(read_noise, static_argnums=(1, 2))(keys, (*key_shape, *rest), count)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("rows", [1, 5, 16, 17, 24])
def test_in_blocks_equals_vmap(rows):
    xs = jnp.arange(rows * 3, dtype=jnp.float32).reshape(rows, 3)
    fn = lambda r: jnp.cumsum(r) * 2.0  # noqa: E731
    np.testing.assert_array_equal(jax.jit(lambda x: in_blocks(fn, x))(xs), jax.vmap(fn)(xs))


def test_conv_matches_numpy_oracle_per_patch():
    rng = np.random.default_rng(7)
    x = np.maximum(rng.normal(size=(2, 9, 9, 6)), 0).astype(np.float32)
    w = rng.normal(size=(5, 5, 6, 8)).astype(np.float32)
    per = Periphery(out_noise=0.0)
    got = np.asarray(per.conv2d(jnp.asarray(x), jnp.asarray(w), float(np.abs(w).max()),
                                padding="VALID"))
    want = np_periphery(np_patches(x, 5, 5), w.transpose(2, 0, 1, 3).reshape(-1, 8),
                        float(np.abs(w).max()), [150])
    mismatch = np.abs(got - want) > 1e-4 * np.abs(want).max()
    assert got.shape == (2, 5, 5, 8) and mismatch.mean() < 0.01


def test_ideal_periphery_is_the_plain_conv():
    per = Periphery(inp_bits=None, out_bits=None, out_bound=math.inf, out_noise=0.0,
                    inp_bound=math.inf)
    x = jax.random.normal(jax.random.key(8), (2, 8, 8, 3))
    w = jax.random.normal(jax.random.key(9), (3, 3, 3, 4))
    want = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(per.conv2d(x, w, 1.7), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("x_per_chip", [False, True])
@pytest.mark.parametrize("strategy", ["cpu", "accelerator"])
def test_chip_batch_equals_each_chip(x_per_chip, strategy, monkeypatch):
    """Both ways of running a chip batch: chip by chip (CPU) and batched (GPU/TPU)."""
    chosen = perchip.CPU if strategy == "cpu" else perchip.ACCELERATOR
    monkeypatch.setattr(perchip, "default_strategy", lambda backend=None: chosen)
    per = Periphery(out_noise=0.0)
    ws = jax.random.normal(jax.random.key(10), (3, 3, 3, 2, 4))
    scales = jnp.max(jnp.abs(ws), axis=(1, 2, 3))  # per column: [C, O]
    x = jax.random.normal(jax.random.key(11), ((3,) if x_per_chip else ()) + (2, 6, 6, 2))
    y = per.conv2d(x, ws, scales)
    for c in range(3):
        xc = x[c] if x_per_chip else x
        np.testing.assert_allclose(y[c], per.conv2d(xc, ws[c], scales[c]), rtol=1e-6, atol=1e-6)
    wd = ws.reshape(3, 18, 4)
    xd = x.reshape(x.shape[:-3] + (-1,))[..., :18]
    yd = per.dense(xd, wd, jnp.max(jnp.abs(wd), axis=(1, 2)))
    for c in range(3):
        xc = xd[c] if x_per_chip else xd
        np.testing.assert_allclose(yd[c], per.dense(xc, wd[c], jnp.max(jnp.abs(wd[c]))),
                                   rtol=1e-6, atol=1e-6)


def test_chip_batch_with_read_noise_equals_each_chip_bit_for_bit():
    """A per-chip input with one key per (chip, image): chip c's output, noise included, is
    the one-chip MVM's on the CPU backend (chips run one by one there)."""
    per = Periphery()
    chips, images = 3, 200
    ws = jax.random.normal(jax.random.key(20), (chips, 5, 5, 6, 16)) * 0.2
    scales = jnp.max(jnp.abs(ws), axis=(1, 2, 3, 4))
    x = jnp.round(jax.random.uniform(jax.random.key(21), (chips, images, 14, 14, 6)) * 15) / 15
    keys = jax.random.split(jax.random.key(22), (chips, images))
    y = jax.jit(lambda x, w, k: per.conv2d(x, w, scales, (1, 1), "VALID", k))(x, ws, keys)
    wd = ws.reshape(chips, 150, 16)
    xd = x.reshape(chips, images, -1)[..., :150]
    yd = jax.jit(lambda x, w, k: per.dense(x, w, scales, k))(xd, wd, keys)
    for c in range(chips):
        one = jax.jit(lambda x, w, s, k: per.conv2d(x, w, s, (1, 1), "VALID", k))
        np.testing.assert_array_equal(y[c], one(x[c], ws[c], scales[c], keys[c]))
        np.testing.assert_array_equal(
            yd[c], jax.jit(per.dense)(xd[c], wd[c], scales[c], keys[c]))
    assert float(jnp.std(y[0] - per.conv2d(x[0], ws[0], scales[0], (1, 1), "VALID",
                                           keys[1]))) > 0  # the noise depends on the keys


def test_conv_result_of_an_image_does_not_depend_on_its_batch():
    """Convs run in blocks of BLOCK_PATCHES patches (the batch padded to whole blocks): an
    image's output, noise included, is the same in a batch of 1, 37 or 90 images."""
    per = Periphery()
    x = jnp.round(jax.random.uniform(jax.random.key(30), (90, 12, 12, 4)) * 15) / 15
    w = jax.random.normal(jax.random.key(31), (3, 3, 4, 8)) * 0.3
    keys = jax.random.split(jax.random.key(32), 90)
    conv = jax.jit(lambda x, k: per.conv2d(x, w, 1.0, (1, 1), "SAME", k))
    full = conv(x, keys)
    assert 90 * 144 > 2 * periphery.BLOCK_PATCHES  # several blocks, the last one padded
    np.testing.assert_array_equal(conv(x[:37], keys[:37]), full[:37])
    np.testing.assert_array_equal(conv(x[53:54], keys[53:54]), full[53:54])
    quiet = Periphery(out_noise=0.0)  # against one pass over all patches, as a matmul
    want = quiet.matmul(conv_patches(x, (3, 3)), kernel_rows(w), 1.0)
    np.testing.assert_allclose(quiet.conv2d(x, w, 1.0), want, rtol=1e-6, atol=1e-6)


def test_conv_memory_does_not_grow_with_the_number_of_layers():
    """XLA's temporaries of 8 periphery convs stay below two of the layers' patch arrays
    (without blocks, each layer kept one: 8 x 56 MiB here)."""
    per = Periphery()
    images = 100
    x = jax.ShapeDtypeStruct((images, 32, 32, 16), jnp.float32)
    w = jax.ShapeDtypeStruct((3, 3, 16, 16), jnp.float32)
    keys = jax.ShapeDtypeStruct((images,), jax.random.key(0).dtype)

    def net(x, w, k):
        for _ in range(8):
            x = jax.nn.relu(per.conv2d(x, w, 1.0, (1, 1), "SAME", k))
        return x

    stats = jax.jit(net).lower(x, w, keys).compile().memory_analysis()
    if stats is None:
        pytest.skip("this backend gives no memory analysis")
    patches = images * 32 * 32 * 144 * 4
    assert stats.temp_size_in_bytes < 2 * patches


def test_iterative_bound_management_matches_oracle():
    per = Periphery(out_noise=0.0, bound_management="iterative")
    assert per.bm_rounds == 5  # reductions 1..16: 16 > max_bm_res / inp_res = 15.75
    rng = np.random.default_rng(12)
    x = rng.uniform(0.2, 1.0, size=(16, 60)).astype(np.float32)
    x[:4] *= 0.05  # some vectors do not clip at all
    w = rng.uniform(0.5, 1.0, size=(60, 3)).astype(np.float32)
    got = np.asarray(per.matmul(jnp.asarray(x), jnp.asarray(w), float(w.max())))
    want = np_periphery(x, w, float(w.max()), [60], bm_rounds=5)
    np.testing.assert_allclose(got, want, rtol=1e-4)
    plain = np.asarray(Periphery(out_noise=0.0).matmul(jnp.asarray(x), jnp.asarray(w),
                                                       float(w.max())))
    assert np.all(np.abs(plain[4:]) <= 12 * np.abs(x[4:]).max(1, keepdims=True) * w.max() + 1e-4)
    assert np.any(np.abs(got) > np.abs(plain) + 1e-3)  # bound management recovered clipped sums


def test_input_gradient_is_straight_through():
    per = Periphery(out_noise=0.0)
    x = jax.random.uniform(jax.random.key(13), (4, 10), minval=-1, maxval=1)
    w = jax.random.normal(jax.random.key(14), (10, 3)) * 0.1
    g = jax.grad(lambda v: jnp.sum(per.matmul(v, w, jnp.max(jnp.abs(w)))))(x)
    np.testing.assert_allclose(g, np.broadcast_to(np.asarray(w).sum(1), (4, 10)), rtol=1e-5)


@pytest.mark.parametrize("field,value", [("inp_bits", 1), ("out_bound", 0.0), ("out_noise", -1.0),
                                         ("max_input_size", -1), ("noise_management", "max"),
                                         ("bound_management", "shift")])
def test_bad_fields_raise(field, value):
    with pytest.raises(ValueError, match=field):
        Periphery(**{field: value})
