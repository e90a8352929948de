"""Monte-Carlo sweep throughput: evaluate_chips against a one-chip loop, a shared forward, sgemm.

For each model, device (``--devices``: the paper's variability and/or aihwkit's PCM with its
periphery) and split of chips x images it prints chip-images/s and effective GFLOP/s
(conv/dense multiply-adds x 2) of

  (a) pimjax.montecarlo.evaluate_chips (chunked, chip-batched, compiled before timing),
  (b) a jitted one-chip-at-a-time loop (sample chip, forward, count; one call per chip and
      batch of up to 1000 images), timed on --loop-chips chips and extrapolated,
  (c) a shared-weight forward of the same model over the same images (no chips),
  (d) a large float32 matmul (the machine's practical peak),

the ratios a/b, a/c, a/d, and peak memory: XLA's estimate for one chunk against the budget
and the process's peak RSS. All figures of a table come from one run.

    python benchmarks/montecarlo.py                        # LeNet-5 splits + ResNet-20, reduced
    python benchmarks/montecarlo.py --lenet-splits 1000x10000 --resnet-splits 64x1000  # full
    python benchmarks/montecarlo.py --devices paper,pcm --lenet-splits 100x1000 --resnet-splits ''
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from pimjax import data, devices, introspect, layers, montecarlo, runtime
from pimjax.models import get_model

DEVICES = {"paper": devices.paper(sigma_within=0.2, sigma_between=0.1),
           "pcm": devices.pcm(), "pcm-compensated": devices.pcm(drift_compensation=True)}
READ_TIME = 86400.0  # s: the chips are read one day after programming (drift matters for pcm)


def parse_splits(text: str) -> list[tuple[int, int]]:
    """'1000x100,100x1000' -> [(1000, 100), (100, 1000)]."""
    out = []
    for item in text.split(","):
        if item.strip():
            chips, images = item.lower().split("x")
            out.append((int(chips), int(images)))
    return out


def calibrated_model(name: str, quant: str, x):
    """Init the model and set its BN statistics and activation clips with one train pass."""
    model = get_model(name, quant=quant)
    v = jax.jit(model.init)(jax.random.PRNGKey(0), x[:2])
    _, upd = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        v, x[:256])
    return model, {**v, **upd}


def best_of(fn, repeat: int) -> float:
    """Best wall time of ``repeat`` calls of ``fn`` (which must block)."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def sgemm_gflops(n: int = 4096, repeat: int = 3) -> float:
    """GFLOP/s of an n x n float32 matmul."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    f(a, a).block_until_ready()
    return 2 * n**3 / best_of(lambda: f(a, a).block_until_ready(), repeat) / 1e9


def loop_rate(model, variables, device, images, labels, loop_chips: int, repeat: int) -> float:
    """(b): chip-images/s of a jitted one-chip-at-a-time loop."""
    template = introspect.analog_kernels(variables)

    @jax.jit
    def correct(v, key, x, y):
        chip = devices.at_time(devices.sample_chip(key, device, template), READ_TIME)
        logits = model.apply(layers.with_chip(v, chip), x, rngs={"read": key})
        return jnp.sum(jnp.argmax(logits, -1) == y)

    batch = min(1000, images.shape[0])
    starts = range(0, images.shape[0], batch)
    keys = devices.chip_keys(jax.random.PRNGKey(1), loop_chips)
    sl = [(images[s:s + batch], labels[s:s + batch]) for s in starts]
    for x, y in sl:  # compile every batch shape
        correct(variables, keys[0], x, y).block_until_ready()

    def run():
        total = 0
        for i in range(loop_chips):
            for x, y in sl:
                total += correct(variables, keys[i], x, y)
        jax.block_until_ready(total)

    return loop_chips * images.shape[0] / best_of(run, repeat)


def shared_rate(model, variables, images, repeat: int) -> float:
    """(c): images/s of the plain shared-weight forward, batches of up to 1000."""
    f = jax.jit(lambda v, x: jnp.sum(jnp.argmax(model.apply(v, x), -1)))
    batch = min(1000, images.shape[0])
    xs = [images[s:s + batch] for s in range(0, images.shape[0], batch)]
    for x in xs:
        f(variables, x).block_until_ready()
    t = best_of(lambda: jax.block_until_ready([f(variables, x) for x in xs]), repeat)
    return images.shape[0] / t


def sweep_rate(model, variables, device, images, labels, chips: int, budget: int, repeat: int):
    """(a): chip-images/s of evaluate_chips, its plan and XLA's memory estimate of one chunk."""
    plan = montecarlo.plan_chunks(model, chips, images.shape[0], device=device,
                                  budget_bytes=budget, num_devices=len(jax.devices()))
    kw = dict(chips_per_chunk=plan.chips, images_per_chunk=plan.images, nominal=False,
              progress=False, budget_bytes=budget, t=READ_TIME)
    # compile on one chunk of the same shapes, then time the whole sweep
    warm = montecarlo.evaluate_chips(model, variables, device, jax.random.PRNGKey(1), plan.chips,
                                     (images[:plan.images], labels[:plan.images]), **kw)
    del warm
    t = best_of(lambda: montecarlo.evaluate_chips(
        model, variables, device, jax.random.PRNGKey(1), chips, (images, labels), **kw), repeat)
    return chips * images.shape[0] / t, plan, xla_chunk_bytes(model, variables, device, plan)


def xla_chunk_bytes(model, variables, device, plan) -> int | None:
    """XLA's peak estimate (temporaries + arguments + outputs) of one chunk's chip-batch forward
    on one device (``plan.chips / num_devices`` chips)."""
    per_device = plan.chips // plan.num_devices
    template = introspect.analog_kernels(variables)

    def sample(k):
        chip = devices.sample_chips(k, device, template, per_device)
        if not device.needs_key:
            return chip
        ids = jnp.arange(plan.images, dtype=jnp.uint32)
        return devices.with_read_keys(chip, devices.read_keys(
            devices.chip_keys(k, per_device), ids))

    chip = jax.eval_shape(sample, jax.random.PRNGKey(0))
    x = jax.ShapeDtypeStruct((plan.images, *model.input_shape), jnp.float32)
    fn = jax.jit(lambda v, c, x: montecarlo.chip_logits(model, v, c, x, mode=plan.mode))
    try:
        m = fn.lower(variables, chip, x).compile().memory_analysis()
    except Exception:  # noqa: BLE001 - an estimate only; some backends have none
        return None
    if m is None:
        return None
    return int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes)


def load_images(name: str, n: int, data_dir: str | None):
    """Normalized test images and labels of the model's dataset."""
    ds_name = "mnist" if name == "lenet5" else "cifar10"
    ds = data.load_dataset(ds_name, "test", data_dir=data_dir, limit=n)
    return data.normalize(ds.images, ds_name), np.asarray(ds.labels)


def run_model(name, splits, args, peak_gflops) -> list[dict]:
    most = max(images for _, images in splits)
    images, labels = load_images(name, most, args.data_dir)
    model, variables = calibrated_model(name, args.quant, images)
    flops = introspect.forward_flops(model)
    print(f"\n{name} {args.quant}: {flops / 1e6:.2f} MFLOP/image, chip mode "
          f"'{introspect.chip_mode(model)}', {len(jax.devices())} device(s)")
    rows = []
    for (chips, n), dev_name in [(s, d) for s in splits for d in args.devices]:
        device = DEVICES[dev_name]
        x, y = images[:n], labels[:n]
        a, plan, xla_bytes = sweep_rate(model, variables, device, x, y, chips, args.budget,
                                        args.repeat)
        b = loop_rate(model, variables, device, x, y, min(chips, args.loop_chips), args.repeat)
        c = shared_rate(model, variables, x, args.repeat)
        row = dict(model=name, device=dev_name, chips=chips, images=n, a=a, b=b, c=c, plan=plan,
                   xla_bytes=xla_bytes)
        rows.append(row)
        gf = lambda r: r * flops / 1e9  # noqa: E731
        print(f"  {dev_name}: {chips:>5d} chips x {n:>5d} images  chunk "
              f"{plan.chips}x{plan.images} ({plan.mode})")
        print(f"    (a) evaluate_chips  {a:10.0f} chip-img/s {gf(a):6.2f} GFLOP/s")
        print(f"    (b) one-chip loop   {b:10.0f} chip-img/s {gf(b):6.2f} GFLOP/s")
        print(f"    (c) shared forward  {c:10.0f}      img/s {gf(c):6.2f} GFLOP/s")
        print(f"    (d) sgemm                              {peak_gflops:6.2f} GFLOP/s")
        print(f"    a/b {a / b:5.2f}   a/c {a / c:5.2f}   a/d {gf(a) / peak_gflops:5.3f}")
        est = plan.estimated_bytes / 2**20
        xla = "n/a" if xla_bytes is None else f"{xla_bytes / 2**20:.0f} MiB"
        print(f"    memory per device: XLA {xla}, planner {est:.0f} MiB, budget "
              f"{plan.budget_bytes / 2**20:.0f} MiB; process peak RSS "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lenet-splits", default="1000x100,100x1000,10x10000",
                   help="chips x images for LeNet-5 on MNIST (full: 1000x10000)")
    p.add_argument("--resnet-splits", default="16x500",
                   help="chips x images for ResNet-20 on CIFAR-10 (full: 64x1000); '' skips")
    p.add_argument("--quant", default="A8W4")
    p.add_argument("--devices", default="paper",
                   help=f"comma list of devices to time, of {tuple(DEVICES)} (read at 1 day)")
    p.add_argument("--loop-chips", type=int, default=20, help="chips timed for (b)")
    p.add_argument("--repeat", type=int, default=1, help="timed repeats (best of)")
    p.add_argument("--budget-mb", type=int, default=1024, help="memory budget per device")
    p.add_argument("--data-dir", default=None,
                   help="folder with CIFAR-10 for ResNet-20 (default: $PIMJAX_DATA_DIR)")
    args = p.parse_args(argv)
    args.devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    unknown = sorted(set(args.devices) - set(DEVICES))
    if unknown or not args.devices:
        p.error(f"--devices {unknown or args.devices} unknown: use a comma list of "
                f"{tuple(DEVICES)}")
    runtime.configure()
    args.budget = args.budget_mb * 2**20
    peak = sgemm_gflops()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {os.cpu_count()} cores; "
          f"sgemm 4096^3: {peak:.1f} GFLOP/s")
    rows = []
    if args.lenet_splits:
        rows += run_model("lenet5", parse_splits(args.lenet_splits), args, peak)
    if args.resnet_splits:
        rows += run_model("resnet20", parse_splits(args.resnet_splits), args, peak)
    print("\nsummary (chip-images/s): model, device, chips x images, a, b, c, a/b, a/c, a/d")
    for r in rows:
        flops = introspect.forward_flops(get_model(r["model"], quant=args.quant))
        print(f"  {r['model']:9s} {r['device']:16s} {r['chips']:>5d}x{r['images']:<6d} "
              f"{r['a']:9.0f} {r['b']:9.0f} {r['c']:9.0f}  {r['a'] / r['b']:5.2f} "
              f"{r['a'] / r['c']:5.2f} {r['a'] * flops / 1e9 / peak:6.3f}")
    base = {(r["model"], r["chips"], r["images"]): r["a"] for r in rows if r["device"] == "paper"}
    for r in rows:
        ref = base.get((r["model"], r["chips"], r["images"]))
        if r["device"] != "paper" and ref:
            print(f"  {r['model']} {r['chips']}x{r['images']}: {r['device']} runs at "
                  f"{r['a'] / ref:.2f}x the paper device's chip-images/s")


if __name__ == "__main__":
    main()
