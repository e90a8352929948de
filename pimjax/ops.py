"""Conv and matmul primitives of the analog layers, with a training gradient XLA's CPU runs fast.

:func:`conv2d` is ``lax.conv_general_dilated`` (NHWC x HWIO -> NHWC) in the forward pass, bit
for bit, with a ``jax.custom_vjp`` backward pass. On CPU, XLA lowers a conv's weight gradient
to a "backward-filter" convolution that contracts batch*spatial (up to 10^6 terms) into a tiny
``[kh, kw, I, O]`` output, and runs it 5-15x slower than the forward (256x32x32x32, 3x3,
32->32: forward 0.13 s, weight gradient 1.6-2.3 s). Here both gradients are GEMMs over batch
chunks that stay in cache. Notation: ``xp`` is ``x`` padded by the conv's pads, ``s`` the
stride, ``g = dL/dy [B, Ho, Wo, O]``, and tap ``(i, j)`` of ``xp`` is the strided view
``tap_ij(xp) = xp[:, i + s*ho, j + s*wo, :]`` (``[B, Ho, Wo, I]``), so that
``y[b, ho, wo, o] = sum_{i, j, c} tap_ij(xp)[b, ho, wo, c] * w[i, j, c, o]``.

* **Weight gradient**: ``dW[i, j] = tap_ij(xp)^T g`` with batch*spatial contracted: an im2col
  GEMM. The batch is cut into chunks whose patch matrix is ~``CHUNK_BYTES`` (cache sized;
  a ``lax.scan`` adds the partial sums: unchunked, the 256x32x32x32 case is 5x slower).
  Two layouts, chosen by timings on a 2-core CPU (``benchmarks/conv_grad.py --variants``):

  - ``"cf"``, channels-first im2col: the chunk transposed to ``[I, b, Hp, Wp]`` so that each
    tap copies contiguous rows, then one GEMM ``P [kh*kw*I, N] . g^T [O, N]``. The default:
    2-6x faster than "nhwc" on LeNet-5's 5x5 convs, 0-20% on ResNet-20's 3x3 convs.
  - ``"nhwc"``: per kernel row ``i``, its ``kw`` taps concatenated on channels,
    ``P_i [N, kw*I]``, then one GEMM ``P_i^T g``; no transposes. Used for 1x1 kernels (then
    a plain GEMM) and when ``CF_MIN_RATIO * O > kh*kw*I``: "cf" also transposes ``g``, which
    costs as much as the patches themselves when ``O`` is large next to the patch row
    (ResNet's 3->16 stem: 4 ms vs 8 ms).

* **Input gradient**: ``dxp = sum_ij place_ij(g . w[i, j]^T)``, where ``place_ij`` (the
  transpose of ``tap_ij``) scatters with an interior-padded ``lax.pad``, cropped by the pads.

  - ``"col2im"``: per batch chunk, one GEMM ``dP = g . W^T`` ``[b, Ho, Wo, kh, kw, I]``,
    then its taps placed along W and those rows along H (``kh + kw`` pads, not ``kh * kw``).
    The default at stride > 1 (2x faster than XLA's, which dilates ``g`` with zeros) and for
    fewer than ``XGRAD_MIN_CIN`` input channels (LeNet-5's first layer, a conv with a single
    output channel for XLA: 7 ms vs 33 ms).
  - ``"transpose"`` (stride 1): XLA's own formulation, a conv of ``g`` with the flipped kernel,
    I and O swapped; as fast as the forward. The default at stride 1 from ``XGRAD_MIN_CIN``
    input channels, where it measured 0-20% faster than "col2im" (ResNet-20's 3x3 convs), and
    for 1x1 kernels (one GEMM).
  - ``"subpixel"`` (kept for measurements; never clearly the fastest here): stride > 1 as
    ``s*s`` stride-1 convs of ``g`` with the sub-kernels ``w[p::s, q::s]``, interleaved.

:func:`max_pool_2x2` is ``flax.linen.max_pool(x, (2, 2), (2, 2))`` with a gradient that
keeps each window's winner instead of XLA's select-and-scatter.

:func:`dense` is plain ``jnp.dot``: XLA's matmul gradient is already two GEMMs at the
forward's speed (256x784x300: forward 1.7 ms, both gradients 4.7 ms), and chunking the
contraction of ``x^T g`` over the batch measured no faster.

Both compose with ``jax.jit``, ``jax.vmap`` (also over the weight only) and ``jax.grad``.
``conv2d`` has no forward-mode derivative (``jax.jvp`` of a ``custom_vjp`` is an error).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from functools import partial, reduce

import jax
import jax.numpy as jnp
from jax import lax

from pimjax.runtime import cpu_flags_applied

_DN = ("NHWC", "HWIO", "NHWC")
# Bytes of one batch chunk's patch matrix (weight gradient) or dP (col2im). 1-4 MiB measured
# best on a 2-core EPYC (512 KiB L2 per core, 32 MiB L3); 64 MiB unchunked was 5-15x slower.
CHUNK_BYTES = 2 << 20
# Weight-gradient layout: "cf" unless CF_MIN_RATIO * O > kh * kw * I (or the kernel is 1x1).
CF_MIN_RATIO = 3
# Input gradient at stride 1: "transpose" from this many input channels, "col2im" below.
XGRAD_MIN_CIN = 16
# With grad="auto", stride-1 convs with this many input channels take XLA's own gradient when
# XLA:CPU runs convolutions on Eigen (pimjax.runtime's flag): there it matched or beat the
# custom VJP on ResNet-20's 3x3 layers (benchmarks/conv_grad.py).
NATIVE_GRAD_MIN_CIN = 16
GRADS = ("auto", "custom", "xla")

Pads = tuple[tuple[int, int], tuple[int, int]]


def conv2d(x, w, strides: Sequence[int] = (1, 1), padding="SAME", grad: str = "auto"):
    """NHWC x HWIO 2-D convolution, ``lax.conv_general_dilated`` with a faster CPU gradient.

    ``grad``: ``"custom"`` (this module's VJP), ``"xla"`` (XLA's own) or ``"auto"``: XLA's for
    stride-1 convs with at least ``NATIVE_GRAD_MIN_CIN`` input channels when
    :func:`pimjax.runtime.cpu_flags_applied`, the custom VJP otherwise.
    """
    if grad not in GRADS:
        raise ValueError(f"grad={grad!r} is unknown: use one of {GRADS}")
    if x.ndim != 4 or w.ndim != 4:
        raise ValueError(f"conv2d wants x [B,H,W,I] and w [kh,kw,I,O], got {x.shape}, {w.shape}")
    strides = tuple(int(s) for s in strides)
    if len(strides) != 2:
        raise ValueError(f"conv2d strides must have 2 entries, got {strides}")
    pads = explicit_pads(x.shape, w.shape, strides, padding)
    if grad == "auto":
        native = (cpu_flags_applied() and strides == (1, 1)
                  and x.shape[3] >= NATIVE_GRAD_MIN_CIN)
        grad = "xla" if native else "custom"
    if grad == "xla":
        return _conv_raw(x, w, strides, pads)
    return _conv(x, w, strides, pads)


def max_pool_2x2(x):
    """2x2 max pool, stride 2, VALID, over the H and W axes of ``[..., H, W, C]``.

    Equal to ``flax.linen.max_pool(x, (2, 2), (2, 2))`` in value and gradient (the gradient
    goes to the first maximum of each window, row-major, as XLA's select-and-scatter), but
    written as four strided views and a ``custom_vjp`` that keeps the winner's index: XLA's
    CPU lowers the gradient of a window max to a variadic reduce-window and a scatter, about
    a quarter of a LeNet-5 training step.
    """
    h, w = x.shape[-3] // 2 * 2, x.shape[-2] // 2 * 2
    return _max_pool_2x2(x[..., :h, :w, :])


def _window_views(x):
    """The four ``[..., H/2, W/2, C]`` views of each 2x2 window, in row-major order."""
    return [x[..., i::2, j::2, :] for i in (0, 1) for j in (0, 1)]


@jax.custom_vjp
def _max_pool_2x2(x):
    return _max_pool_fwd(x)[0]


def _max_pool_fwd(x):
    a, b, c, d = _window_views(x)
    # the first maximum wins ties (a before b before c before d), as select-and-scatter's >=
    win = jnp.where((a >= b) & (a >= c) & (a >= d), 0,
                    jnp.where((b >= c) & (b >= d), 1, jnp.where(c >= d, 2, 3)))
    return jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d)), win.astype(jnp.int8)


def _max_pool_bwd(win, g):
    # dx[..., 2u + i, 2v + j, c] = g[..., u, v, c] where window (u, v)'s winner is 2i + j
    k = jnp.arange(4, dtype=jnp.int8).reshape(2, 1, 2, 1)  # i on axis -4, j on axis -2
    dx = jnp.where(win[..., :, None, :, None, :] == k, g[..., :, None, :, None, :],
                   jnp.zeros((), g.dtype))
    return (dx.reshape(*g.shape[:-3], 2 * g.shape[-3], 2 * g.shape[-2], g.shape[-1]),)


_max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


def dense(x, w):
    """``x [..., K] @ w [K, N]``; XLA's own matmul gradient is already GEMM-optimal here."""
    return jnp.dot(x, w)


# --------------------------------------------------------------------------- custom VJP


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, w, strides: tuple[int, int], pads: Pads):
    return _conv_raw(x, w, strides, pads)


def _conv_fwd(x, w, strides, pads):
    return _conv_raw(x, w, strides, pads), (x, w)


def _conv_bwd(strides, pads, res, g):
    x, w = res
    dx = input_grad(g, w, x.shape, strides, pads).astype(x.dtype)
    dw = weight_grad(x, g, w.shape[:2], strides, pads).astype(w.dtype)
    return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def _conv_raw(x, w, strides, pads):
    return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_DN)


# --------------------------------------------------------------------------- weight gradient


def weight_grad(x, g, kernel: tuple[int, int], strides, pads: Pads, layout: str | None = None):
    """``dL/dw [kh, kw, I, O]`` of the conv from input ``x`` and output cotangent ``g``."""
    cin, cout, taps = x.shape[3], g.shape[3], kernel[0] * kernel[1]
    if layout is None:
        layout = "nhwc" if taps == 1 or CF_MIN_RATIO * cout > taps * cin else "cf"
    fn = {"nhwc": _wgrad_nhwc, "cf": _wgrad_cf}[layout]
    per_image = g.shape[1] * g.shape[2] * taps * cin * _acc_dtype(x).itemsize
    bc = _chunk_size(x.shape[0], per_image)
    return _batch_sum(lambda xc, gc: fn(xc, gc, kernel, strides, pads), x, g, bc)


def _wgrad_nhwc(x, g, kernel, strides, pads):
    # dW[i] = P_i^T g, P_i[n, j*I + c] = tap_ij(xp)[n, c]  (n = b, ho, wo flattened)
    kh, kw = kernel
    xp = _pad(x, pads)
    rows = []
    for i in range(kh):
        p = jnp.concatenate([_tap(xp, i, j, g.shape[1:3], strides) for j in range(kw)], axis=3)
        rows.append(_dot(p, g, ((0, 1, 2), (0, 1, 2))))  # [kw*I, O]
    return jnp.stack(rows).reshape(kh, kw, x.shape[3], g.shape[3])


def _wgrad_cf(x, g, kernel, strides, pads):
    # dW = P . g^T with P[(i, j, c), n] = tap_ij(xp)[n, c], built channels-first so each tap
    # copies contiguous rows of Wo floats instead of I-float pieces; the W shifts first, then
    # the H shifts of those (kh + kw slices instead of kh * kw: a quicker compile).
    (kh, kw), (sh, sw), (ho, wo) = kernel, strides, g.shape[1:3]
    n, cin, cout = x.shape[0] * ho * wo, x.shape[3], g.shape[3]
    xt = _pad(x, pads).transpose(3, 0, 1, 2)  # [I, b, Hp, Wp]
    cols = jnp.stack([_strided(xt, 3, j, wo, sw) for j in range(kw)])  # [kw, I, b, Hp, Wo]
    p = jnp.stack([_strided(cols, 3, i, ho, sh) for i in range(kh)])  # [kh, kw, I, b, Ho, Wo]
    gt = g.transpose(3, 0, 1, 2).reshape(cout, n)
    return _dot(p.reshape(kh * kw * cin, n), gt, ((1,), (1,))).reshape(kh, kw, cin, cout)


# --------------------------------------------------------------------------- input gradient


def input_grad(g, w, x_shape, strides, pads: Pads, formulation: str | None = None):
    """``dL/dx [B, H, W, I]`` of the conv from output cotangent ``g`` and kernel ``w``."""
    kh, kw, cin, _ = w.shape
    if formulation is None:
        stride1 = strides == (1, 1)
        formulation = ("transpose" if stride1 and (cin >= XGRAD_MIN_CIN or kh * kw == 1)
                       else "col2im")
    if formulation == "col2im":
        per_image = g.shape[1] * g.shape[2] * kh * kw * cin * _acc_dtype(g).itemsize
        bc = _chunk_size(g.shape[0], per_image)
        return _batch_map(lambda gc: _xgrad_col2im(gc, w, x_shape[1:3], strides, pads), g, bc)
    if formulation == "transpose":
        if strides != (1, 1):
            raise ValueError("input_grad formulation 'transpose' is for stride 1")
        return _xgrad_transpose(g, w, pads)
    if formulation == "subpixel":
        return _xgrad_subpixel(g, w, x_shape[1:3], strides, pads)
    raise ValueError(f"unknown input_grad formulation {formulation!r}")


def _xgrad_transpose(g, w, pads):
    # stride 1: dx[h] = sum_i g[h + lo - i] w[i]^T, a correlation of g (padded by k-1-lo,
    # k-1-hi) with the flipped kernel w[::-1, ::-1] with I and O swapped; pads may be < 0.
    kh, kw = w.shape[:2]
    (lo_h, hi_h), (lo_w, hi_w) = pads
    wt = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
    tpads = ((kh - 1 - lo_h, kh - 1 - hi_h), (kw - 1 - lo_w, kw - 1 - hi_w))
    return _conv_raw(g, wt, (1, 1), tpads)


def _xgrad_subpixel(g, w, hw, strides, pads):
    # Row r = p + s*u of xp (phase p < s) gets sum_{m, ho: ho + m = u} g[ho] w[p + s*m]^T:
    # a full stride-1 correlation of g with the sub-kernel w[p::s] flipped, I/O swapped.
    (sh, sw), padded = strides, _padded_hw(hw, pads)
    parts = []
    for p in range(min(sh, w.shape[0])):
        for q in range(min(sw, w.shape[1])):
            sub = w[p::sh, q::sw]
            mh, mw = sub.shape[:2]
            wt = jnp.flip(sub, (0, 1)).transpose(0, 1, 3, 2)
            y = _conv_raw(g, wt, (1, 1), ((mh - 1, mh - 1), (mw - 1, mw - 1)))
            parts.append(_place(y, p, q, strides, padded))
    return _unpad(_add(parts), pads)


def _xgrad_col2im(g, w, hw, strides, pads):
    # dP[n, i, j, c] = sum_o g[n, o] w[i, j, c, o];  dxp = sum_i place_i(sum_j place_j(dP_ij)),
    # placing along W first, then H (kh + kw interior pads rather than kh * kw full-size ones).
    (kh, kw), (sh, sw) = w.shape[:2], strides
    hp, wp = _padded_hw(hw, pads)
    dp = _dot(g, w, ((3,), (3,)))  # [b, Ho, Wo, kh, kw, I], summed in float32 or wider
    rows = [_add(_unstrided(dp[:, :, :, i, j], 2, j, wp, sw) for j in range(kw)) for i in range(kh)]
    return _unpad(_add(_unstrided(row, 1, i, hp, sh) for i, row in enumerate(rows)), pads)


# --------------------------------------------------------------------------- helpers


def explicit_pads(x_shape, w_shape, strides, padding) -> Pads:
    """Explicit ``((lo, hi), (lo, hi))`` pads of a "SAME"/"VALID"/explicit padding."""
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(x_shape[1:3], w_shape[:2], strides, padding.upper())
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    if len(pads) != 2:
        raise ValueError(f"conv2d padding needs 2 (lo, hi) pairs, got {padding}")
    return pads


def _padded_hw(hw, pads: Pads) -> tuple[int, int]:
    return hw[0] + sum(pads[0]), hw[1] + sum(pads[1])


def _pad(x, pads: Pads):
    """``x`` zero-padded (or cropped, for negative pads) on H and W."""
    (a, b), (c, d) = pads
    return lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (a, b, 0), (c, d, 0), (0, 0, 0)))


def _unpad(xp, pads: Pads):
    """The transpose of :func:`_pad`: crops what it padded (zero-fills what it cropped)."""
    (a, b), (c, d) = pads
    return _pad(xp, ((-a, -b), (-c, -d)))


def _tap(xp, i: int, j: int, out_hw, strides):
    """Tap ``(i, j)``: ``xp[:, i + s*ho, j + s*wo, :]`` for ``ho < Ho``, ``wo < Wo``."""
    return _strided(_strided(xp, 1, i, out_hw[0], strides[0]), 2, j, out_hw[1], strides[1])


def _place(v, i: int, j: int, strides, padded_hw):
    """The transpose of :func:`_tap`: ``v`` at ``[:, i + s*ho, j + s*wo]``, zeros elsewhere."""
    return _unstrided(_unstrided(v, 1, i, padded_hw[0], strides[0]), 2, j, padded_hw[1], strides[1])


def _strided(a, axis: int, start: int, count: int, stride: int):
    """``a[..., start + stride * k, ...]`` for ``k < count`` along ``axis``."""
    return lax.slice_in_dim(a, start, start + stride * (count - 1) + 1, stride, axis)


def _unstrided(v, axis: int, start: int, size: int, stride: int):
    """The transpose of :func:`_strided`: ``v`` spread to ``size`` entries along ``axis``.

    Entries of ``v`` that would land at or past ``size`` are dropped.
    """
    count = min(v.shape[axis], -(-(size - start) // stride))
    v = lax.slice_in_dim(v, 0, count, axis=axis)
    cfg = [(0, 0, 0)] * v.ndim
    cfg[axis] = (start, size - (start + stride * (count - 1) + 1), stride - 1)
    return lax.pad(v, jnp.zeros((), v.dtype), cfg)


def _add(parts):
    """The sum of a non-empty iterable of arrays."""
    return reduce(operator.add, parts)


def _acc_dtype(a):
    """Accumulation dtype: at least float32 (bfloat16 partial sums would lose bits)."""
    return jnp.dtype(jnp.promote_types(a.dtype, jnp.float32))


def _dot(a, b, contract):
    """``lax.dot_general`` contracting ``contract = (a_dims, b_dims)``, accumulating in f32+."""
    dims = ((tuple(contract[0]), tuple(contract[1])), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=_acc_dtype(a))


def _chunk_size(batch: int, bytes_per_image: int) -> int:
    """Images per chunk: ~CHUNK_BYTES, a divisor of ``batch`` if one is within 2x."""
    target = max(1, min(batch, CHUNK_BYTES // max(1, bytes_per_image)))
    for bc in range(target, (target + 1) // 2 - 1, -1):
        if batch % bc == 0:
            return bc
    n = -(-batch // target)
    return -(-batch // n)  # balanced chunks, a short tail


def _split(a, bc: int):
    """``a`` as ``[n, bc, ...]`` full chunks plus the remaining tail (or None)."""
    n = a.shape[0] // bc
    main = a[: n * bc].reshape(n, bc, *a.shape[1:])
    return main, (a[n * bc :] if a.shape[0] % bc else None)


def _batch_sum(fn: Callable, x, g, bc: int):
    """``fn(x, g)`` for ``fn`` additive over the batch, computed chunk by chunk (``lax.scan``)."""
    if bc >= x.shape[0]:
        return fn(x, g)
    (xs, xt), (gs, gt) = _split(x, bc), _split(g, bc)
    init = jnp.zeros(jax.eval_shape(fn, xs[0], gs[0]).shape, _acc_dtype(x))
    acc, _ = lax.scan(lambda a, xg: (a + fn(*xg), None), init, (xs, gs))
    return acc if xt is None else acc + fn(xt, gt)


def _batch_map(fn: Callable, g, bc: int):
    """``fn(g)`` for ``fn`` acting image by image, computed chunk by chunk (``lax.map``)."""
    if bc >= g.shape[0]:
        return fn(g)
    gs, gt = _split(g, bc)
    out = lax.map(fn, gs)
    out = out.reshape(-1, *out.shape[2:])
    return out if gt is None else jnp.concatenate([out, fn(gt)])
