"""How long the other process of a 2-process CPU run takes to stop when one fails.

Usage: ``python benchmarks/distributed_failure.py [--heartbeat-timeout 10]
[--initialization-timeout 10] [--shutdown-timeout 60] [--cap 120] [--cases kill-worker,...]``

Each case starts ``tests/distributed_worker.py die`` in two processes on localhost (one CPU
device each). After one collective the victim sends itself SIGKILL (``kill-*``: it dies) or
SIGSTOP (``stop-*``: it hangs, as a host that stops answering), or raises an exception that
ends the script normally (``raise-*``) or through ``distributed.exit_now`` (``exit-*``);
``worker`` is process 1, ``coordinator`` process 0 (which runs JAX's coordination service).
``absent-worker`` starts only process 0. Reported: the survivor's exit status and seconds
from the failure (from the start for ``absent``) to its exit, or that it was still running
after ``--cap`` seconds; whether its output holds JAX's fatal-error message; and when
(seconds from the failure) a collective of the survivor failed with a gloo error, if one did.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import distributed_worker as worker  # noqa: E402

CASES = {  # name: (victim, how it fails) or (absent process, None)
    "kill-worker": (1, "KILL"), "kill-coordinator": (0, "KILL"),
    "stop-worker": (1, "STOP"), "stop-coordinator": (0, "STOP"),
    "raise-worker": (1, "RAISE"), "raise-coordinator": (0, "RAISE"),
    "exit-worker": (1, "RAISE+EXIT"), "exit-coordinator": (0, "RAISE+EXIT"),
    "absent-worker": (1, None),
}
FATAL = "JAX distributed service detected fatal errors"
GLOO = re.compile(r"Gloo \S+ failed")


def failed_at(log: Path) -> float | None:
    """The time the victim printed before failing, if it did."""
    found = re.search(r"failing at ([0-9.]+)", log.read_text()) if log.exists() else None
    return float(found.group(1)) if found else None


def run_case(name: str, args, out: Path) -> str:
    victim, how = CASES[name]
    survivor = 1 - victim
    extra = ["--heartbeat-timeout", str(args.heartbeat_timeout), "--initialization-timeout",
             str(args.initialization_timeout), "--shutdown-timeout", str(args.shutdown_timeout),
             "--victim", str(victim), "--fail", (how or "KILL").split("+")[0]]
    if how == "RAISE+EXIT":
        extra.append("--exit-on-error")
    ids = [survivor] if how is None else None
    t_start = time.time()
    procs = worker.start("die", out, *extra, local_devices=1, ids=ids)
    proc = procs[0] if how is None else procs[survivor]
    log = out / f"log{survivor}.txt"
    t_fail = t_start if how is None else None
    t_end = t_start + args.cap
    t_gloo = None
    while proc.poll() is None and time.time() < t_end:
        if t_gloo is None and GLOO.search(log.read_text()):
            t_gloo = time.time()
        if t_fail is None:
            t_fail = failed_at(out / f"log{victim}.txt")
            t_end = t_end if t_fail is None else t_fail + args.cap
        time.sleep(0.05)
    t_exit = time.time()
    t_fail = t_fail or failed_at(out / f"log{victim}.txt")
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    text = log.read_text()
    if t_fail is None:
        return f"{name:18s} victim never failed: see {out}"
    if t_gloo is None and GLOO.search(text):  # the survivor ended before the next poll
        t_gloo = t_exit
    gloo = "-" if t_gloo is None else f"{t_gloo - t_fail:.1f} s"
    fatal = "yes" if FATAL in text else "no"
    if proc.returncode == -9:  # killed by us at the cap
        return f"{name:18s} still running after {args.cap:.0f} s   gloo error: {gloo}"
    return (f"{name:18s} exit {proc.returncode:4d} after {t_exit - t_fail:5.1f} s   "
            f"fatal-error message: {fatal}   gloo error: {gloo}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heartbeat-timeout", type=int, default=10)
    parser.add_argument("--initialization-timeout", type=int, default=10)
    parser.add_argument("--shutdown-timeout", type=int, default=60)
    parser.add_argument("--cap", type=float, default=120.0)
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    cases = args.cases.split(",")
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}: use some of {list(CASES)}")
    print(f"heartbeat_timeout={args.heartbeat_timeout} s, initialization_timeout="
          f"{args.initialization_timeout} s, shutdown_timeout={args.shutdown_timeout} s")
    with tempfile.TemporaryDirectory() as tmp:
        for name in cases:
            print(run_case(name, args, Path(tmp) / name), flush=True)


if __name__ == "__main__":
    main()
