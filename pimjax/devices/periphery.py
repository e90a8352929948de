"""Crossbar periphery: noise management, input DAC, tiles, output noise and ADC (pure).

The analog forward pass of IBM aihwkit 1.1's ``TorchInferenceRPUConfig``
(``aihwkit/simulator/tiles/analog_mvm.py``, ``AnalogMVM`` with the ``IOParameters``
defaults) on one crossbar MVM ``y = x W``, ``x [..., K]``, ``W [K, N]``:

1. the rows are split into tiles of at most ``max_input_size`` rows (aihwkit
   ``TileModuleArray.get_split_sizes``: ``n = ceil(K / max)`` tiles of near-equal size);
2. per tile and input vector, *noise management* divides the input by its abs-max ``a``;
3. the DAC rounds to a step ``2 inp_bound / (2^inp_bits - 2)`` and clips to ``±inp_bound``;
4. the tile computes with the weights normalised by the mapping ``scale`` (max|w|, per
   layer or column: aihwkit's ``weight_scaling_omega = 1``), adds Gaussian output noise
   ``out_noise`` (re-drawn at every read), and the ADC rounds to a step
   ``2 out_bound / (2^out_bits - 2)`` and clips to ``±out_bound``;
5. the digital periphery multiplies each tile's output back by ``a`` (and the bound-management
   factor) and sums the tiles; the result is multiplied by ``scale``.

With ``bound_management="iterative"`` a vector whose tile output clips is recomputed with its
input halved, up to aihwkit's limit (``max_bm_factor``, ``max_bm_res``); pimjax decides per
input vector and tile (RPUCuda's semantics; the torch tile tests the whole batch at once).

A conv runs as MVMs of its im2col patches in ``(c, kh, kw)`` order (aihwkit unfolds with
``torch.nn.functional.unfold``), so noise management, the DAC and tiles act per patch.

Keys: ``key`` is one PRNG key, or an array of keys whose shape is a prefix of the output's
shape (e.g. one per ``(chip, image)``); each key then draws the noise of its own slice, so
results do not depend on how a batch is chunked.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from pimjax import draws, ops, perchip
from pimjax.devices.mapping import broadcast_scale, mapping_scale

NOISE_MANAGEMENTS = ("abs_max", "none")
BOUND_MANAGEMENTS = ("none", "iterative")
# A converter input within this many levels of a half-integer is a tie (rounded half to even).
# Quantized activations put the DAC's input x/max|x| on ratios of small integers, so exact
# ties are common, and float error (which XLA's fusion choices change) would otherwise break
# them either way: a chip batch, a vmap and a single chip would round differently. Values of
# an 8-bit activation grid lie >= 1/510 of a level from a tie, the DAC's float error is
# ~1e-5 levels; a value that is not on a grid lands this close to a tie with probability 2e-4.
TIE_TOLERANCE = 1e-4
# Read noise and conv patches are computed in >= this many blocks of their leading axis (a
# lax.map), which makes XLA materialize them once instead of fusing them into each consumer
# (see in_blocks).
MIN_BLOCKS = 8
# A one-chip conv over many images runs in blocks of about this many patches (crossbar input
# vectors), each block's patches, converters and noise in one step of a lax.map: a layer's
# arrays (the patches are kh*kw times its input) then live for one block, not for the whole
# batch. XLA:CPU does not reuse the buffers of in_blocks' loops from one layer to the next:
# unblocked, a ResNet-20 pcm chunk of 8 chips x 500 images needed 3,985 MiB (XLA's estimate,
# benchmarks/montecarlo.py), 4x the memory planner's budget; blocked, 818 MiB.
BLOCK_PATCHES = 4096


@jax.custom_vjp
def round_half_even(x):
    """Round to nearest, a value within :data:`TIE_TOLERANCE` of a tie to the even integer
    (``torch.round``'s rule, robust to float error); straight-through gradient."""
    f = jnp.floor(x)
    tie = jnp.abs(x - f - 0.5) <= TIE_TOLERANCE
    return jnp.where(tie, f + jnp.mod(f, 2.0), jnp.round(x))


def _rhe_fwd(x):
    return round_half_even(x), None


def _rhe_bwd(_, g):
    return (g,)


round_half_even.defvjp(_rhe_fwd, _rhe_bwd)


def in_blocks(fn, xs):
    """``jax.vmap(fn)(xs)``, computed as a ``lax.map`` over >= :data:`MIN_BLOCKS` blocks of
    ``xs``'s leading axis so that XLA materializes the result once.

    Fused into its consumers instead, a gather or a hash is emitted in each consumer's loop
    and layout: per-read noise drawn in LeNet-5's conv1 layout (6 channels innermost) does
    not vectorize, and conv patches read by noise management and the DAC were gathered twice.
    The pcm sweep's output noise took 45% of its time before, 10% after
    (benchmarks/pcm_profile.py).
    """
    rows = jax.tree_util.tree_leaves(xs)[0].shape[0]
    steps = next((s for s in range(MIN_BLOCKS, rows + 1) if rows % s == 0), rows)
    if steps <= 1:
        return jax.vmap(fn)(xs)
    return jax.lax.map(fn, xs, batch_size=rows // steps)


def split_sizes(size: int, max_size: int) -> list[int]:
    """Rows per tile: ``ceil(size / max_size)`` near-equal tiles (aihwkit's split)."""
    if max_size <= 0 or size <= max_size:
        return [size]
    n = (size + max_size - 1) // max_size
    base, extra = divmod(size, n)
    return [base + (i < extra) for i in range(n)]


def quantize_uniform(x, bits: int | None, bound: float):
    """Round to aihwkit's grid ``step = 2 bound / (2^bits - 2)`` and clip to ``±bound`` (STE).

    ``bits=None`` only clips. Ties go to even (:func:`round_half_even`). The rounding gradient
    is the identity; the clip's is zero outside the bound (aihwkit ``UniformQuantize`` then
    ``clamp``).
    """
    if bits is not None:
        step = 2.0 * bound / (2**bits - 2)
        x = round_half_even(x / step) * step
    return clip(x, bound)


def clip(x, bound):
    """Clip to ``±bound``; gradient 1 inside and on the bound, 0 beyond (torch's clamp)."""
    return jnp.where(x > bound, bound, jnp.where(x < -bound, -bound, x))


def conv_patches(x, kernel_size, strides=(1, 1), padding="SAME"):
    """im2col: ``x [..., H, W, C] -> [..., H', W', C*kh*kw]``, each patch in (c, kh, kw) order.

    A gather from each padded image, flattened (a copy, exact), in blocks (:func:`in_blocks`);
    ``lax.conv_general_dilated_patches`` computes the same as a grouped one-hot conv, 2.8x
    slower on XLA:CPU for LeNet-5's conv2 patches (benchmarks/chip_layers.py).
    """
    kh, kw = (int(k) for k in kernel_size)
    sh, sw = (int(s) for s in strides)
    pads, (ho, wo) = _conv_geometry(x.shape[-3:-1], (kh, kw), (sh, sw), padding)
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 3) + [*pads, (0, 0)])
    *lead, h, w, c = x.shape
    i, j, ch, a, b = np.ix_(np.arange(ho), np.arange(wo), np.arange(c), np.arange(kh),
                            np.arange(kw))
    index = jnp.asarray((((i * sh + a) * w + (j * sw + b)) * c + ch).reshape(-1), jnp.int32)
    images = x.reshape((-1, h * w * c))
    p = in_blocks(lambda image: jnp.take(image, index, mode="clip"), images)
    return p.reshape((*lead, ho, wo, c * kh * kw))


def _conv_geometry(hw, kernel_size, strides, padding):
    """Explicit ``(lo, hi)`` pads of a conv over ``hw`` images, and its output ``(H', W')``."""
    pads = ops.explicit_pads((1, *hw), kernel_size, strides, padding)
    out = tuple((n + lo + hi - k) // s + 1
                for n, (lo, hi), k, s in zip(hw, pads, kernel_size, strides, strict=True))
    return pads, out


def kernel_rows(w):
    """A conv kernel ``[..., kh, kw, C, O]`` as crossbar rows ``[..., C*kh*kw, O]`` (c, kh, kw)."""
    *lead, kh, kw, c, o = w.shape
    w = jnp.moveaxis(w, -2, -4)  # [..., C, kh, kw, O]
    return w.reshape((*lead, c * kh * kw, o))


def _as_typed_key(key):
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    return jax.random.wrap_key_data(key)


def read_noise(key, shape, count: int = 1):
    """``[count, *shape]`` standard normals; a key batch (a prefix of ``shape``) draws per slice."""
    key = _as_typed_key(key)
    nb = key.ndim
    if tuple(shape[:nb]) != tuple(key.shape):
        raise ValueError(
            f"key batch shape {key.shape} must be a prefix of the output shape {tuple(shape)}")
    # Many keys (one per image, or per chip and image): pimjax.draws computes jax.random's
    # bits as one elementwise pass, faster than jax.random's own loop on CPU and vectorized
    # when drawn flat per key (in_blocks). One key (a training step's rng): jax.random, whose
    # loop materializes the draw once.
    rest = tuple(shape[nb:])
    size = count * math.prod(rest)
    flat = key.reshape(-1)
    if flat.shape[0] > 1:
        z = in_blocks(lambda k: draws.normal(k, (size,)), flat)
    else:
        z = jax.random.normal(flat[0], (1, size), jnp.float32)
    if count == 1:  # a plain reshape (a moved size-1 axis is a copy in XLA:CPU)
        return z.reshape((1, *key.shape, *rest))
    return jnp.moveaxis(z.reshape((*key.shape, count, *rest)), nb, 0)


def _map_chips(mvm, x, w, scale, key):
    """``mvm(x[c], w[c], scale[c], key[c])`` for every chip ``c``, in a ``lax.map``.

    Each chip's im2col patches, noise management, converters and GEMM then run on one chip's
    arrays (its convs in blocks, see :data:`BLOCK_PATCHES`), and a chip batch equals its chips
    one by one bit for bit. With the blocks, LeNet-5's conv2 took 166 ms for 10 chips x 500
    images on XLA:CPU, one batched pass over all chips' patches 317 ms
    (benchmarks/chip_layers.py).
    """
    scale = jnp.asarray(scale, jnp.float32)
    scale = jnp.broadcast_to(scale, (w.shape[0], *scale.shape[1:]))
    return jax.lax.map(lambda a: mvm(*a), (x, w, scale, key))  # key None: no leaves


@dataclasses.dataclass(frozen=True)
class Periphery:
    """DAC/ADC resolution and bounds, output noise and tile size (aihwkit 1.1 defaults)."""

    inp_bits: int | None = 7
    inp_bound: float = 1.0
    out_bits: int | None = 9
    out_bound: float = 12.0
    out_noise: float = 0.06
    max_input_size: int = 512
    noise_management: str = "abs_max"
    bound_management: str = "none"
    max_bm_factor: int = 1000
    max_bm_res: float = 0.25
    per_column: bool = False  # the weight normalisation (mapping scale) per output column

    def __post_init__(self):
        for field in ("inp_bits", "out_bits"):
            v = getattr(self, field)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 2):
                raise ValueError(f"{field}={v!r} must be an integer >= 2, or None (no rounding)")
        for field in ("inp_bound", "out_bound"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{field}={v!r} must be a number > 0 (math.inf: no clipping)")
        v = self.out_noise
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (
                v >= 0 and math.isfinite(v)):
            raise ValueError(f"out_noise={v!r} must be a finite number >= 0")
        v = self.max_input_size
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"max_input_size={v!r} must be an integer >= 0 (0: one tile)")
        if self.noise_management not in NOISE_MANAGEMENTS:
            raise ValueError(f"noise_management={self.noise_management!r} is unknown: "
                             f"use one of {NOISE_MANAGEMENTS}")
        if self.bound_management not in BOUND_MANAGEMENTS:
            raise ValueError(f"bound_management={self.bound_management!r} is unknown: "
                             f"use one of {BOUND_MANAGEMENTS}")
        if not self.max_bm_factor >= 1 or not self.max_bm_res > 0:
            raise ValueError("max_bm_factor must be >= 1 and max_bm_res > 0")

    @property
    def needs_key(self) -> bool:
        """True when a read draws output noise (then every MVM needs a key)."""
        return self.out_noise > 0

    @property
    def bm_rounds(self) -> int:
        """Number of input reductions (1, 2, 4, ...) bound management may try."""
        if self.bound_management == "none":
            return 1
        limit = float(self.max_bm_factor)
        if self.inp_bits is not None:
            inp_res = 2.0 * self.inp_bound / (2**self.inp_bits - 2)
            limit = min(limit, self.max_bm_res / inp_res)
        k = 0
        while 2.0**k <= limit:  # aihwkit stops once the reduction exceeds the limit
            k += 1
        return k + 1

    def _tile(self, x, w, noise, batched, x_per_chip):
        """One tile: NM, DAC, MVM with normalised weights, noise, ADC, de-normalisation."""
        if self.noise_management == "abs_max":
            a = jax.lax.stop_gradient(jnp.max(jnp.abs(x), axis=-1, keepdims=True))
            a = jnp.where(a > 0, a, 1.0)
        else:
            a = jnp.ones(x.shape[:-1] + (1,), x.dtype)
        a_y = a[None] if batched and not x_per_chip else a  # shared input: broadcast over chips
        outs, clipping = [], []
        for r in range(self.bm_rounds):
            red = 2.0**r
            xq = quantize_uniform(x / (a * red), self.inp_bits, self.inp_bound)
            if batched:
                eq = "...k,ckn->c...n" if not x_per_chip else "c...k,ckn->c...n"
                y = jnp.einsum(eq, xq, w)
            else:
                y = xq @ w
            if noise is not None:
                y = y + self.out_noise * noise[r]
            if self.out_bits is not None:
                step = 2.0 * self.out_bound / (2**self.out_bits - 2)
                y = round_half_even(y / step) * step
            clipping.append(jnp.any(jnp.abs(y) > self.out_bound, axis=-1, keepdims=True))
            outs.append(clip(y, self.out_bound) * (a_y * red))
        y = outs[-1]
        for r in range(self.bm_rounds - 2, -1, -1):  # the first round that does not clip
            y = jnp.where(clipping[r], y, outs[r])
        return y

    def forward(self, x, w_eff, w_nominal, key=None, conv=None):
        """One analog layer's MVM: ``w_eff`` (the chip's weights, ``[C, *kernel]`` for a chip
        batch) normalised by the mapping scale of the quantized kernel ``w_nominal``; ``conv``
        is the ``(strides, padding)`` of a conv layer, None for a dense one."""
        scale = mapping_scale(w_nominal, self.per_column)
        if jnp.ndim(w_eff) > jnp.ndim(w_nominal):  # a chip batch: one scale per chip
            scale = jnp.broadcast_to(scale, (w_eff.shape[0], *scale.shape))
        if conv is None:
            return self.matmul(x, w_eff, scale, key)
        strides, padding = conv
        return self.conv2d(x, w_eff, scale, strides, padding, key)

    def matmul(self, x, w, scale, key=None):
        """``x @ w`` through the periphery: ``x [..., K]``, ``w [K, N]``, ``scale`` () or (N,).

        A chip batch: ``w [C, K, N]``, ``scale [C]`` or ``[C, N]``, ``x [B, K]`` (shared by
        all chips) or ``[C, B, K]``; returns ``[C, B, N]``. ``key`` is needed when
        :attr:`needs_key`.
        """
        if w.ndim == 3 and x.ndim == 3 and self._chip_by_chip(key, w.shape[0], "batched_dense"):
            return _map_chips(self.matmul, x, w, scale, self._keys(key))
        return self._rows(x, w, scale, key, batched=w.ndim == 3,
                          x_per_chip=w.ndim == 3 and x.ndim == 3)

    def dense(self, x, w, scale, key=None):
        """A dense layer's MVM through the periphery (same shapes as :meth:`matmul`)."""
        return self.matmul(x, w, scale, key)

    def conv2d(self, x, w, scale, strides=(1, 1), padding="SAME", key=None):
        """An NHWC conv as crossbar MVMs of its (c, kh, kw) patches.

        ``w [kh, kw, C, O]`` with ``x [..., H, W, C]``, or a chip batch ``w [Cs, kh, kw, C, O]``
        with ``x [B, H, W, C]`` (shared) or ``[Cs, B, H, W, C]``; ``scale`` as in :meth:`matmul`.
        """
        batched = w.ndim == 5
        if batched and x.ndim == 5 and self._chip_by_chip(key, w.shape[0], "batched_conv"):
            conv = lambda xc, wc, sc, kc: self.conv2d(xc, wc, sc, strides, padding, kc)  # noqa: E731
            return _map_chips(conv, x, w, scale, self._keys(key))
        if not batched and x.ndim == 4 and self._per_image(key, x.shape[0]):
            return self._conv_blocks(x, w, scale, strides, padding, key)
        return self._conv(x, w, scale, strides, padding, key)

    def _conv(self, x, w, scale, strides, padding, key):
        patches = conv_patches(x, w.shape[-4:-2], strides, padding)
        batched = w.ndim == 5
        return self._rows(patches, kernel_rows(w), scale, key, batched=batched,
                          x_per_chip=batched and x.ndim == 5)

    def _keys(self, key):
        """``key`` as typed keys, or None when a read draws no noise."""
        return None if key is None or not self.needs_key else _as_typed_key(key)

    def _per_image(self, key, images: int) -> bool:
        """Whether a conv's read noise (if any) is drawn per image: one key per image."""
        key = self._keys(key)
        return key is None or key.shape == (images,)

    def _conv_blocks(self, x, w, scale, strides, padding, key):
        """A one-chip conv of ``x [B, H, W, C]`` in blocks of :data:`BLOCK_PATCHES` patches.

        Every block has the same number of images (the batch is padded to a multiple of it),
        so an image's result does not depend on the batch it came in.
        """
        _, (ho, wo) = _conv_geometry(x.shape[1:3], w.shape[-4:-2], strides, padding)
        images = x.shape[0]
        size = max(1, BLOCK_PATCHES // (ho * wo))
        blocks = -(-images // size)
        pad = blocks * size - images
        xs = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x
        xs = xs.reshape(blocks, size, *x.shape[1:])
        key = self._keys(key)
        if key is not None:
            key = jnp.concatenate([key, jnp.broadcast_to(key[:1], (pad,))]) if pad else key
            key = key.reshape(blocks, size)
        y = jax.lax.map(lambda a: self._conv(a[0], w, scale, strides, padding, a[1]),
                        (xs, key))  # key None: no leaves
        return y.reshape(blocks * size, *y.shape[2:])[:images]

    def _chip_by_chip(self, key, chips: int, field: str) -> bool:
        """Whether a chip batch with a per-chip input runs its chips one by one (a lax.map):
        on the CPU backend (:func:`pimjax.perchip.default_strategy`'s ``field``), when the
        noise keys (if any) have a chip axis, so that each chip draws its own noise."""
        if getattr(perchip.default_strategy(), field) != "map":
            return False
        key = self._keys(key)
        return key is None or (key.ndim >= 1 and key.shape[0] == chips)

    def _rows(self, x, w, scale, key, batched, x_per_chip):
        scale = jnp.asarray(scale, jnp.float32)
        if batched:
            s = scale.reshape(scale.shape[:1] + (1,) * (w.ndim - scale.ndim) + scale.shape[1:])
            w_n = w / s
            lead = x.shape[1:-1] if x_per_chip else x.shape[:-1]
            out_shape = (w.shape[0], *lead, w.shape[-1])
            scale_y = scale.reshape(scale.shape[:1] + (1,) * (len(out_shape) - scale.ndim)
                                    + scale.shape[1:])
        else:
            w_n = w / broadcast_scale(scale, w)
            out_shape = (*x.shape[:-1], w.shape[-1])
            scale_y = scale
        if x.shape[-1] != w.shape[-2]:
            raise ValueError(f"input has {x.shape[-1]} rows per vector, the weights {w.shape[-2]}")
        sizes = split_sizes(x.shape[-1], self.max_input_size)
        noise = None
        if self.needs_key:
            if key is None:
                raise ValueError("this periphery draws output noise: pass a key (rng 'read')")
            noise = read_noise(key, out_shape, len(sizes) * self.bm_rounds)
            noise = noise.reshape((len(sizes), self.bm_rounds, *out_shape))
        y, lo = None, 0
        for j, n in enumerate(sizes):
            yt = self._tile(x[..., lo:lo + n], w_n[..., lo:lo + n, :],
                            None if noise is None else noise[j], batched, x_per_chip)
            y = yt if y is None else y + yt
            lo += n
        return y * scale_y
