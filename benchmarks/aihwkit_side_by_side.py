"""Monte-Carlo speed, pimjax vs IBM aihwkit 1.1, on the same LeNet-5 weights and the same physics.

Both simulators evaluate N chips x M MNIST test images, each chip a fresh programming of the
same quantized LeNet-5 (W2A4) read at ``--t`` seconds:

* **pcm** (the same physics on both sides): pimjax ``devices.pcm()`` in
  :func:`pimjax.montecarlo.evaluate_chips` (chip-batched); aihwkit's
  ``TorchInferenceRPUConfig`` with its ``PCMLikeNoiseModel`` and default periphery (7-bit
  DAC, 9-bit ADC, output noise 0.06, 512-row tiles), ``weight_scaling_omega = 1``, bound
  management and drift compensation off (``benchmarks/aihwkit_lenet.py``'s
  ``default_rpu_config``, see docs/devices.md), one chip at a time as aihwkit runs;
* **perfect** periphery: pimjax ``devices.pcm(periphery=False)``; aihwkit
  ``forward.is_perfect = True`` (programming noise, drift and read noise only);
* **paper**: pimjax's paper model (sigma 0.3) against aihwkit's default periphery, the
  comparison of the first table row (not the same physics: for scale only).

aihwkit runs in its own environment (``--aihwkit-python``, torch with
``OMP_WAIT_POLICY=PASSIVE``) as a worker process that this script drives, so the two
simulators alternate within one run (order swapped every repeat) and each figure is a ratio of
medians measured side by side. pimjax's programs are compiled before timing.

    PYTHONPATH=. python benchmarks/aihwkit_side_by_side.py \\
        --aihwkit-python /path/to/aihwkit-venv/bin/python --splits 100x1000,1000x100

``--run RUN_DIR`` takes a trained run (pimjax.train); without it a calibrated, untrained
LeNet-5 W2A4 is used: the time per chip-image does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SETUPS = ("pcm", "perfect", "paper")


# ----------------------------------------------------------------------- aihwkit worker side


def worker(npz: str) -> int:
    """(aihwkit env) Read ``setup chips images t seed`` lines; answer ``{"seconds", "mean"}``."""
    import numpy as np
    import torch

    sys.path.insert(0, str(HERE))
    from aihwkit_lenet import build_lenet, default_rpu_config, evaluate

    torch.set_num_threads(int(os.environ.get("AIHWKIT_THREADS", os.cpu_count() or 1)))
    data = dict(np.load(npz))
    act_bits = int(data.pop("act_bits")) or None
    images, labels = data.pop("images"), data.pop("labels")
    models = {}
    for line in sys.stdin:
        setup, chips, n, t, seed = line.split()
        if setup not in models:
            cfg = default_rpu_config()
            if setup == "perfect":
                cfg.forward.is_perfect = True
            models[setup] = build_lenet(data, cfg, act_bits)
        start = time.perf_counter()
        acc = evaluate(models[setup], images[:int(n)], labels[:int(n)], int(chips), float(t),
                       int(seed))
        print(json.dumps({"seconds": time.perf_counter() - start, "mean": float(acc.mean())}),
              flush=True)
    return 0


class Aihwkit:
    """The aihwkit worker process."""

    def __init__(self, python: str, npz: Path):
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONPATH="")
        self.proc = subprocess.Popen([python, __file__, "--worker", str(npz)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, setup: str, chips: int, images: int, t: float, seed: int = 0) -> dict:
        """One timed aihwkit sweep; its JSON answer."""
        self.proc.stdin.write(f"{setup} {chips} {images} {t} {seed}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the aihwkit worker stopped: run it alone to see its error")
        return json.loads(line)

    def close(self):
        """End the worker."""
        self.proc.stdin.close()
        self.proc.wait()


# ------------------------------------------------------------------------------ pimjax side


def pimjax_model(run: str | None, images):
    """(model, variables): a trained run's, or a calibrated untrained LeNet-5 W2A4."""
    import jax

    from pimjax.models import get_model

    if run:
        from pimjax.train import load_model

        model, variables, _ = load_model(run)
        return model, variables
    model = get_model("lenet5", quant="W2A4")
    v = jax.jit(model.init)(jax.random.PRNGKey(0), images[:2])
    _, upd = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        v, images[:256])
    return model, {**v, **upd}


def pimjax_device(setup: str):
    """pimjax's device of a setup name."""
    from pimjax import devices

    if setup == "pcm":
        return devices.pcm()
    if setup == "perfect":
        return devices.pcm(periphery=False)
    return devices.paper(0.3)


def main(argv=None) -> int:
    """Time both simulators side by side; print ratios."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", metavar="NPZ", help=argparse.SUPPRESS)
    p.add_argument("--aihwkit-python", default=os.environ.get("AIHWKIT_PYTHON"),
                   help="python of an environment with aihwkit 1.1 (or $AIHWKIT_PYTHON)")
    p.add_argument("--splits", default="100x1000,1000x100", help="chips x images, comma-separated")
    p.add_argument("--setups", default="pcm,perfect,paper", help=f"any of {SETUPS}")
    p.add_argument("--aihwkit-chips", type=int, default=None,
                   help="chips timed on the aihwkit side (default: all; its time is per chip)")
    p.add_argument("--t", type=float, default=86400.0, help="read time, seconds")
    p.add_argument("--repeat", type=int, default=3, help="alternating repeats (median)")
    p.add_argument("--run", default=None, help="a trained pimjax run directory (optional)")
    p.add_argument("--data-dir", default=None, help="MNIST folder (default: $PIMJAX_DATA_DIR)")
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    if not args.aihwkit_python:
        print("error: --aihwkit-python (or $AIHWKIT_PYTHON) is needed: an environment with "
              "aihwkit 1.1", file=sys.stderr)
        return 2
    setups = [s for s in args.setups.split(",") if s]
    if any(s not in SETUPS for s in setups):
        print(f"error: --setups must be among {SETUPS}", file=sys.stderr)
        return 2
    splits = [tuple(int(v) for v in s.lower().split("x")) for s in args.splits.split(",") if s]

    from pimjax import runtime

    runtime.configure()
    import jax
    import numpy as np
    from aihwkit_lenet_compare import export  # the LeNet-5 export aihwkit_lenet.py reads

    from pimjax import data, montecarlo

    most = max(n for _, n in splits)
    ds = data.load_dataset("mnist", "test", data_dir=args.data_dir, limit=most)
    images, labels = data.normalize(ds.images, "mnist"), np.asarray(ds.labels)
    model, variables = pimjax_model(args.run, images)
    tmp = Path(tempfile.mkdtemp(prefix="pimjax-aihwkit-"))
    kit = Aihwkit(args.aihwkit_python, export(model, variables, images, labels,
                                              tmp / "lenet.npz"))
    print(f"jax {jax.__version__}, {os.cpu_count()} cores; LeNet-5 {model.quant.name}, "
          f"read at t = {args.t:g} s; medians of {args.repeat} alternating repeats")
    rows = []
    try:
        for setup in setups:
            device = pimjax_device(setup)
            aih_setup = "pcm" if setup == "paper" else setup
            for chips, n in splits:
                x, y = images[:n], labels[:n]
                kw = dict(nominal=False, progress=False, t=args.t)
                plan = montecarlo.plan_chunks(model, chips, n, device=device)
                # compile on one chunk of the sweep's shapes
                montecarlo.evaluate_chips(model, variables, device, jax.random.PRNGKey(1),
                                          plan.chips, (x, y), chips_per_chunk=plan.chips, **kw)
                kchips = min(chips, args.aihwkit_chips or chips)
                kit.run(aih_setup, 1, n, args.t)  # warm-up
                pj, ak, accs = [], [], []
                for r in range(args.repeat):
                    for side in (("pimjax", "aihwkit") if r % 2 == 0 else ("aihwkit", "pimjax")):
                        if side == "pimjax":
                            start = time.perf_counter()
                            res = montecarlo.evaluate_chips(
                                model, variables, device, jax.random.PRNGKey(r), chips, (x, y),
                                chips_per_chunk=plan.chips, **kw)
                            pj.append(chips * n / (time.perf_counter() - start))
                            accs.append(float(res.accuracy.mean()))
                        else:
                            out = kit.run(aih_setup, kchips, n, args.t, seed=1000 * r)
                            ak.append(kchips * n / out["seconds"])
                a, b = statistics.median(pj), statistics.median(ak)
                rows.append((setup, chips, n, a, b))
                print(f"{setup:8s} {chips:>5d} chips x {n:>5d} images: pimjax {a:9.0f} "
                      f"chip-img/s, aihwkit {b:7.0f} chip-img/s ({kchips} chips timed): "
                      f"ratio {a / b:6.2f}  (pimjax runs {[round(v) for v in pj]}, aihwkit "
                      f"{[round(v) for v in ak]}; pimjax mean acc {statistics.mean(accs):.3f})",
                      flush=True)
    finally:
        kit.close()
    print("\nsummary: setup, chips x images, pimjax / aihwkit chip-images/s")
    for setup, chips, n, a, b in rows:
        print(f"  {setup:8s} {chips:>5d}x{n:<5d} {a / b:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
