"""``jax.random``'s threefry draws, bit for bit, as plain array code that XLA:CPU fuses.

On the CPU backend JAX lowers the threefry hash as a 5-step ``while`` loop (to keep programs
small), so every draw materializes its four ``uint32`` state arrays five times, and every
call site is a loop of its own that XLA compiles separately. A LeNet-5 chip sampler (one
``normal`` per layer and part) took 13 s to compile; per-read noise of the PCM periphery
(one normal per chip, image and output) spent most of a sweep in those loops.

Here the 20 rounds are unrolled into ordinary ``uint32`` ops, so a draw is one elementwise
fusion that XLA merges with its consumer (the noise never materializes); :func:`normals`
draws many ``(key, shape)`` pairs with one hash per distinct shape and :func:`fold_ins` folds
a range of indices into a key with one hash (with a hash per layer and stream, ResNet-20's PCM
chip sampler took 16.4 s of XLA compile, now 7.8 s: ``benchmarks/compile_time.py
--programs``). The values equal
``jax.random.fold_in``/``normal``/``uniform`` with the default threefry implementation and
``jax_threefry_partitionable`` (JAX's default) bit for bit: each output element ``i`` of a
draw of ``shape`` is ``threefry(key, (i >> 32, i & 0xffffffff))`` XOR-folded to 32 bits
(``jax._src.random.threefry2x32``), mapped to a float the way ``jax.random.uniform`` does.
Other PRNG implementations or settings fall back to ``jax.random`` itself.

Keys are raw ``uint32`` key data ``[..., 2]`` (``jax.random.PRNGKey``) or typed threefry keys;
leading dimensions are a batch (no ``vmap`` needed).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)  # threefry's key-schedule constant
_NORMAL_LO = np.nextafter(np.float32(-1.0), np.float32(0.0))  # jax.random.normal's minval
_SQRT2 = np.float32(np.sqrt(2))


def _fast_path(key) -> bool:
    """True when ``key`` draws with threefry2x32 in JAX's partitionable mode."""
    if not jax.config.jax_threefry_partitionable:
        return False
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return str(jax.random.key_impl(key)) in ("threefry2x32", "fry")
    return jax.config.jax_default_prng_impl == "threefry2x32"


def key_data(key):
    """``uint32 [..., 2]`` data of raw or typed keys."""
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return key


def _rotl(x, r: int):
    return lax.shift_left(x, np.uint32(r)) | lax.shift_right_logical(x, np.uint32(32 - r))


# Jitted so that its ~100 ops are traced once per argument shape, not at every call (with
# fold_ins, tracing ResNet-20's PCM chip sampler went from 2.4 s to 0.5 s:
# benchmarks/compile_time.py --programs)
@jax.jit
def threefry2x32(k1, k2, x1, x2):
    """The threefry-2x32 hash (20 rounds) of counters ``(x1, x2)`` under keys ``(k1, k2)``.

    All arguments are ``uint32`` arrays that broadcast together; returns the two output words.
    """
    ks = (k1, k2, k1 ^ k2 ^ _PARITY)
    x = [x1 + ks[0], x2 + ks[1]]
    for step in range(5):
        for r in _ROTATIONS[step % 2]:
            x[0] = x[0] + x[1]
            x[1] = _rotl(x[1], r) ^ x[0]
        x[0] = x[0] + ks[(step + 1) % 3]
        x[1] = x[1] + ks[(step + 2) % 3] + np.uint32(step + 1)
    return x[0], x[1]


def fold_in(key, data):
    """``jax.random.fold_in(key, data)`` of every key of a batch ``[..., 2]`` (raw key data).

    ``data``: an integer (or an array broadcasting against the batch). Typed keys come back
    typed.
    """
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    d = jnp.asarray(data, jnp.uint32)
    if not _fast_path(key):
        shape = jnp.broadcast_shapes(key.shape if typed else key.shape[:-1], d.shape)
        k = jnp.broadcast_to(key, shape if typed else (*shape, 2))
        k = k.reshape(-1) if typed else k.reshape(-1, 2)
        out = jax.vmap(jax.random.fold_in)(k, jnp.broadcast_to(d, shape).reshape(-1))
        return out.reshape(shape if typed else (*shape, 2))
    k = key_data(key)
    o1, o2 = threefry2x32(k[..., 0], k[..., 1], jnp.zeros_like(d), d)
    out = jnp.stack(jnp.broadcast_arrays(o1, o2), axis=-1)
    return jax.random.wrap_key_data(out, impl=jax.random.key_impl(key)) if typed else out


def fold_ins(key, num: int):
    """``[fold_in(key, i) for i in range(num)]`` in one hash (a key batch ``[..., 2]``, or typed
    keys, which come back typed): one fold_in per layer or stream would compile a hash each."""
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        out = fold_in(key[..., None], lax.iota(jnp.uint32, num))
        return [out[..., i] for i in range(num)]
    out = fold_in(key[..., None, :], lax.iota(jnp.uint32, num))
    return [out[..., i, :] for i in range(num)]


def _bits(k1, k2, size: int):
    """32 random bits per element of a draw of ``size`` elements: ``[..., size]``."""
    if size >= 2**32:
        raise ValueError(f"a draw of {size} values is too large (2^32 at most)")
    i = lax.iota(jnp.uint32, size)
    o1, o2 = threefry2x32(k1[..., None], k2[..., None], jnp.zeros_like(i), i)
    return o1 ^ o2


def _unit(bits):
    """Floats in ``[0, 1)`` from 32 random bits (``jax.random.uniform``'s mantissa trick)."""
    f = lax.shift_right_logical(bits, np.uint32(32 - 23)) | np.uint32(0x3F800000)
    return lax.bitcast_convert_type(f, jnp.float32) - np.float32(1.0)


def _erf_inv_part(bits):
    """``erf_inv(u)`` of ``jax.random.normal``'s uniform ``u`` from its bits (float32)."""
    lo, hi = _NORMAL_LO, np.float32(1.0)
    return lax.erf_inv(lax.max(lo, _unit(bits) * (hi - lo) + lo))


def _to_normal(bits):
    """``jax.random.normal`` from its uniform bits (float32)."""
    return _SQRT2 * _erf_inv_part(bits)


def normal(key, shape):
    """``jax.random.normal(key, shape)`` (float32) for a key batch ``[..., 2]``."""
    shape = tuple(int(s) for s in shape)
    if not _fast_path(key):
        return _batched(key, lambda k: jax.random.normal(k, shape, jnp.float32))
    k = key_data(key)
    z = _to_normal(_bits(k[..., 0], k[..., 1], math.prod(shape)))
    return z.reshape((*k.shape[:-1], *shape))


def uniform(key, shape):
    """``jax.random.uniform(key, shape)`` (float32 in [0, 1)) for a key batch ``[..., 2]``."""
    shape = tuple(int(s) for s in shape)
    if not _fast_path(key):
        return _batched(key, lambda k: jax.random.uniform(k, shape, jnp.float32))
    k = key_data(key)
    u = _unit(_bits(k[..., 0], k[..., 1], math.prod(shape)))
    return lax.max(np.float32(0.0), u).reshape((*k.shape[:-1], *shape))


def truncated_normal(key, lower: float, shape):
    """``jax.random.truncated_normal(key, lower, inf, shape)`` (float32) for a key batch."""
    shape = tuple(int(s) for s in shape)
    if not _fast_path(key):
        return _batched(key, lambda k: jax.random.truncated_normal(k, lower, jnp.inf, shape,
                                                                   jnp.float32))
    k = key_data(key)
    sqrt2 = np.float32(np.sqrt(2))
    lo = jnp.asarray(lower, jnp.float32)
    a, b = lax.erf(lo / sqrt2), lax.erf(jnp.asarray(np.inf, jnp.float32) / sqrt2)
    u = _unit(_bits(k[..., 0], k[..., 1], math.prod(shape)))
    u = lax.max(a, u * (b - a) + a)
    z = sqrt2 * lax.erf_inv(u)
    z = jnp.clip(z, lax.nextafter(lo, np.float32(np.inf)),
                 lax.nextafter(jnp.float32(np.inf), np.float32(-np.inf)))
    return z.reshape((*k.shape[:-1], *shape))


def split(key, num: int = 2):
    """``jax.random.split(key, num)`` of a key batch ``[..., 2]``: ``[..., num, 2]`` (raw data)."""
    if not _fast_path(key):
        return _batched(key, lambda k: jax.random.key_data(jax.random.split(k, num))
                        if jax.dtypes.issubdtype(k.dtype, jax.dtypes.prng_key)
                        else jax.random.split(k, num))
    k = key_data(key)
    i = lax.iota(jnp.uint32, num)
    o1, o2 = threefry2x32(k[..., 0, None], k[..., 1, None], jnp.zeros_like(i), i)
    return jnp.stack([o1, o2], axis=-1)


def normals(keys, shapes):
    """``[normal(k, s) for k, s in zip(keys, shapes)]``, one fused draw per distinct shape.

    ``keys``: one key (batch ``[..., 2]``, the same batch for all) per shape.
    """
    shapes = [tuple(int(d) for d in s) for s in shapes]
    if len(keys) != len(shapes):
        raise ValueError(f"normals: {len(keys)} keys for {len(shapes)} shapes")
    if not keys:
        return []
    if not all(_fast_path(k) for k in keys):
        return [normal(k, s) for k, s in zip(keys, shapes, strict=True)]
    data = [key_data(k) for k in keys]
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, s in enumerate(shapes):
        groups.setdefault(s, []).append(i)
    # The draws of one shape share a hash over [..., keys, size]: no copy of each key per
    # value, as one draw of all shapes concatenated needed
    out = [None] * len(shapes)
    for s, idx in groups.items():
        k = jnp.stack([data[i] for i in idx], axis=-2)
        e = _erf_inv_part(_bits(k[..., 0], k[..., 1], math.prod(s)))
        for j, i in enumerate(idx):
            # sqrt(2) after the slice, as jax.random.normal's last op: a consumer's constant
            # factor then folds into it exactly as it would into jax.random.normal's
            out[i] = _SQRT2 * e[..., j, :].reshape((*k.shape[:-2], *s))
    return out


def _batched(key, draw):
    """``draw`` (one key) over a batch of raw or typed keys."""
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    lead = key.shape if typed else key.shape[:-1]
    flat = key.reshape(-1) if typed else key.reshape(-1, 2)
    out = jax.vmap(draw)(flat)
    return out.reshape((*lead, *out.shape[1:]))
