"""Time to the first Monte-Carlo result in a fresh process: cold and warm compile cache.

Each measurement is a new Python process that builds a model, runs
:func:`pimjax.montecarlo.evaluate_chips` once (tracing + compiling + running) and then again
(running only); compile time = first - second. *Cold*: an empty persistent compilation cache
(``runtime.configure(compile_cache=<new dir>)``); *warm*: the same directory again, as a
second run of a script finds it. Cold and warm alternate over ``--repeat`` fresh cache
directories; medians are printed.

    PYTHONPATH=. python benchmarks/compile_time.py
    PYTHONPATH=. python benchmarks/compile_time.py --models lenet5 --devices paper,pcm
    PYTHONPATH=. python benchmarks/compile_time.py --devices paper,pcm --chips 8 --images 64
    PYTHONPATH=. python benchmarks/compile_time.py --models resnet20 --devices pcm --programs
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

CHIPS = {"lenet5": 100, "resnet20": 16, "vgg11": 16, "resnet18": 4}  # per sweep, by model
IMAGES = {"lenet5": 1000, "resnet20": 256, "vgg11": 256, "resnet18": 64}


def log_programs(programs: dict) -> None:
    """Collect JAX's compile log (``jax_log_compiles``) into ``programs``: per jitted program,
    the seconds of tracing, lowering to MLIR and XLA compilation (or loading from the cache)."""
    import logging

    import jax

    kinds = {"tracing": "trace", "jaxpr to MLIR module conversion": "lower",
             "XLA compilation of": "compile"}
    pattern = re.compile(r"Finished (tracing|jaxpr to MLIR module conversion|XLA compilation "
                         r"of) (?:jit\()?([\w<>.]+)\)?.* in ([0-9.e-]+) sec")

    class Handler(logging.Handler):
        def emit(self, record):
            m = pattern.match(record.getMessage())
            if m:
                row = programs.setdefault(m.group(2), {})
                row[kinds[m.group(1)]] = row.get(kinds[m.group(1)], 0.0) + float(m.group(3))

    logging.getLogger("jax").addHandler(Handler())
    jax.config.update("jax_log_compiles", True)


def child(name: str, device_name: str, chips: int, images: int, cache: str,
          programs: bool = False) -> int:
    """(child process) One sweep twice; prints ``{"first", "second", "import"}`` seconds (and
    with ``programs``, the first call's seconds per jitted program)."""
    start = time.perf_counter()
    from pimjax import runtime

    runtime.configure(compile_cache=cache)
    import jax
    from random_net import random_workload

    from pimjax import montecarlo

    imported = time.perf_counter() - start
    # variables without compiling model.init: abstract shapes filled by NumPy, calibrated clips
    model, variables, (x, y), device = random_workload(name, device_name, images)
    per_program: dict = {}
    if programs:
        log_programs(per_program)
    times = []
    for i in range(2):
        if i == 1:
            jax.config.update("jax_log_compiles", False)
        t = time.perf_counter()
        montecarlo.evaluate_chips(model, variables, device, jax.random.PRNGKey(1), chips, (x, y),
                                  nominal=False, progress=False)
        times.append(time.perf_counter() - t)
    print(json.dumps({"first": times[0], "second": times[1], "import": imported,
                      "programs": per_program}))
    return 0


def run_child(args, name, device, cache) -> dict:
    """One fresh child process's timings."""
    cmd = [sys.executable, __file__, "--child", name, device, str(args.chips[name]),
           str(args.images[name]), cache] + (["--programs"] if args.programs else [])
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def program_table(rows, top: int = 3) -> str:
    """The ``top`` programs by total seconds (median over ``rows``): trace / lower / compile."""
    names = {n for r in rows for n in r["programs"]}
    med = {n: {k: statistics.median(r["programs"].get(n, {}).get(k, 0.0) for r in rows)
               for k in ("trace", "lower", "compile")} for n in names}
    ranked = sorted(med, key=lambda n: -sum(med[n].values()))[:top]
    return "; ".join(f"{n} {med[n]['trace']:.1f}/{med[n]['lower']:.1f}/{med[n]['compile']:.1f}s"
                     for n in ranked) + " (trace/lower/compile)"


def main(argv=None) -> int:
    """Cold and warm first-sweep times per model and device."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    p.add_argument("--models", default="lenet5,resnet20")
    p.add_argument("--devices", default="paper", help="paper and/or pcm")
    p.add_argument("--repeat", type=int, default=2, help="cold/warm pairs (median)")
    p.add_argument("--chips", type=int, default=None,
                   help="chips of every sweep (default: 100 for LeNet-5, 16 for ResNet-20); a "
                        "small sweep keeps its run time out of the compile figure")
    p.add_argument("--images", type=int, default=None, help="images of every sweep (default: "
                   "1000 for LeNet-5, 256 for ResNet-20)")
    p.add_argument("--programs", action="store_true",
                   help="also print the first call's largest jitted programs: seconds of "
                        "tracing, lowering and XLA compilation (or cache loading), cold / warm")
    args = p.parse_args(argv)
    if (args.chips is not None and args.chips < 1) or (args.images is not None
                                                       and args.images < 1):
        p.error("--chips and --images must be >= 1")
    if args.child:
        name, device, chips, images, cache = args.child
        return child(name, device, int(chips), int(images), cache, args.programs)
    args.chips = {m: n if args.chips is None else args.chips for m, n in CHIPS.items()}
    args.images = {m: n if args.images is None else args.images for m, n in IMAGES.items()}
    print(f"{os.cpu_count()} cores; each figure: median over {args.repeat} fresh processes")
    print("model     device  chips x images   cold: first  compile | warm: first  compile "
          "| steady sweep")
    for name in args.models.split(","):
        for device in args.devices.split(","):
            cold, warm = [], []
            for _ in range(args.repeat):
                cache = tempfile.mkdtemp(prefix="pimjax-compile-bench-")
                try:
                    cold.append(run_child(args, name, device, cache))
                    warm.append(run_child(args, name, device, cache))
                finally:
                    shutil.rmtree(cache, ignore_errors=True)
            med = lambda rows, k: statistics.median(r[k] for r in rows)  # noqa: E731
            comp = lambda rows: statistics.median(r["first"] - r["second"] for r in rows)  # noqa: E731
            print(f"{name:9s} {device:7s} {args.chips[name]:>5d} x {args.images[name]:<6d} "
                  f"{med(cold, 'first'):10.1f}s {comp(cold):7.1f}s | {med(warm, 'first'):9.1f}s "
                  f"{comp(warm):7.1f}s | {med(cold + warm, 'second'):6.1f}s", flush=True)
            if args.programs:
                for label, rows in (("cold", cold), ("warm", warm)):
                    print(f"    {label}: {program_table(rows)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
