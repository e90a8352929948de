"""Shared-weight forward (no chips), pimjax against PyTorch on the same network and batches.

pimjax runs ``model.apply`` jitted (the nominal model: quantized if ``--quant`` says so, no
chip) on batches of ``--batch`` images; PyTorch (``benchmarks/torch_models.py``, float, eval
mode, ``torch.no_grad``) runs the same architecture on the same batch shape in a worker
process (``--torch-python``: an environment with torch, e.g. ``pip install -e ".[bench]"``).
The two alternate within one run (order swapped every repeat) and the figure is the ratio of
the median images/s.

    PYTHONPATH=. python benchmarks/shared_forward.py --torch-python /path/to/venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def worker(name: str, batch: int, threads: int) -> int:
    """(torch env) Read ``iters`` lines; answer ``{"seconds"}`` of that many forwards."""
    import torch

    sys.path.insert(0, str(HERE))
    from torch_models import build_torch_model

    torch.set_num_threads(threads)
    model = build_torch_model(name).eval()
    shape = (batch, 1, 28, 28) if name == "lenet5" else (batch, 3, 32, 32)
    x = torch.randn(shape)
    with torch.no_grad():
        model(x)
        for line in sys.stdin:
            start = time.perf_counter()
            for _ in range(int(line)):
                model(x).argmax(1)
            print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)
    return 0


def main(argv=None) -> int:
    """pimjax and PyTorch forwards alternating; print images/s and ratios."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--torch-python", default=os.environ.get("TORCH_PYTHON", sys.executable),
                   help="python of an environment with torch (default: this one)")
    p.add_argument("--models", default="lenet5,resnet20")
    p.add_argument("--quants", default="fp,W2A4", help="pimjax quantizations to time")
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--iters", type=int, default=5, help="forwards per timing")
    p.add_argument("--repeat", type=int, default=5, help="alternating repeats (median)")
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker[0], int(args.worker[1]), int(args.worker[2]))

    from pimjax import runtime

    runtime.configure()
    import jax
    import jax.numpy as jnp

    from pimjax.models import get_model

    threads = os.cpu_count() or 1
    print(f"jax {jax.__version__}, {threads} cores; batches of {args.batch} images; medians of "
          f"{args.repeat} alternating repeats of {args.iters} forwards")
    rows = []
    for name in args.models.split(","):
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONPATH="")
        torch = subprocess.Popen([args.torch_python, __file__, "--worker", name,
                                  str(args.batch), str(threads)], env=env,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

        def torch_rate(torch=torch):
            """PyTorch images/s of one timing."""
            torch.stdin.write(f"{args.iters}\n")
            torch.stdin.flush()
            line = torch.stdout.readline()
            if not line:
                raise RuntimeError("the torch worker stopped: is torch installed there?")
            return args.iters * args.batch / json.loads(line)["seconds"]

        for quant in args.quants.split(","):
            model = get_model(name, quant=quant)
            x = jax.random.normal(jax.random.PRNGKey(0), (args.batch, *model.input_shape))
            v = jax.jit(model.init)(jax.random.PRNGKey(0), x[:2])
            _, upd = jax.jit(lambda v, x, model=model: model.apply(
                v, x, train=True, mutable=["batch_stats"]))(v, x[:256])
            v = {**v, **upd}
            f = jax.jit(lambda v, x, model=model: jnp.argmax(model.apply(v, x), -1))
            f(v, x).block_until_ready()
            torch_rate()

            def jax_rate(f=f, v=v, x=x):
                """pimjax images/s of one timing."""
                start = time.perf_counter()
                for _ in range(args.iters):
                    out = f(v, x)
                out.block_until_ready()
                return args.iters * args.batch / (time.perf_counter() - start)

            pj, pt = [], []
            for r in range(args.repeat):
                for side in ((jax_rate, pj), (torch_rate, pt))[:: 1 if r % 2 == 0 else -1]:
                    side[1].append(side[0]())
            a, b = statistics.median(pj), statistics.median(pt)
            rows.append((name, quant, a, b))
            print(f"{name:9s} pimjax {quant:5s} {a:9.0f} img/s   PyTorch fp {b:9.0f} img/s   "
                  f"ratio {a / b:5.2f}", flush=True)
        torch.stdin.close()
        torch.wait()
    print("\nsummary: model, pimjax quant, pimjax / PyTorch images/s")
    for name, quant, a, b in rows:
        print(f"  {name:9s} {quant:5s} {a / b:5.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
