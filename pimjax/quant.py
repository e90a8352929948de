"""Weight and activation quantizers with straight-through gradients.

All functions are pure. Rounding uses a straight-through estimator (STE): the
forward pass rounds, the backward pass treats rounding as the identity. Clipping
is ordinary ``jnp.clip``, so the gradient is zero outside the quantizer's range
and, for a learned scale, the LSQ gradient (Esser et al., 2020, eq. 3) falls out
of automatic differentiation.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp

WEIGHT_SCALE_ESTIMATORS = ("mse", "max", "lsq")
ACT_CLIPS = ("ema", "pact", "lsq")
MIN_BITS, MAX_BITS = 1, 8
_MSE_GRID = 64  # candidate clip ratios searched by the MSE-optimal scale


def check_bits(bits: int | None, field: str) -> None:
    """Raise ValueError unless ``bits`` is None (float) or an int in 1..8."""
    if bits is None:
        return
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(
            f"{field}={bits!r} is not a valid bitwidth: use an integer in "
            f"{MIN_BITS}..{MAX_BITS}, or None for float"
        )


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Bitwidths and scale estimators of the weight and activation quantizers.

    ``weight_bits``/``act_bits`` of None mean float. ``weight_scale`` is one of
    ``mse`` (MSE-optimal search), ``max`` or ``lsq`` (learned step size);
    ``act_clip`` is one of ``ema`` (running max, the paper's), ``pact`` or ``lsq``.
    """

    weight_bits: int | None = None
    act_bits: int | None = None
    weight_scale: str = "mse"
    weight_per_channel: bool = False
    act_clip: str = "ema"
    act_momentum: float = 0.9

    def __post_init__(self):
        check_bits(self.weight_bits, "weight_bits")
        check_bits(self.act_bits, "act_bits")
        if self.weight_scale not in WEIGHT_SCALE_ESTIMATORS:
            raise ValueError(
                f"weight_scale={self.weight_scale!r} is unknown: use one of "
                f"{WEIGHT_SCALE_ESTIMATORS}"
            )
        if self.act_clip not in ACT_CLIPS:
            raise ValueError(
                f"act_clip={self.act_clip!r} is unknown: use one of {ACT_CLIPS}"
            )
        if not 0.0 <= self.act_momentum < 1.0:
            raise ValueError(f"act_momentum={self.act_momentum!r} must be in [0, 1)")

    @classmethod
    def parse(cls, spec: str, **overrides) -> QuantConfig:
        """Parse ``"W2A4"``, ``"A8W4"``, ``"W1A1"``, ``"W4Afp"`` or ``"fp"`` into a config."""
        return cls(**parse_bits(spec), **overrides)

    @property
    def name(self) -> str:
        """The config's short name, e.g. ``"W2A4"`` or ``"fp"``."""
        if self.weight_bits is None and self.act_bits is None:
            return "fp"
        w = "fp" if self.weight_bits is None else str(self.weight_bits)
        a = "fp" if self.act_bits is None else str(self.act_bits)
        return f"W{w}A{a}"

    @property
    def is_float(self) -> bool:
        """True when neither weights nor activations are quantized."""
        return self.weight_bits is None and self.act_bits is None


_SPEC_RE = re.compile(r"^(?:W(?P<w1>\d+|fp)A(?P<a1>\d+|fp)|A(?P<a2>\d+|fp)W(?P<w2>\d+|fp))$")


def parse_bits(spec: str) -> dict:
    """Parse a quant string into ``{"weight_bits": ..., "act_bits": ...}``."""
    if not isinstance(spec, str):
        raise ValueError(f"quant={spec!r} must be a string like 'W2A4', 'A8W4' or 'fp'")
    s = spec.strip()
    if s.lower() in ("fp", "float", "fp32"):
        return {"weight_bits": None, "act_bits": None}
    m = _SPEC_RE.match(s.upper().replace("FP", "fp"))
    if m is None:
        raise ValueError(
            f"quant={spec!r} is malformed: use 'W<b>A<b>' or 'A<b>W<b>' with b in 1..8 or 'fp' "
            "(e.g. 'W2A4', 'A8W4', 'W4Afp'), or 'fp' for a float model"
        )
    w = m.group("w1") or m.group("w2")
    a = m.group("a1") or m.group("a2")
    out = {
        "weight_bits": None if w == "fp" else int(w),
        "act_bits": None if a == "fp" else int(a),
    }
    check_bits(out["weight_bits"], "weight_bits")
    check_bits(out["act_bits"], "act_bits")
    return out


# --------------------------------------------------------------------------- STE


@jax.custom_vjp
def round_ste(x):
    """Round to nearest; the gradient is the identity (straight-through)."""
    return jnp.round(x)


def _round_ste_fwd(x):
    return jnp.round(x), None


def _round_ste_bwd(_, g):
    return (g,)


round_ste.defvjp(_round_ste_fwd, _round_ste_bwd)


@jax.custom_vjp
def sign_ste(x):
    """Sign with +1 at zero; gradient passes where |x| <= 1 (hardtanh STE)."""
    return jnp.where(x >= 0, 1.0, -1.0).astype(x.dtype)


def _sign_ste_fwd(x):
    return sign_ste(x), x


def _sign_ste_bwd(x, g):
    return (g * (jnp.abs(x) <= 1.0).astype(g.dtype),)


sign_ste.defvjp(_sign_ste_fwd, _sign_ste_bwd)


def scale_grad(x, factor):
    """Identity in the forward pass; multiplies the gradient by ``factor`` (LSQ's g)."""
    return jax.lax.stop_gradient(x - x * factor) + x * factor


# ------------------------------------------------------------------- weights


def weight_levels(bits: int) -> int:
    """Largest integer level Q of a symmetric b-bit weight quantizer: 2^(b-1) - 1."""
    check_bits(bits, "weight_bits")
    return max(2 ** (bits - 1) - 1, 1)


def _reduce_axes(w, per_channel: bool):
    return tuple(range(w.ndim - 1)) if per_channel else tuple(range(w.ndim))


def weight_scale(w, bits: int, estimator: str = "mse", per_channel: bool = False):
    """Scale (step size) of a b-bit weight quantizer, estimated by ``mse`` search or ``max``.

    Shape ``()`` per tensor, or ``(out,)`` per output channel (the last axis).
    For b = 1 the scale is mean|w|, the MSE-optimal scale of the sign quantizer.
    """
    check_bits(bits, "weight_bits")
    axes = _reduce_axes(w, per_channel)
    w = jax.lax.stop_gradient(w)
    if bits == 1:
        return jnp.mean(jnp.abs(w), axis=axes)
    q = weight_levels(bits)
    wmax = jnp.max(jnp.abs(w), axis=axes)
    wmax = jnp.where(wmax > 0, wmax, 1.0)
    if estimator == "max":
        return wmax / q
    if estimator != "mse":
        raise ValueError(
            f"estimator={estimator!r} is unknown here: use 'mse' or 'max' ('lsq' is learned)")
    # Search clip ratios c in (0, 1]: scale = c * max|w| / Q, minimising ||q(w) - w||^2.
    ratios = jnp.linspace(1.0 / _MSE_GRID, 1.0, _MSE_GRID)

    def err(c):
        s = c * wmax / q
        wq = s * jnp.clip(jnp.round(w / s), -q, q)
        return jnp.sum((wq - w) ** 2, axis=axes)

    errs = jax.lax.map(err, ratios)  # [grid, ...scale shape]
    best = ratios[jnp.argmin(errs, axis=0)]
    return best * wmax / q


def lsq_init_scale(w, bits: int, per_channel: bool = False):
    """LSQ's initial step size 2 mean|w| / sqrt(Q) (Esser et al., 2020)."""
    axes = _reduce_axes(w, per_channel)
    return 2.0 * jnp.mean(jnp.abs(w), axis=axes) / jnp.sqrt(weight_levels(bits))


def quantize_weights(w, bits: int | None, scale):
    """Symmetric uniform weight quantizer with STE; ``bits=None`` returns ``w``.

    b >= 2: ``s * clip(round(w / s), -Q, Q)`` with Q = 2^(b-1) - 1; the gradient wrt
    ``w`` is 1 inside [-sQ, sQ] and 0 outside; wrt a learned ``s`` it is LSQ's.
    b = 1: ``s * sign(w)`` (XNOR-style), gradient 1 where |w| <= 1.
    ``scale`` broadcasts against the last axis (per output channel) or is a scalar.
    """
    if bits is None:
        return w
    check_bits(bits, "weight_bits")
    if bits == 1:
        return scale * sign_ste(w)
    q = weight_levels(bits)
    return scale * round_ste(jnp.clip(w / scale, -q, q))


# --------------------------------------------------------------- activations


def act_levels(bits: int, signed: bool = False) -> int:
    """Largest integer level of a b-bit activation quantizer (unsigned: 2^b - 1)."""
    check_bits(bits, "act_bits")
    if signed:
        return max(2 ** (bits - 1) - 1, 1)
    return 2**bits - 1


def quantize_activations(x, bits: int | None, clip, signed: bool = False):
    """Uniform activation quantizer with STE: levels ``clip * k / L``.

    Unsigned (after ReLU): k in 0..L with L = 2^b - 1, values clipped to [0, clip].
    Signed (a network input that can be negative): k in -L..L, L = 2^(b-1) - 1.
    The gradient wrt ``x`` is zero outside the clip range; wrt a learned ``clip``
    it is the LSQ gradient. ``bits=None`` returns ``x`` unchanged.
    """
    if bits is None:
        return x
    levels = act_levels(bits, signed)
    step = clip / levels
    lo = -levels if signed else 0
    return step * round_ste(jnp.clip(x / step, lo, levels))


def quantize_affine(x, bits: int | None, lo, hi):
    """Uniform quantizer over ``[lo, hi]`` with ``2^b`` levels ``lo + k (hi - lo) / (2^b - 1)``.

    For a signed input with an asymmetric range; STE gradient inside the range, zero outside.
    ``bits=None`` returns ``x`` unchanged.
    """
    if bits is None:
        return x
    check_bits(bits, "act_bits")
    levels = 2**bits - 1
    step = jnp.maximum(hi - lo, 1e-8) / levels
    return lo + step * round_ste(jnp.clip((x - lo) / step, 0, levels))


def pact_quantize(x, bits: int | None, alpha, signed: bool = False):
    """PACT: clip to a learned ``alpha`` (gradient 1 where x >= alpha), then quantize."""
    lo = -alpha if signed else 0.0
    y = jnp.minimum(jnp.maximum(x, lo), alpha)
    if bits is None:
        return y
    # y is already in range: round it directly (a second clip would halve the
    # gradient of inputs sitting exactly at alpha).
    step = jax.lax.stop_gradient(alpha) / act_levels(bits, signed)
    return step * round_ste(y / step)
