"""Validate pimjax's PCM and periphery parts against IBM aihwkit 1.1 itself.

aihwkit (torch) and pimjax (jax) live in two Python environments, so the script runs its
aihwkit half under the interpreter given by ``--aihwkit-python`` (an environment with
``aihwkit==1.1.0`` and torch; it imports nothing of pimjax), which writes its samples to an
``.npz``; this process then draws pimjax's samples and compares:

1. conductances (``PCMLikeNoiseModel`` methods on target conductances, ``n`` cells per target):
   programmed, drifted (read noise off) and read-noisy conductances at t = 1 s, 1 h, 1 day,
   1 year, by two-sample Kolmogorov-Smirnov tests;
2. weights through aihwkit's inference tile (``AnalogLinear`` + ``TorchInferenceRPUConfig``:
   ``program_analog_weights`` then ``drift_analog_weights(t)``, which converts the programmed
   weights back to a conductance pair) against ``PCM(reconvert=True).apply``, KS per weight level;
3. the periphery: noise-free MVMs (noise management, DAC, ADC, tiles of ``AnalogLinear``
   with 1100 inputs, an ``AnalogConv2d``) exactly, and the output-noise distribution by KS.

Usage (from the repository root)::

    PYTHONPATH=. python benchmarks/aihwkit_validation.py --aihwkit-python PATH/bin/python
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np

TIMES = {"1 s": 1.0, "1 h": 3600.0, "1 day": 86400.0, "1 year": 365 * 86400.0}
LEVELS = (0.0, 1.0, 5.0, 12.5, 20.0, 25.0)  # target conductances, µS
WEIGHT_LEVELS = (-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0)  # x max|W|
W_SHAPE = (200, 500)  # torch layout [out, in]: 1e5 cells, one tile
PER_CHIP = 100  # cells per weight level and chip kept for the weight-level KS tests


def weight_case(seed: int):
    """The weight matrix (torch layout, levels x 0.3) and the kept cell positions."""
    rng = np.random.default_rng(seed)
    w = rng.choice(np.asarray(WEIGHT_LEVELS, np.float32), size=W_SHAPE) * np.float32(0.3)
    w[0, 0] = 0.3  # the max is always present
    flat = w.ravel()
    idx = np.concatenate([rng.choice(np.flatnonzero(np.isclose(flat, 0.3 * v)), PER_CHIP,
                                     replace=False) for v in WEIGHT_LEVELS])
    return w, idx


# ------------------------------------------------------------------ aihwkit side


def aihwkit_side(out_path: str, n: int, chips: int, seed: int) -> None:
    """Draw aihwkit's samples (runs under the aihwkit interpreter) and save them."""
    import torch
    from aihwkit.inference.noise.pcm import PCMLikeNoiseModel
    from aihwkit.nn import AnalogConv2d, AnalogLinear
    from aihwkit.simulator.configs import TorchInferenceRPUConfig
    from aihwkit.simulator.parameters.enums import BoundManagementType
    from aihwkit.simulator.parameters.io import IOParameters
    from aihwkit.simulator.tiles.analog_mvm import AnalogMVM

    torch.manual_seed(seed)
    torch.set_num_threads(1)
    res = {}
    # 1. conductances
    model = PCMLikeNoiseModel()
    no_read = PCMLikeNoiseModel(read_noise_scale=0.0)
    for level in LEVELS:
        g_t = torch.full((n,), level, dtype=torch.float32)
        g_p = model.apply_programming_noise_to_conductance(g_t)
        nu = model.generate_drift_coefficients(g_t)
        res[f"cond/prog/{level}"] = g_p.numpy()
        res[f"cond/nu/{level}"] = nu.numpy()
        for name, t in TIMES.items():
            res[f"cond/drift/{level}/{name}"] = no_read.apply_drift_noise_to_conductance(
                g_p, nu, t).numpy()
            res[f"cond/final/{level}/{name}"] = model.apply_drift_noise_to_conductance(
                g_p, nu, t).numpy()

    # 2. weights through the inference tile: `chips` programmings of one 1e5-cell layer; all
    # cells of a chip share its re-conversion factor, so only `per_chip` cells per weight
    # level and chip are kept (fixed positions): the pooled cells are then nearly independent
    w, idx = weight_case(seed)
    res["weights/w"] = w
    layer = AnalogLinear(W_SHAPE[1], W_SHAPE[0], bias=False, rpu_config=TorchInferenceRPUConfig())
    layer.set_weights(torch.from_numpy(w))
    layer.eval()
    res["weights/factor"] = np.zeros((chips,), np.float32)
    for name in TIMES:
        res[f"weights/{name}"] = np.zeros((chips, *idx.shape), np.float32)
    for c in range(chips):
        layer.program_analog_weights()
        wp = layer.analog_module.tile.get_weights().numpy()
        res["weights/factor"][c] = np.abs(wp).max() / np.abs(w).max()
        for name, t in TIMES.items():
            layer.drift_analog_weights(t)
            res[f"weights/{name}"][c] = layer.analog_module.tile.get_weights().numpy().ravel()[idx]

    # 3. periphery: noise-free MVMs ...
    rng = np.random.default_rng(seed + 7)
    io = IOParameters(out_noise=0.0, bound_management=BoundManagementType.NONE)
    x = rng.normal(size=(256, 300)).astype(np.float32)
    wm = rng.normal(size=(40, 300)).astype(np.float32)
    wm /= np.abs(wm).max()
    res["mvm/x"], res["mvm/w"] = x, wm
    res["mvm/y"] = AnalogMVM.matmul(torch.from_numpy(wm), torch.from_numpy(x), io,
                                    is_test=True).numpy()
    # ... the output noise of one input vector read n times ...
    io_noisy = IOParameters(bound_management=BoundManagementType.NONE)
    xr = np.repeat(x[:1], n, axis=0)
    res["mvm/y_noisy"] = AnalogMVM.matmul(torch.from_numpy(wm), torch.from_numpy(xr), io_noisy,
                                          is_test=True).numpy()[:, :8]

    def config():
        cfg = TorchInferenceRPUConfig()
        cfg.forward.out_noise = 0.0
        cfg.forward.bound_management = BoundManagementType.NONE
        cfg.mapping.weight_scaling_omega = 1.0
        return cfg

    # ... a layer of 1100 inputs on 3 tiles (each tile holds the layer's max) ...
    wt = rng.normal(size=(10, 1100)).astype(np.float32)
    for start in (0, 367, 734):
        wt[0, start] = 10.0
    xt = rng.normal(size=(64, 1100)).astype(np.float32)
    lin = AnalogLinear(1100, 10, bias=False, rpu_config=config())
    lin.set_weights(torch.from_numpy(wt))
    lin.eval()
    res["tiles/w"], res["tiles/x"] = wt, xt
    res["tiles/n_tiles"] = np.asarray(lin.analog_module.analog_tile_count)
    with torch.no_grad():
        res["tiles/y"] = lin(torch.from_numpy(xt)).numpy()
    # ... and a VALID 5x5 conv (150 rows: c, kh, kw)
    wc = rng.normal(size=(16, 6, 5, 5)).astype(np.float32)
    xc = np.maximum(rng.normal(size=(4, 6, 14, 14)), 0).astype(np.float32)
    conv = AnalogConv2d(6, 16, 5, bias=False, rpu_config=config())
    conv.set_weights(torch.from_numpy(wc))
    conv.eval()
    res["conv/w"], res["conv/x"] = wc, xc
    with torch.no_grad():
        res["conv/y"] = conv(torch.from_numpy(xc)).numpy()
    np.savez_compressed(out_path, **res)


# ------------------------------------------------------------------- pimjax side


def _ks(a, b):
    from scipy.stats import ks_2samp

    r = ks_2samp(np.ravel(a), np.ravel(b))
    return float(r.statistic), float(r.pvalue)


def compare(ref, n: int, chips: int, seed: int) -> list[tuple[str, float, float]]:
    """Draw pimjax's samples and return (name, KS statistic, p-value) rows; print exact checks."""
    import jax
    import jax.numpy as jnp

    from pimjax.devices.pcm import PCM
    from pimjax.devices.periphery import Periphery, split_sizes

    rows = []
    pcm = PCM()
    key = jax.random.key(seed)
    print("1. conductances (µS targets), n =", n, "cells each")
    for i, level in enumerate(LEVELS):
        k = jax.random.fold_in(key, i)
        z = jax.random.normal(k, (3, n), jnp.float32)
        g_t = jnp.full((n,), level, jnp.float32)
        g_p = pcm.program(g_t, z[0])
        nu = pcm.drift_exponent(g_t, z[1])
        rows.append((f"prog   g={level:>4} µS", *_ks(g_p, ref[f"cond/prog/{level}"])))
        rows.append((f"nu     g={level:>4} µS", *_ks(nu, ref[f"cond/nu/{level}"])))
        for name, t in TIMES.items():
            g_d = pcm.drift(g_p, nu, t)
            g_f = pcm.read(g_d, g_p, z[2], t)
            rows.append((f"drift  g={level:>4} µS t={name}",
                         *_ks(g_d, ref[f"cond/drift/{level}/{name}"])))
            rows.append((f"final  g={level:>4} µS t={name}",
                         *_ks(g_f, ref[f"cond/final/{level}/{name}"])))

    print(f"2. weights through the tile, {chips} chips x {PER_CHIP} cells per level and chip")
    w_torch, idx = weight_case(seed - 1)  # the aihwkit side's case (its seed)
    np.testing.assert_array_equal(w_torch, ref["weights/w"])
    w = jnp.asarray(w_torch.T)  # pimjax layout [in, out]
    # position i of the torch [out, in] layout is position (i % in, i // in) of [in, out]
    ri, ci = idx % W_SHAPE[1], idx // W_SHAPE[1]

    @jax.jit
    def chips_at(keys, t):
        def one(k):
            st = pcm.sample(k, w)
            s = pcm.stages(w, st, t)
            return pcm.apply(w, st, t)[ri, ci], s["factor"]

        return jax.lax.map(one, keys)

    keys = jax.random.split(jax.random.fold_in(key, 1000), chips)
    for name, t in TIMES.items():
        ours = []
        for lo in range(0, chips, 50):
            ours.append(np.asarray(chips_at(keys[lo:lo + 50], t)[0]))
        ours = np.concatenate(ours)
        theirs = ref[f"weights/{name}"]
        levels = np.asarray(w_torch).ravel()[idx]
        for level in WEIGHT_LEVELS:
            mask = np.broadcast_to(np.isclose(levels, 0.3 * level), ours.shape)
            rows.append((f"weight w={level:>5}·max t={name}", *_ks(ours[mask], theirs[mask])))
    factors = np.concatenate([np.asarray(chips_at(keys[lo:lo + 50], 0.0)[1])
                              for lo in range(0, chips, 50)])
    rows.append(("re-conversion factor max|w_P|/max|w|", *_ks(factors, ref["weights/factor"])))

    print("3. periphery, noise-free (differences in ADC steps of the normalised output)")
    per0 = Periphery(out_noise=0.0)
    step = 24.0 / 510
    y = np.asarray(per0.matmul(jnp.asarray(ref["mvm/x"]), jnp.asarray(ref["mvm/w"]).T, 1.0))
    a = np.abs(ref["mvm/x"]).max(axis=1, keepdims=True)
    d = np.abs(y - ref["mvm/y"]) / (a * step)
    print(f"   MVM 256x300x40:  max |diff| = {d.max():.3g} steps, "
          f"{np.mean(d > 0.5):.2%} of outputs differ")
    wt, xt = ref["tiles/w"], ref["tiles/x"]
    print(f"   tiles: aihwkit {int(ref['tiles/n_tiles'])} tiles, pimjax {split_sizes(1100, 512)}")
    yt = np.asarray(per0.matmul(jnp.asarray(xt), jnp.asarray(wt).T, float(np.abs(wt).max())))
    dt = np.abs(yt - ref["tiles/y"]) / (np.abs(xt).max(axis=1, keepdims=True)
                                        * np.abs(wt).max() * step)
    print(f"   1100-input layer: max |diff| = {dt.max():.3g} steps, max |rel diff| = "
          f"{np.max(np.abs(yt - ref['tiles/y'])) / np.abs(ref['tiles/y']).max():.3g}")
    wc, xc = ref["conv/w"], ref["conv/x"]
    wk = jnp.asarray(wc.transpose(2, 3, 1, 0))  # OIHW -> HWIO
    yc = per0.conv2d(jnp.asarray(xc.transpose(0, 2, 3, 1)), wk, float(np.abs(wc).max()),
                     padding="VALID")
    yc = np.asarray(yc).transpose(0, 3, 1, 2)
    print(f"   conv 5x5 6->16 VALID: max |rel diff| = "
          f"{np.max(np.abs(yc - ref['conv/y'])) / np.abs(ref['conv/y']).max():.3g}")
    per = Periphery()
    xr = jnp.broadcast_to(jnp.asarray(ref["mvm/x"][:1]), (n, ref["mvm/x"].shape[1]))
    keys = jax.random.split(jax.random.fold_in(key, 2000), n)
    yn = np.asarray(per.matmul(xr, jnp.asarray(ref["mvm/w"]).T, 1.0, keys))[:, :8]
    for j in range(8):
        rows.append((f"output noise, output {j}", *_ks(yn[:, j], ref["mvm/y_noisy"][:, j])))
    return rows


def main(argv=None) -> int:
    """Run both sides and print the KS table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--aihwkit-python", default=os.environ.get("AIHWKIT_PYTHON"),
                   help="interpreter with aihwkit 1.1.0 (or env AIHWKIT_PYTHON)")
    p.add_argument("--cells", type=int, default=100_000)
    p.add_argument("--chips", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--side", choices=("aihwkit",), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--reference", help="reuse an .npz written by an earlier aihwkit run")
    args = p.parse_args(argv)
    if args.side == "aihwkit":
        aihwkit_side(args.out, args.cells, args.chips, args.seed)
        return 0
    if args.reference is None and not args.aihwkit_python:
        print("error: --aihwkit-python is required (an interpreter with aihwkit==1.1.0)",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        path = args.reference or os.path.join(tmp, "aihwkit.npz")
        if args.reference is None:
            env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
            env.pop("PYTHONPATH", None)
            subprocess.run([args.aihwkit_python, os.path.abspath(__file__), "--side", "aihwkit",
                            "--out", path, "--cells", str(args.cells), "--chips",
                            str(args.chips), "--seed", str(args.seed)], check=True, env=env)
        with np.load(path) as f:
            ref = dict(f)
    rows = compare(ref, args.cells, args.chips, args.seed + 1)
    print(f"\n{'quantity':<40} {'KS D':>8} {'p-value':>8}")
    for name, d, pv in rows:
        print(f"{name:<40} {d:8.4f} {pv:8.3f}")
    pvals = np.array([r[2] for r in rows])
    print(f"\n{len(rows)} KS tests: min p = {pvals.min():.3g}, {np.sum(pvals < 0.01)} below 0.01 "
          f"(expected by chance {0.01 * len(rows):.1f}), max D = {max(r[1] for r in rows):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
