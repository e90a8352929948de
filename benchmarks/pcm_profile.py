"""Where the pcm sweep's time goes: LeNet-5 ``evaluate_chips`` with one stage removed at a time.

The pcm device (aihwkit 1.1's PCM on differential pairs with its default periphery) runs
each analog MVM as: the chip's weights (programming noise, drift, 1/f read noise), the
input's abs-max noise management, the 7-bit DAC, the tile GEMM on im2col patches, Gaussian
output noise re-drawn at every read, and the 9-bit ADC. This benchmark times the same sweep
(same model, chips, images and read time) with

  pcm             the full device,
  no-out-noise    output noise 0 (no per-read draws),
  no-converters   no DAC/ADC rounding (clipping kept),
  no-nm           no noise management,
  gemm-only       a periphery that only normalises and multiplies (no NM, no converters,
                  no noise): the im2col GEMM path itself,
  no-periphery    the weight parts only, computed by the ideal conv/matmul (``pcm(periphery=
                  False)``),
  paper           the paper's multiplicative variability (one weight part),

each timed ``--repeat`` times in alternating order (best of), all in one run, and prints each
variant's chip-images/s and its share of the full device's time. The difference between two
rows is the cost of the stage that separates them.

    python benchmarks/pcm_profile.py                          # 100 chips x 1000 images
    python benchmarks/pcm_profile.py --chips 20 --images 500  # a quicker look
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jax
from montecarlo import READ_TIME, calibrated_model, load_images

from pimjax import devices, montecarlo, runtime


def variants() -> dict[str, devices.Device]:
    """The devices timed, each the pcm device with one stage removed (see the docstring)."""
    full = devices.pcm()
    p = full.periphery

    def with_periphery(**changes) -> devices.Device:
        return dataclasses.replace(full, periphery=dataclasses.replace(p, **changes))

    return {
        "pcm": full,
        "no-out-noise": with_periphery(out_noise=0.0),
        "no-converters": with_periphery(inp_bits=None, out_bits=None),
        "no-nm": with_periphery(noise_management="none"),
        "gemm-only": with_periphery(out_noise=0.0, inp_bits=None, out_bits=None,
                                    noise_management="none", inp_bound=float("inf"),
                                    out_bound=float("inf")),
        "no-periphery": devices.pcm(periphery=False),
        "paper": devices.paper(sigma_within=0.2, sigma_between=0.1),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--chips", type=int, default=100)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--quant", default="A8W4")
    p.add_argument("--repeat", type=int, default=2, help="timed rounds (best of)")
    p.add_argument("--budget-mb", type=int, default=1024, help="memory budget per device")
    args = p.parse_args(argv)
    if args.chips < 1 or args.images < 1 or args.repeat < 1:
        p.error("--chips, --images and --repeat must be >= 1")
    runtime.configure()
    images, labels = load_images("lenet5", args.images, None)
    model, variables = calibrated_model("lenet5", args.quant, images)
    budget = args.budget_mb * 2**20
    devs = variants()
    calls = {}
    for name, device in devs.items():
        plan = montecarlo.plan_chunks(model, args.chips, args.images, device=device,
                                      budget_bytes=budget)
        kw = dict(chips_per_chunk=plan.chips, images_per_chunk=plan.images, nominal=False,
                  progress=False, budget_bytes=budget, t=READ_TIME)
        montecarlo.evaluate_chips(model, variables, device, jax.random.PRNGKey(1), plan.chips,
                                  (images[:plan.images], labels[:plan.images]), **kw)  # compile
        calls[name] = (plan, lambda device=device, kw=kw: montecarlo.evaluate_chips(
            model, variables, device, jax.random.PRNGKey(1), args.chips, (images, labels),
            **kw))
    best = {name: float("inf") for name in devs}
    names = list(devs)
    for r in range(args.repeat):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            calls[name][1]()
            best[name] = min(best[name], time.perf_counter() - t0)
    work = args.chips * args.images
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {os.cpu_count()} cores, "
          f"affinity {len(os.sched_getaffinity(0))}; LeNet-5 {args.quant}, {args.chips} chips x "
          f"{args.images} images, read at {READ_TIME:.0f} s, best of {args.repeat}")
    print(f"{'variant':14s} {'chunk':>10s} {'s':>8s} {'chip-img/s':>11s} {'of pcm':>7s}")
    for name in names:
        plan = calls[name][0]
        print(f"{name:14s} {plan.chips:>4d}x{plan.images:<5d} {best[name]:8.2f} "
              f"{work / best[name]:11.0f} {best[name] / best['pcm']:7.2f}")
    print(f"stage costs (share of pcm's time): output noise "
          f"{1 - best['no-out-noise'] / best['pcm']:.2f}, converters "
          f"{1 - best['no-converters'] / best['pcm']:.2f}, noise management "
          f"{1 - best['no-nm'] / best['pcm']:.2f}, periphery overall "
          f"{1 - best['no-periphery'] / best['pcm']:.2f}")
    return best


if __name__ == "__main__":
    main()
