"""Layer by layer: where a chip-batched LeNet-5 forward spends its time on XLA:CPU.

Times, for ``--chips`` chips x ``--images`` images at LeNet-5's shapes (best of 3 jitted
calls each, all in one run):

* each analog layer's per-chip op (``pimjax.perchip``: conv1's wide conv on the shared
  input, conv2 as a map of plain convs, the dense layers) and, for conv1, its parts: the
  wide conv alone and the move of its ``[B, H, W, C*6]`` output to chip-major
  ``[C, B, H, W, 6]``, alone and fused into a ReLU;
* each layer through the ``pcm`` periphery (``devices.Periphery``), in full and with only
  its GEMM path (no noise management, converters or output noise);
* three ways to build conv2's per-chip im2col patches: the gather ``conv_patches`` uses,
  ``lax.conv_general_dilated_patches`` (a grouped one-hot conv) and ``kh*kw`` strided
  slices stacked in the same (c, kh, kw) order;
* an im2col GEMM for conv1 against the wide conv.

    python benchmarks/chip_layers.py                        # 10 chips x 500 images
    python benchmarks/chip_layers.py --chips 20 --images 1000
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from pimjax import ops, perchip, runtime
from pimjax.devices.periphery import Periphery, conv_patches, kernel_rows


def best_ms(fn, *args, repeat: int = 3) -> float:
    """Best wall time (ms) of ``repeat`` calls of ``jax.jit(fn)`` after one compile call."""
    f = jax.jit(fn)
    jax.block_until_ready(f(*args))
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def lax_patches(x, kernel_size, padding):
    """JAX's own im2col (a grouped one-hot conv), rows in (c, kh, kw) order."""
    lead = x.shape[:-3]
    p = jax.lax.conv_general_dilated_patches(x.reshape((-1, *x.shape[-3:])), kernel_size,
                                             (1, 1), padding,
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return p.reshape((*lead, *p.shape[-3:]))


def slice_patches(x, kernel_size):
    """VALID im2col from ``kh*kw`` strided slices stacked in (c, kh, kw) order."""
    kh, kw = kernel_size
    ho, wo = x.shape[-3] - kh + 1, x.shape[-2] - kw + 1
    taps = [x[..., i:i + ho, j:j + wo, :] for i in range(kh) for j in range(kw)]
    p = jnp.stack(taps, axis=-1)
    return p.reshape((*p.shape[:-2], p.shape[-2] * kh * kw))


def per_chip_op(padding):
    """The layer's chip-batched op: a stride-1 conv with ``padding``, or a dense (None)."""
    if padding is None:
        return perchip.dense
    return lambda x, w: perchip.conv2d(x, w, (1, 1), padding)


def periphery_op(periphery, padding, scale):
    """The layer's MVM through ``periphery``: ``f(x, w, read_keys)``."""
    if padding is None:
        return lambda x, w, k: periphery.matmul(x, w, scale, k)
    return lambda x, w, k: periphery.conv2d(x, w, scale, (1, 1), padding, k)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--chips", type=int, default=10)
    p.add_argument("--images", type=int, default=500)
    args = p.parse_args(argv)
    if args.chips < 1 or args.images < 1:
        p.error("--chips and --images must be >= 1")
    runtime.configure()
    c, b = args.chips, args.images
    rng = np.random.default_rng(0)

    def arr(*shape):
        return jnp.asarray(rng.normal(size=shape).astype(np.float32))

    keys = jax.random.split(jax.random.key(0), c * b).reshape(c, b)
    scale = jnp.ones((c,), jnp.float32)
    full = Periphery()
    gemm = dataclasses.replace(full, out_noise=0.0, inp_bits=None, out_bits=None,
                               noise_management="none", inp_bound=float("inf"),
                               out_bound=float("inf"))
    layers = [("conv1", arr(b, 28, 28, 1), arr(c, 5, 5, 1, 6), "SAME"),
              ("conv2", arr(c, b, 14, 14, 6), arr(c, 5, 5, 6, 16), "VALID"),
              ("fc1", arr(c, b, 400), arr(c, 400, 120), None),
              ("fc2", arr(c, b, 120), arr(c, 120, 84), None),
              ("fc3", arr(c, b, 84), arr(c, 84, 10), None)]
    print(f"jax {jax.__version__}, {os.cpu_count()} cores, affinity "
          f"{len(os.sched_getaffinity(0))}; LeNet-5 shapes, {c} chips x {b} images; best of 3, ms")
    print(f"{'layer':6s} {'perchip op':>11s} {'pcm periphery':>14s} {'periphery GEMM path':>20s}")
    for name, x, w, padding in layers:
        op = per_chip_op(padding)
        print(f"{name:6s} {best_ms(op, x, w):11.1f} "
              f"{best_ms(periphery_op(full, padding, scale), x, w, keys):14.1f} "
              f"{best_ms(periphery_op(gemm, padding, scale), x, w, keys):20.1f}")

    x1, w1 = layers[0][1], layers[0][2]
    wide = jnp.moveaxis(w1, 0, -2).reshape(5, 5, 1, c * 6)
    y1 = ops.conv2d(x1, wide, (1, 1), "SAME")

    def move(y):
        return jnp.moveaxis(y.reshape(*y.shape[:-1], c, 6), -2, 0)

    print("\nconv1 (shared input) in parts:")
    print(f"  wide conv alone [B, H, W, C*6]           "
          f"{best_ms(lambda x, w: ops.conv2d(x, w, (1, 1), 'SAME'), x1, wide):8.1f}")
    print(f"  move to chip-major [C, B, H, W, 6], alone {best_ms(move, y1):8.1f}")
    print(f"  the move fused into a ReLU               "
          f"{best_ms(lambda y: jnp.maximum(move(y), 0.0), y1):8.1f}")
    print(f"  a plain copy of the same array (y + 1)    {best_ms(lambda y: y + 1.0, y1):8.1f}")

    def im2col_conv1(x, w):
        pt = conv_patches(x, (5, 5), (1, 1), "SAME")
        return jnp.einsum("bhwk,ckn->cbhwn", pt, kernel_rows(w))

    print(f"  im2col GEMM instead of the wide conv      {best_ms(im2col_conv1, x1, w1):8.1f}")

    x2 = layers[1][1]
    print("\nconv2 per-chip im2col patches [C, B, 10, 10, 150]:")
    print(f"  gather (conv_patches)                     "
          f"{best_ms(lambda x: conv_patches(x, (5, 5), (1, 1), 'VALID'), x2):8.1f}")
    print(f"  lax.conv_general_dilated_patches          "
          f"{best_ms(lambda x: lax_patches(x, (5, 5), 'VALID'), x2):8.1f}")
    print(f"  strided slices, stacked                   "
          f"{best_ms(lambda x: slice_patches(x, (5, 5)), x2):8.1f}")


if __name__ == "__main__":
    main()
