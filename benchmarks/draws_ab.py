"""jax.random against pimjax.draws in one run: compile time and throughput of evaluate_chips.

Two source trees of pimjax are compared, each imported by fresh child processes through
``PYTHONPATH``: ``--baseline`` (a tree whose devices draw with ``jax.random``, e.g. an export
of ``main``) and ``--candidate`` (default: this repository). Each child builds LeNet-5 (W2A4,
NumPy-filled variables and random images, no compile cache) and runs
:func:`pimjax.montecarlo.evaluate_chips` once (trace + compile + run: *first*), reporting
that call's wall time, the XLA backend-compile seconds inside it
(``/jax/core/compile/backend_compile_duration`` events) and a digest of the per-chip
accuracies and losses. A baseline and a candidate child then stay up together and run steady
sweeps back to back (order alternating), so that load on a shared machine hits both; the
throughput ratio is the median over those pairs. Children start in alternating order over
``--repeat`` pairs; first-call figures are medians. The digests must agree (the draws are
the same bits).

    mkdir ../pimjax-main-9807320    # 9807320: the last commit that drew with jax.random
    git archive 9807320 pimjax | tar -x -C ../pimjax-main-9807320
    nice -n 10 python benchmarks/draws_ab.py --baseline ../pimjax-main-9807320
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(device_name: str, chips: int, images: int) -> int:
    """(child process) The first sweep (timings, digest), then steady sweeps on demand."""
    from pimjax import runtime

    runtime.configure(compile_cache=False)
    import jax
    import numpy as np
    from random_net import random_workload

    from pimjax import montecarlo

    compile_s = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **_: compile_s.append(secs)
        if event == "/jax/core/compile/backend_compile_duration" else None)
    model, variables, (x, y), device = random_workload("lenet5", device_name, images)

    def sweep():
        """Seconds and results of one evaluate_chips call."""
        start = time.perf_counter()
        res = montecarlo.evaluate_chips(model, variables, device, jax.random.PRNGKey(1), chips,
                                        (x, y), nominal=False, progress=False)
        return time.perf_counter() - start, res

    first, res = sweep()
    digest = hashlib.sha256(np.asarray(res.accuracy, np.float64).tobytes()
                            + np.asarray(res.loss, np.float64).tobytes()).hexdigest()[:16]
    print(json.dumps({"first": first, "compile": sum(compile_s),
                      "accuracy": float(np.mean(res.accuracy)), "digest": digest}), flush=True)
    for _ in sys.stdin:  # one steady sweep per line
        print(json.dumps({"seconds": sweep()[0]}), flush=True)
    return 0


class Child:
    """A child process importing pimjax from ``tree``, after its first sweep."""

    def __init__(self, tree: str, args, device: str):
        env = dict(os.environ, PYTHONPATH=tree)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", device,
               str(args.chips), str(args.images)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd="/")
        self.first = self._answer()

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"child failed (exit {self.proc.wait()})")
        return json.loads(line)

    def sweep(self) -> float:
        """Seconds of one steady sweep."""
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        return self._answer()["seconds"]

    def close(self):
        """End the child."""
        self.proc.stdin.close()
        self.proc.wait()


def main(argv=None) -> int:
    """Alternate baseline and candidate children per device; print medians and ratios."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--baseline", help="source tree of the jax.random pimjax (holds pimjax/)")
    p.add_argument("--candidate", default=str(HERE.parent), help="source tree of the draws one")
    p.add_argument("--devices", default="paper,pcm")
    p.add_argument("--chips", type=int, default=32)
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--sweeps", type=int, default=3, help="steady sweep pairs per repeat")
    p.add_argument("--repeat", type=int, default=2, help="children per tree and device")
    args = p.parse_args(argv)
    if args.child:
        device, chips, images = args.child
        return child(device, int(chips), int(images))
    if not args.baseline:
        p.error("--baseline is required")
    trees = {"jax.random": os.path.abspath(args.baseline),
             "draws": os.path.abspath(args.candidate)}
    print(f"{os.cpu_count()} cores; LeNet-5 W2A4, {args.chips} chips x {args.images} images; "
          f"first call: median over {args.repeat} fresh processes per tree; steady: "
          f"{args.sweeps} back-to-back sweep pairs per process pair")
    for name, tree in trees.items():
        print(f"  {name:10s} PYTHONPATH={tree}")
    print("device  impl         first call  backend compile  steady sweep  chip-images/s  "
          "mean acc  digest")
    for device in args.devices.split(","):
        first = {name: [] for name in trees}
        steady = {name: [] for name in trees}
        ratios = []  # candidate/baseline seconds of back-to-back sweeps
        for r in range(args.repeat):
            order = list(trees) if r % 2 == 0 else list(trees)[::-1]
            kids = {name: Child(trees[name], args, device) for name in order}
            try:
                for i in range(args.sweeps):
                    secs = {name: kids[name].sweep() for name in (order if i % 2 == 0
                                                                   else order[::-1])}
                    for name in trees:
                        steady[name].append(secs[name])
                    ratios.append(secs["draws"] / secs["jax.random"])
            finally:
                for kid in kids.values():
                    kid.close()
            for name in trees:
                first[name].append(kids[name].first)
        med = {name: {k: statistics.median(row[k] for row in first[name])
                      for k in ("first", "compile")} for name in trees}
        for name in trees:
            m, t = med[name], statistics.median(steady[name])
            d = {row["digest"] for row in first[name]}
            print(f"{device:7s} {name:10s} {m['first']:10.2f}s {m['compile']:15.2f}s "
                  f"{t:12.3f}s {args.chips * args.images / t:14.0f}  "
                  f"{first[name][0]['accuracy']:.4f}  {','.join(sorted(d))}")
        b, c = med["jax.random"], med["draws"]
        same = ({row["digest"] for row in first["jax.random"]}
                == {row["digest"] for row in first["draws"]})
        print(f"{device:7s} draws/jax.random: first call x{c['first'] / b['first']:.2f}, "
              f"backend compile x{c['compile'] / b['compile']:.2f}, chip-images/s "
              f"x{1 / statistics.median(ratios):.2f} (median of {len(ratios)} back-to-back "
              f"pairs; range x{1 / max(ratios):.2f}..x{1 / min(ratios):.2f}); "
              f"per-chip results identical: {same}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
