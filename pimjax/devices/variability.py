"""The paper's fabrication variability: a multiplicative factor on every analog weight.

One device part (:mod:`pimjax.devices`): a chip's state for each analog layer is the
factor array of that layer, applied to the *quantized* weight, ``w_hat = q(w) * factor``.
Within- and between-chip factors multiply:

* ``normal``:    factor = (1 + eps_w)(1 + eps_b), eps ~ N(0, sigma^2), the paper's within-chip
  model. The between-chip factor is a gain of a whole chip, layer or column (a reference,
  a read voltage, a converter's gain), which cannot be negative: a differential pair cannot
  flip the sign of its layer, and no positive self-tuning gain could undo it. So eps_b is
  truncated to eps_b > -1 (a normal conditioned on a positive gain); at s_b = 0.3 that
  removes 0.04% of the mass and moves the mean by 0.0005. The variance is about
  s_w^2 + s_b^2 (exactly :meth:`VariabilityModel.factor_variance`).
* ``lognormal``: factor = exp(theta_w + theta_b), theta ~ N(0, sigma^2): sign
  preserving, median one, mean exp((s_w^2 + s_b^2) / 2).

Layer ``i`` (in pytree-flatten order of the analog kernels) draws its cells from
``fold_in(fold_in(key, 0), i)``; between-chip factors come from ``fold_in(key, 1)``, so a
chip depends on nothing but its key and the layer shapes.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from pimjax import draws

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
            value = _as_float(getattr(self, field), field)
            if not math.isfinite(value) or value < 0:
                raise ValueError(
                    f"{field}={value!r} must be finite and >= 0 (a standard deviation)")
            object.__setattr__(self, field, value)
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
        vw = self.sigma_within**2
        if self.distribution == "normal":
            mb, vb = _truncated_between_moments(self.sigma_between)
            return (1 + vw) * (vb + mb**2) - mb**2
        v = vw + self.sigma_between**2
        return (math.exp(v) - 1) * math.exp(v)

    def factor_mean(self) -> float:
        """Exact mean of one weight's factor under this model."""
        if self.distribution == "normal":
            return _truncated_between_moments(self.sigma_between)[0]
        return math.exp((self.sigma_within**2 + self.sigma_between**2) / 2)


    def sample(self, key, template):
        """The factor array of every layer of ``template`` (the analog kernels; shapes only)."""
        leaves, treedef = jax.tree_util.tree_flatten(template)
        if not leaves:
            raise ValueError("template has no arrays: pass the model's analog kernels")
        k_within = draws.fold_in(key, _WITHIN)
        between = jax.tree_util.tree_leaves(between_factors(key, self, template))
        shapes = [tuple(jnp.shape(leaf)) for leaf in leaves]
        if self.sigma_within > 0:  # one hash per distinct layer shape (pimjax.draws.normals)
            zs = draws.normals(draws.fold_ins(k_within, len(leaves)), shapes)
            within = [_factor(z, self.sigma_within, self.distribution) for z in zs]
        else:
            within = [jnp.ones(s, jnp.float32) for s in shapes]
        factors = [f * b if self.sigma_between > 0 else f
                   for f, b in zip(within, between, strict=True)]
        return jax.tree_util.tree_unflatten(treedef, factors)

    def apply(self, w, state, t):
        """The weight times this layer's factor (``state``); time has no effect."""
        del t
        return w * state


def _as_float(value, field: str) -> float:
    """A real number (Python, NumPy or 0-d JAX scalar) as a float, else ValueError."""
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{field}={value!r} must be a number >= 0")
    if isinstance(value, numbers.Real):
        return float(value)
    dtype = getattr(value, "dtype", None)
    if dtype is not None and np.ndim(value) == 0 and (
            np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)):
        return float(value)
    raise ValueError(f"{field}={value!r} must be a number >= 0")


def _factor(z, sigma, distribution):
    """A factor from standard normals z: 1 + sigma*z (normal) or exp(sigma*z) (lognormal)."""
    return 1.0 + sigma * z if distribution == "normal" else jnp.exp(sigma * z)


def _draw_between(key, shape, sigma, distribution):
    """A between-chip gain: 1 + sigma*z with z truncated to z > -1/sigma (normal), so that
    the gain stays positive, or exp(sigma*z) (lognormal)."""
    if distribution != "normal":
        return _factor(draws.normal(key, shape), sigma, distribution)
    return 1.0 + sigma * draws.truncated_normal(key, -1.0 / sigma, shape)


def _truncated_between_moments(sigma: float) -> tuple[float, float]:
    """Mean and variance of the normal model's between-chip gain 1 + sigma*z, z > -1/sigma.

    For a standard normal truncated below at a: E z = lam, Var z = 1 + a lam - lam^2 with
    lam = phi(a) / (1 - Phi(a)) (the inverse Mills ratio).
    """
    if sigma == 0:
        return 1.0, 0.0
    a = -1.0 / sigma
    phi = math.exp(-a * a / 2) / math.sqrt(2 * math.pi)
    lam = phi / (0.5 * math.erfc(a / math.sqrt(2)))
    return 1.0 + sigma * lam, sigma**2 * (1 + a * lam - lam**2)


def between_factors(key, variability: VariabilityModel, template):
    """The between-chip factors of the chip drawn from ``key``, one per layer of ``template``.

    Each is a scalar (granularity ``chip``, the same for every layer, or ``layer``) or a
    ``[1, ..., 1, out]`` array (``column``); all ones when ``sigma_between`` is 0. They are
    the factors :meth:`VariabilityModel.sample` multiplies into that chip's cells.
    """
    k_between = draws.fold_in(key, _BETWEEN)
    sigma, dist, gran = (variability.sigma_between, variability.distribution,
                         variability.between_granularity)
    chip_factor = _draw_between(k_between, (), sigma, dist) if sigma else None
    leaves, treedef = jax.tree_util.tree_flatten(template)
    out = []
    for i, leaf in enumerate(leaves):
        shape = tuple(jnp.shape(leaf))
        if sigma == 0:
            out.append(jnp.ones((), jnp.float32))
        elif gran == "chip":
            out.append(chip_factor)
        else:  # "layer": one factor; "column": one per output column (the last axis)
            col_shape = () if gran == "layer" else (1,) * (len(shape) - 1) + shape[-1:]
            out.append(_draw_between(draws.fold_in(k_between, i + 1), col_shape, sigma,
                                     dist))
    return jax.tree_util.tree_unflatten(treedef, out)
