"""Fabrication variability of analog weights: chips as pytrees of factors.

A *chip* is one sample of every analog layer's multiplicative weight factor,
drawn from one PRNG key. It has the structure of the analog kernels
(``{"Conv_0": {"kernel": f0}, ...}``, see :func:`pimjax.layers.analog_kernels`),
so ``jax.vmap(sample_chip, in_axes=(0, None, None))`` over keys gives a batch of
chips and ``jax.vmap`` of a model over that batch is a plain vmap.

Factors are applied to the *quantized* weight: ``w_hat = q(w) * factor``.
Within- and between-chip factors multiply (SPEC "Composition"):

* ``normal``:    factor = (1 + eps_w)(1 + eps_b), eps ~ N(0, sigma^2). Its variance
  is s_w^2 + s_b^2 + s_w^2 s_b^2, i.e. about s_w^2 + s_b^2.
* ``lognormal``: factor = exp(theta_w + theta_b), theta ~ N(0, sigma^2): sign
  preserving, median one, mean exp((s_w^2 + s_b^2) / 2).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

GRANULARITIES = ("chip", "layer", "column")
DISTRIBUTIONS = ("normal", "lognormal")

_WITHIN, _BETWEEN = 0, 1  # fold_in tags that split a chip key into its two components


@dataclasses.dataclass(frozen=True)
class VariabilityModel:
    """Within-chip (per cell) and between-chip (shared) multiplicative variation."""

    sigma_within: float = 0.0
    sigma_between: float = 0.0
    between_granularity: str = "chip"
    distribution: str = "normal"

    def __post_init__(self):
        for field in ("sigma_within", "sigma_between"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{field}={value!r} must be a number >= 0")
            if not math.isfinite(value) or value < 0:
                raise ValueError(
                    f"{field}={value!r} must be finite and >= 0 (a standard deviation)")
        if self.between_granularity not in GRANULARITIES:
            raise ValueError(
                f"between_granularity={self.between_granularity!r} is unknown: "
                f"use one of {GRANULARITIES}"
            )
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"distribution={self.distribution!r} is unknown: use one of {DISTRIBUTIONS}"
            )

    @classmethod
    def from_total(
        cls, sigma_total: float, between_fraction: float, **kwargs
    ) -> VariabilityModel:
        """Split a total sigma so that within^2 + between^2 = total^2.

        ``between_fraction`` is the share of the *variance* that is between-chip.
        """
        if not 0.0 <= between_fraction <= 1.0:
            raise ValueError(f"between_fraction={between_fraction!r} must be in [0, 1]")
        if sigma_total < 0:
            raise ValueError(f"sigma_total={sigma_total!r} must be >= 0")
        return cls(
            sigma_within=float(sigma_total * math.sqrt(1.0 - between_fraction)),
            sigma_between=float(sigma_total * math.sqrt(between_fraction)),
            **kwargs,
        )

    @property
    def is_nominal(self) -> bool:
        """True when the model draws no variation at all."""
        return self.sigma_within == 0.0 and self.sigma_between == 0.0

    def factor_variance(self) -> float:
        """Exact variance of one weight's factor under this model."""
        vw, vb = self.sigma_within**2, self.sigma_between**2
        if self.distribution == "normal":
            return (1 + vw) * (1 + vb) - 1
        v = vw + vb
        return (math.exp(v) - 1) * math.exp(v)

    def factor_mean(self) -> float:
        """Exact mean of one weight's factor under this model."""
        if self.distribution == "normal":
            return 1.0
        return math.exp((self.sigma_within**2 + self.sigma_between**2) / 2)


def _draw(key, shape, sigma, distribution):
    """One component's factor: 1 + sigma*z (normal) or exp(sigma*z) (lognormal)."""
    z = jax.random.normal(key, shape, jnp.float32)
    return 1.0 + sigma * z if distribution == "normal" else jnp.exp(sigma * z)


def sample_chip(key, variability: VariabilityModel, template):
    """Sample one chip: a pytree of weight factors shaped like ``template``.

    ``template`` is any pytree of arrays with the analog kernels' structure
    (usually ``analog_kernels(variables)``); only shapes are read. Layer ``i``
    (in pytree-flatten order) draws its cells from ``fold_in(key_within, i)``,
    so the result depends on nothing but the key and the shapes.
    """
    if not isinstance(variability, VariabilityModel):
        raise ValueError(f"variability must be a VariabilityModel, got {type(variability)}")
    leaves, treedef = jax.tree_util.tree_flatten(template)
    if not leaves:
        raise ValueError("template has no arrays: pass the model's analog kernels")
    k_within = jax.random.fold_in(key, _WITHIN)
    between = between_factors(key, variability, template)
    factors = []
    for i, (leaf, b) in enumerate(zip(leaves, jax.tree_util.tree_leaves(between), strict=True)):
        f = jnp.ones(tuple(leaf.shape), jnp.float32)
        if variability.sigma_within > 0:
            f = _draw(jax.random.fold_in(k_within, i), f.shape, variability.sigma_within,
                      variability.distribution)
        factors.append(f * b if variability.sigma_between > 0 else f)
    return jax.tree_util.tree_unflatten(treedef, factors)


def between_factors(key, variability: VariabilityModel, template):
    """The between-chip factors of the chip drawn from ``key``, one per layer of ``template``.

    Each is a scalar (granularity ``chip``, the same for every layer, or ``layer``) or a
    ``[1, ..., 1, out]`` array (``column``); all ones when ``sigma_between`` is 0. They are
    the factors :func:`sample_chip` multiplies into that chip's cells.
    """
    leaves, treedef = jax.tree_util.tree_flatten(template)
    k_between = jax.random.fold_in(key, _BETWEEN)
    sigma, dist, gran = (variability.sigma_between, variability.distribution,
                         variability.between_granularity)
    chip_factor = _draw(k_between, (), sigma, dist)
    out = []
    for i, leaf in enumerate(leaves):
        shape = tuple(leaf.shape)
        if sigma == 0:
            out.append(jnp.ones((), jnp.float32))
        elif gran == "chip":
            out.append(chip_factor)
        else:  # "layer": one factor; "column": one per output column (the last axis)
            col_shape = () if gran == "layer" else (1,) * (len(shape) - 1) + shape[-1:]
            out.append(_draw(jax.random.fold_in(k_between, i + 1), col_shape, sigma, dist))
    return jax.tree_util.tree_unflatten(treedef, out)


def sign_flipped_chips(key, variability: VariabilityModel, template, num_chips: int):
    """``[num_chips]`` bool: which chips have a negative between-chip factor somewhere.

    A negative factor flips the sign of a whole layer (or column); only the ``normal``
    distribution can draw one. Chip i is drawn as in :func:`sample_chips`.
    """
    def flipped(k):
        leaves = jax.tree_util.tree_leaves(between_factors(k, variability, template))
        return jnp.any(jnp.stack([jnp.any(b < 0) for b in leaves]))

    return jax.vmap(flipped)(chip_keys(key, num_chips))


def sample_chips(key, variability: VariabilityModel, template, num_chips: int):
    """Sample ``num_chips`` chips stacked on a leading axis; chip i uses ``fold_in(key, i)``."""
    keys = chip_keys(key, num_chips)
    return jax.vmap(lambda k: sample_chip(k, variability, template))(keys)


def chip_keys(key, num_chips: int, start: int = 0):
    """Keys of chips ``start .. start+num_chips-1``: chip i's key is ``fold_in(key, i)``."""
    if int(num_chips) <= 0:
        raise ValueError(f"num_chips={num_chips!r} must be a positive integer")
    idx = jnp.arange(start, start + num_chips, dtype=jnp.uint32)
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, idx)


def nominal_chip(template):
    """The variation-free chip: every factor is exactly one."""
    return jax.tree_util.tree_map(lambda w: jnp.ones(jnp.shape(w), jnp.float32), template)
