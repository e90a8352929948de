"""Pure JAX transforms of image batches: normalization and training augmentation."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp

from pimjax.data.registry import DATASETS, MEAN_STD


def base_name(name: str) -> str:
    """Dataset name from a name or provenance tag ("tfds:mnist", "cifar10-jpeg")."""
    base = re.sub(r"^tfds:", "", name).split("-")[0]
    if base not in MEAN_STD:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")
    return base


@functools.partial(jax.jit, static_argnames="name")
def normalize(images, name: str) -> jnp.ndarray:
    """Map uint8 pixels to float32 standardized by the dataset's per-channel MEAN_STD."""
    mean, std = MEAN_STD[base_name(name)]
    x = jnp.asarray(images, jnp.float32)
    if x.shape[-1] != len(mean):
        raise ValueError(f"{name} has {len(mean)} channel(s), images have shape {x.shape}")
    return (x / 255.0 - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


@functools.partial(jax.jit, static_argnames="pad")
def augment(key: jax.Array, images: jnp.ndarray, pad: int = 4) -> jnp.ndarray:
    """Per-image random crop (zero padding of `pad` pixels) and random horizontal flip."""
    if images.ndim != 4:
        raise ValueError(f"augment expects a batch [B,H,W,C], got shape {images.shape}")
    b, h, w, c = images.shape
    k_crop, k_flip = jax.random.split(key)
    offsets = jax.random.randint(k_crop, (b, 2), 0, 2 * pad + 1)
    flips = jax.random.bernoulli(k_flip, 0.5, (b,))
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

    def one(img, off, flip):
        out = jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))
        return jnp.where(flip, out[:, ::-1], out)

    return jax.vmap(one)(padded, offsets, flips)
