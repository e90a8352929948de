"""Tests for pimjax.data.normalize and pimjax.data.augment against NumPy oracles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pimjax import data


def test_normalize_constants_and_jit():
    img = np.full((2, 4, 4, 3), 128, np.uint8)
    mean, std = data.MEAN_STD["cifar10"]
    want = (128 / 255 - np.array(mean)) / np.array(std)
    f = jax.jit(data.normalize, static_argnames="name")
    for out in (data.normalize(img, "cifar10"), f(jnp.asarray(img), name="cifar10"),
                data.normalize(img, "cifar10-jpeg"), data.normalize(img, "tfds:cifar10")):
        np.testing.assert_allclose(np.asarray(out)[0, 0, 0], want, rtol=1e-5)
    with pytest.raises(ValueError, match="channel"):
        data.normalize(img, "mnist")
    with pytest.raises(ValueError, match="unknown dataset"):
        data.normalize(img, "svhn")


def crops_and_flips(img: np.ndarray, pad: int = 4):
    h, w = img.shape[:2]
    padded = np.pad(img, ((pad, pad), (pad, pad), (0, 0)))
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[dy:dy + h, dx:dx + w]
            yield (dy, dx, False), crop
            yield (dy, dx, True), crop[:, ::-1]


def test_augment_properties():
    # Eager jax.random ops compile slowly on CPU: build inputs with numpy.
    x = np.random.default_rng(0).uniform(1, 2, (16, 8, 8, 3)).astype(np.float32)  # nonzero
    key = jax.random.PRNGKey(42)
    aug = data.augment  # jitted itself
    out = np.asarray(aug(key, x))
    assert out.shape == x.shape and out.dtype == np.float32
    np.testing.assert_array_equal(out, np.asarray(data.augment(key, x)))  # same key, same result
    assert not np.array_equal(out, np.asarray(aug(jax.random.PRNGKey(1), x)))
    assert not np.array_equal(out, x)
    seen = set()
    for img, res in zip(x, out, strict=True):
        matches = [p for p, cand in crops_and_flips(img) if np.array_equal(cand, res)]
        assert matches, "output is not a padded crop / flip of its input"
        seen.add(matches[0][2])
    assert seen == {False, True}  # both flipped and unflipped images in the batch


def test_augment_known_pixels():
    img = np.arange(1, 5, dtype=np.float32).reshape(1, 2, 2, 1)  # [[1,2],[3,4]]
    batch = np.tile(img, (512, 1, 1, 1))
    outs = {tuple(row) for row in np.asarray(data.augment(jax.random.PRNGKey(0), batch, pad=1))
            .reshape(512, 4).tolist()}
    # Identity, flip, and e.g. a shift down-right by one pixel (zero row/column come in).
    assert {(1, 2, 3, 4), (2, 1, 4, 3), (0, 0, 0, 1)} <= outs
    assert len(outs) == 18  # 3x3 offsets x flip, all distinct for this image
    with pytest.raises(ValueError, match="batch"):
        data.augment(jax.random.PRNGKey(0), img[0])
