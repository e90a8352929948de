"""Monte-Carlo throughput on one process against several: chip-images/s of evaluate_chips.

    python benchmarks/distributed_montecarlo.py [--chips 200] [--images 1000] [--repeat 3]

Runs the same sweep (LeNet-5 W2A4, the paper's device at sigma_within 0.2 / sigma_between
0.1, chips x MNIST test images) in fresh processes on this machine, one configuration after
the other:

* ``1 process x 1 device``: XLA's default (one CPU device, all cores in its thread pool);
* ``1 process x 2 devices``: ``--xla_force_host_platform_device_count=2``;
* ``2 processes x 1 device``: two processes joined by ``pimjax.distributed.initialize`` on
  localhost (gloo), the chips split over both.

Each configuration compiles on a warm-up sweep, then reports the best of ``--repeat`` timed
sweeps in chip-images/s (wall clock), the CPU time of its processes per sweep (all threads,
all processes: ``time.process_time``) as chip-images per CPU-second, and whether its
per-chip accuracies are the same bits as the first configuration's. The load average
before and after is printed: on a machine shared with other jobs, more processes also get
a larger share of the cores, which the wall-clock rate counts and the CPU-time rate does not.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = (("1 process x 1 device", 1, 1), ("1 process x 2 devices", 1, 2),
           ("2 processes x 1 device", 2, 1))


def worker(args) -> None:
    """One process of a configuration: warm up, time the sweeps, process 0 writes the result."""
    from pimjax import distributed, runtime

    runtime.configure(compile_cache=False)
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    import jax
    import numpy as np

    from pimjax import data, devices, montecarlo
    from pimjax.models import get_model

    model = get_model("lenet5", quant="W2A4")
    calib = data.normalize(data.load_dataset("mnist", "train", limit=256).images, "mnist")
    test = data.load_dataset("mnist", "test", limit=args.images)
    v = jax.jit(model.init)(jax.random.PRNGKey(0), calib[:2])
    _, upd = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        v, calib)
    variables = {**v, **upd}
    device = devices.paper(sigma_within=0.2, sigma_between=0.1)
    key = jax.random.PRNGKey(1)

    def sweep():
        return montecarlo.evaluate_chips(model, variables, device, key, args.chips, test,
                                         nominal=False, progress=False)

    first = sweep()  # compiles
    best, cpu = float("inf"), 0.0
    for _ in range(args.repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        sweep()
        best = min(best, time.perf_counter() - start)
        cpu += time.process_time() - start_cpu
    Path(f"{args.out}.{jax.process_index()}").write_text(json.dumps({
        "seconds": best, "cpu_seconds": cpu / args.repeat, "devices": jax.device_count(),
        "accuracy": np.asarray(first.accuracy).tolist()}))


def run_config(processes: int, local_devices: int, args, out: Path) -> dict:
    """Start one configuration's processes; process 0's result, CPU time summed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={local_devices}"
    cmd = [sys.executable, __file__, "--worker", "--chips", str(args.chips), "--images",
           str(args.images), "--repeat", str(args.repeat), "--out", str(out)]
    procs = []
    for i in range(processes):
        flags = [] if processes == 1 else [
            "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes),
            "--process-id", str(i)]
        procs.append(subprocess.Popen(cmd + flags, env=env))
    codes = [p.wait(timeout=args.timeout) for p in procs]
    if any(codes):
        raise SystemExit(f"a process failed: exit statuses {codes}")
    results = [json.loads(Path(f"{out}.{i}").read_text()) for i in range(processes)]
    total = args.chips * args.images
    return dict(results[0], rate=total / results[0]["seconds"],
                cpu_seconds=sum(r["cpu_seconds"] for r in results),
                cpu_rate=total / sum(r["cpu_seconds"] for r in results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chips", type=int, default=200)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--coordinator", help=argparse.SUPPRESS)
    parser.add_argument("--num-processes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--process-id", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    print(f"LeNet-5 W2A4, {args.chips} chips x {args.images} MNIST test images, best of "
          f"{args.repeat} after a warm-up; {os.cpu_count()} CPU cores; load average before: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'configuration':<24} {'seconds':>8} {'chip-images/s':>14} {'vs first':>9} "
          f"{'CPU s':>7} {'per CPU-s':>10} {'vs first':>9}  same bits")
    reference = None
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, processes, local) in enumerate(CONFIGS):
            r = run_config(processes, local, args, Path(tmp) / f"{i}.json")
            reference = reference or r
            print(f"{name:<24} {r['seconds']:>8.2f} {r['rate']:>14,.0f} "
                  f"{r['rate'] / reference['rate']:>9.2f} {r['cpu_seconds']:>7.2f} "
                  f"{r['cpu_rate']:>10,.0f} {r['cpu_rate'] / reference['cpu_rate']:>9.2f}  "
                  f"{r['accuracy'] == reference['accuracy']}", flush=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
