"""Time a conv's forward, XLA's gradient and pimjax.ops.conv2d's gradient on LeNet-5/ResNet-20.

Usage: ``python benchmarks/conv_grad.py [--reps 7] [--only NAME,...] [--variants]``

For every shape: the median (and min) of ``--reps`` timed runs after a warm-up, each ended by
``block_until_ready``, of the jitted forward ``lax.conv_general_dilated``, XLA's reference
``jax.vjp`` of it (input and weight gradients), and ``ops.conv2d``'s (the custom VJP).
``ref/ours`` is the speed-up of the backward. ``--variants`` also times each weight-gradient
layout and input-gradient formulation of ``pimjax.ops`` alone, the numbers its dispatch rules
were chosen from. Timings on a shared CPU are noisy: compare the minima.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pimjax import ops, runtime

DN = ("NHWC", "HWIO", "NHWC")
# name: (batch, H, W, Cin, Cout, kernel, stride, padding)
SHAPES = {
    "lenet5 c1 28x28x1->6 5x5": (256, 28, 28, 1, 6, 5, 1, "SAME"),
    "lenet5 c2 14x14x6->16 5x5 V": (256, 14, 14, 6, 16, 5, 1, "VALID"),
    "resnet20 stem 32x32x3->16": (128, 32, 32, 3, 16, 3, 1, "SAME"),
    "resnet20 32x32x16->16": (128, 32, 32, 16, 16, 3, 1, "SAME"),
    "resnet20 16x16x32->32": (128, 16, 16, 32, 32, 3, 1, "SAME"),
    "resnet20 8x8x64->64": (128, 8, 8, 64, 64, 3, 1, "SAME"),
    "resnet20 s2 32x32x16->32": (128, 32, 32, 16, 32, 3, 2, "SAME"),
    "resnet20 s2 16x16x32->64": (128, 16, 16, 32, 64, 3, 2, "SAME"),
    "resnet20 proj 1x1 s2 16->32": (128, 32, 32, 16, 32, 1, 2, "SAME"),
    "issue5 256x32x32x32 3x3": (256, 32, 32, 32, 32, 3, 1, "SAME"),
}


def timeit(fn, *args, reps: int) -> tuple[float, float]:
    """(median, min) seconds of ``fn(*args)`` over ``reps`` runs after one warm-up."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times)), float(np.min(times))


def make(shape):
    """Random ``x``, ``w``, cotangent ``g`` and the conv's strides and padding for a shape."""
    b, h, w_, cin, cout, k, s, pad = shape
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (b, h, w_, cin))
    w = jax.random.normal(kw, (k, k, cin, cout)) / np.sqrt(k * k * cin)
    y = jax.eval_shape(lambda x, w: ops.conv2d(x, w, (s, s), pad), x, w)
    return x, w, jax.random.normal(kg, y.shape), (s, s), pad


def rel_err(a, b) -> float:
    """``|a - b| / |b|`` in the Frobenius norm."""
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def bench(shape, reps: int) -> dict:
    """Forward, reference-gradient and ours-gradient timings (and errors) for one shape."""
    x, w, g, strides, pad = make(shape)
    ref = lambda x, w: lax.conv_general_dilated(x, w, strides, pad, dimension_numbers=DN)
    ours = lambda x, w: ops.conv2d(x, w, strides, pad, grad="custom")
    fwd = jax.jit(ref)
    ref_bwd = jax.jit(lambda x, w, g: jax.vjp(ref, x, w)[1](g))
    our_bwd = jax.jit(lambda x, w, g: jax.vjp(ours, x, w)[1](g))
    (rx, rw), (ox, ow) = ref_bwd(x, w, g), our_bwd(x, w, g)
    # Interleave the candidates so that load from other processes hits them alike.
    out = {"fwd": [], "ref": [], "ours": []}
    for _ in range(reps):
        for key, fn, args in (
            ("fwd", fwd, (x, w)),
            ("ref", ref_bwd, (x, w, g)),
            ("ours", our_bwd, (x, w, g)),
        ):
            out[key].append(timeit(fn, *args, reps=1)[0])
    res = {k: (float(np.median(v)), float(np.min(v))) for k, v in out.items()}
    res["err"] = max(rel_err(ox, rx), rel_err(ow, rw))
    return res


def bench_variants(shape, reps: int) -> str:
    """Min times of each weight-gradient layout and input-gradient formulation alone."""
    x, w, g, strides, pad = make(shape)
    pads = ops.explicit_pads(x.shape, w.shape, strides, pad)
    ref = lambda x, w: lax.conv_general_dilated(x, w, strides, pad, dimension_numbers=DN)
    kernel = w.shape[:2]
    cands = {
        "dw:xla": jax.jit(lambda x, w, g: jax.vjp(lambda w: ref(x, w), w)[1](g)[0]),
        "dx:xla": jax.jit(lambda x, w, g: jax.vjp(lambda x: ref(x, w), x)[1](g)[0]),
    }
    for layout in ("nhwc", "cf"):
        cands[f"dw:{layout}"] = jax.jit(
            lambda x, w, g, layout=layout: ops.weight_grad(x, g, kernel, strides, pads, layout)
        )
    forms = ["col2im", "subpixel"] + (["transpose"] if strides == (1, 1) else [])
    for m in forms:
        cands[f"dx:{m}"] = jax.jit(
            lambda x, w, g, m=m: ops.input_grad(g, w, x.shape, strides, pads, m)
        )
    times = {k: timeit(f, x, w, g, reps=reps)[1] for k, f in cands.items()}
    return "  ".join(f"{k} {v * 1e3:.1f}" for k, v in times.items())


def main():
    """Print the table."""
    runtime.configure()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--only", default="", help="comma-separated substrings of shape names")
    ap.add_argument("--variants", action="store_true", help="also time each formulation")
    args = ap.parse_args()
    names = [n for n in SHAPES if not args.only or any(s in n for s in args.only.split(","))]
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; ms, median (min) of {args.reps}")
    head = f"{'shape':30s} {'forward':>15s} {'XLA grad':>17s} {'ours grad':>15s} {'ref/ours':>8s}"
    print(head + " (of min)  max rel err")
    for name in names:
        r = bench(SHAPES[name], args.reps)
        cell = lambda k, r=r: f"{r[k][0] * 1e3:7.1f} ({r[k][1] * 1e3:6.1f})"
        ratio, ratio_min = r["ref"][0] / r["ours"][0], r["ref"][1] / r["ours"][1]
        print(
            f"{name:30s} {cell('fwd')} {cell('ref'):>17s} {cell('ours')} {ratio:7.1f}x"
            f" ({ratio_min:5.1f}x)  {r['err']:.1e}",
            flush=True,
        )
        if args.variants:
            print("    " + bench_variants(SHAPES[name], args.reps), flush=True)


if __name__ == "__main__":
    main()
