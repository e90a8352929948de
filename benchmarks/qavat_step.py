"""Cost of variability-aware training: qavat step time over qat step time, side by side.

A qavat step draws a fresh chip (one Gaussian factor per analog weight) and multiplies it
into the quantized weights; a qat step does neither. Both steps are compiled first, then
timed in alternating rounds so that load on a shared machine hits both alike; the median
round gives the step time. Target: qavat / qat <= 1.3.

    python benchmarks/qavat_step.py                       # LeNet-5 b256, ResNet-20 b128
    python benchmarks/qavat_step.py --cases lenet5:256 --rounds 10 --steps 10
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from pimjax import data, devices, runtime
from pimjax import train as T
from pimjax.introspect import analog_kernels
from pimjax.models import ModelConfig
from pimjax.quant import QuantConfig

DATASET = {"lenet5": "mnist", "vgg11": "cifar10", "resnet20": "cifar10", "resnet18": "cifar10"}


def build(model: str, method: str, batch: int, quant: str, sigma: float, width: float):
    """A train state, one batch of random data and the keys for ``model`` and ``method``."""
    cfg = T.TrainConfig(
        train_method=method, model=ModelConfig(model, width),
        data=T.DataConfig(DATASET[model], augment=False), quant=QuantConfig.parse(quant),
        device=devices.DeviceConfig(sigma_within=sigma if method == "qavat" else 0.0),
        optim=T.OptimConfig(optimizer="sgd", lr=0.01, batch_size=batch))
    shape = data.info(cfg.data.name).image_shape
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, *shape), dtype=np.uint8)
    labels = rng.integers(0, 10, (batch,), dtype=np.int32)
    key = jax.random.PRNGKey(0)
    state = T.create_train_state(cfg, key, np.zeros((1, *shape), np.float32), 10 * batch)
    return state, (jax.device_put(images), jax.device_put(labels)), key


def run_steps(state, batch, key, n: int):
    """Run ``n`` train steps and wait for them; return the new state and the seconds taken."""
    t0 = time.perf_counter()
    for _ in range(n):
        state, metrics = T.train_step(state, batch, key, key)
    jax.block_until_ready((state.params, metrics))
    return state, time.perf_counter() - t0


def bench_case(model: str, batch: int, args) -> dict:
    """Compile both methods, then time them in alternating rounds."""
    states, compile_s = {}, {}
    for method in ("qat", "qavat"):
        state, data, key = build(model, method, batch, args.quant, args.sigma, args.width)
        t0 = time.perf_counter()
        state, _ = run_steps(state, data, key, 1)  # compile + one step
        compile_s[method] = time.perf_counter() - t0
        state, _ = run_steps(state, data, key, args.warmup)
        states[method] = (state, data, key)
    times = {"qat": [], "qavat": []}
    for r in range(args.rounds):
        order = ("qat", "qavat") if r % 2 == 0 else ("qavat", "qat")
        for method in order:
            state, data, key = states[method]
            state, dt = run_steps(state, data, key, args.steps)
            states[method] = (state, data, key)
            times[method].append(dt / args.steps)
    # the chip draw alone, for reference
    state = states["qavat"][0]
    template = analog_kernels(state.variables)
    device = state.config.device.build()
    draw = jax.jit(lambda k: devices.sample_chip(k, device, template))
    jax.block_until_ready(draw(jax.random.PRNGKey(1)))
    t0 = time.perf_counter()
    for i in range(20):
        chip = draw(jax.random.PRNGKey(i))
    jax.block_until_ready(chip)
    chip_s = (time.perf_counter() - t0) / 20
    qat, qavat = float(np.median(times["qat"])), float(np.median(times["qavat"]))
    n_weights = sum(int(np.prod(k.shape)) for k in jax.tree.leaves(template))
    return {"case": f"{model} w{args.width:g} b{batch}", "qat_ms": 1e3 * qat,
            "qavat_ms": 1e3 * qavat, "ratio": qavat / qat, "chip_ms": 1e3 * chip_s,
            "analog_weights": n_weights, "qat_img_s": batch / qat, "qavat_img_s": batch / qavat,
            "compile_qat_s": compile_s["qat"], "compile_qavat_s": compile_s["qavat"]}


def main(argv=None):
    """Parse flags, run every case, print a table."""
    runtime.configure()
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="lenet5:256,resnet20:128",
                        help="comma-separated model:batch pairs")
    parser.add_argument("--quant", default="W2A4")
    parser.add_argument("--sigma", type=float, default=0.3, help="qavat sigma_within")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=5, help="alternating timing rounds")
    parser.add_argument("--steps", type=int, default=5, help="steps per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    args = parser.parse_args(argv)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.device_count()} device), "
          f"{args.quant}, qavat sigma_within {args.sigma}, median of {args.rounds} rounds x "
          f"{args.steps} steps", flush=True)
    rows = []
    for case in args.cases.split(","):
        model, batch = case.split(":")
        row = bench_case(model, int(batch), args)
        rows.append(row)
        print(f"{row['case']:<20} qat {row['qat_ms']:8.1f} ms  qavat {row['qavat_ms']:8.1f} ms  "
              f"ratio {row['ratio']:.3f}  (chip draw {row['chip_ms']:.2f} ms for "
              f"{row['analog_weights']} weights; compile {row['compile_qat_s']:.0f}s/"
              f"{row['compile_qavat_s']:.0f}s)", flush=True)
    print("\ncase                 qat img/s  qavat img/s  qavat/qat  target <= 1.3")
    for row in rows:
        verdict = "ok" if row["ratio"] <= 1.3 else "over"
        print(f"{row['case']:<20} {row['qat_img_s']:9.0f}  {row['qavat_img_s']:11.0f}  "
              f"{row['ratio']:9.3f}  {verdict}")
    return rows


if __name__ == "__main__":
    main()
