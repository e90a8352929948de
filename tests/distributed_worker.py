"""One process of the multi-process tests (tests/test_distributed.py starts several).

``PYTHONPATH=. python tests/distributed_worker.py SCENARIO --coordinator HOST:PORT --num-processes N
--process-id I --out DIR``:

* ``compute``: a global sum and gathers, per-index ``fold_in`` draws sharded over the mesh,
  one data-parallel SGD step of a linear model (each process feeds its own rows), and an
  orbax checkpoint of a sharded pytree saved and restored by all processes; every process
  writes what it gathered to ``DIR/p<I>.npz``.
* ``sum``: the global sum of (a) only, to check how the processes found each other.
* ``die``: after one collective, process ``--victim`` prints ``failing at <unix time>`` and
  fails as ``--fail`` says (KILL: SIGKILL, dies; STOP: SIGSTOP, hangs; RAISE: raises an
  exception, ended by ``distributed.exit_now`` when ``--exit-on-error``); the others keep
  running collectives until JAX stops them.

The data are fixed functions of the mesh size (:func:`data`), so the test recomputes them.
:func:`start` launches the processes (tests and ``benchmarks/distributed_failure.py``).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

from pimjax import distributed  # no JAX computation happens before initialize

REPO = Path(__file__).resolve().parents[1]
AXIS = "x"
DRAW_KEY = 7  # seed of the per-index draws
LR = 0.1  # learning rate of the data-parallel step


def data(mesh_size: int) -> dict:
    """The global arrays of the ``compute`` scenario (NumPy, the same in every process)."""
    import numpy as np

    rng = np.random.default_rng(0)
    n = 4 * mesh_size
    return {"rows": np.arange(n * 3, dtype=np.float32).reshape(n, 3),
            "x": rng.normal(size=(n, 3)).astype(np.float32),
            "y": rng.normal(size=(n, 2)).astype(np.float32),
            "w": rng.normal(size=(3, 2)).astype(np.float32),
            "b": np.array([0.5, -0.25], np.float32)}


def draws(key, index):
    """Element ``index``'s draws, from ``fold_in(key, index)`` only (as chip i's factors)."""
    import jax

    k = jax.random.fold_in(key, index)
    return jax.random.normal(k, (5,)), jax.random.uniform(jax.random.fold_in(k, 1), ())


def loss_fn(params, x, y):
    """Mean squared error of the linear model ``x @ w + b``."""
    import jax.numpy as jnp

    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def global_sum(out: Path) -> None:
    import jax
    import numpy as np

    mesh = distributed.make_mesh(AXIS)
    d = data(mesh.size)
    total = jax.jit(lambda a: a.sum())(distributed.shard_rows(d["rows"], mesh))
    np.savez(out / f"p{jax.process_index()}.npz", process_count=np.int32(jax.process_count()),
             mesh_size=np.int32(mesh.size), sum=distributed.to_host(total))


def compute(out: Path) -> None:
    import jax
    import numpy as np
    import orbax.checkpoint as ocp
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    logging.getLogger("absl").setLevel(logging.ERROR)
    mesh = distributed.make_mesh(AXIS)
    d = data(mesh.size)
    n = d["rows"].shape[0]
    mine = distributed.process_rows(n, mesh)
    res = {"process_count": np.int32(jax.process_count()), "mesh_size": np.int32(mesh.size),
           "rows_start": np.int32(mine.start), "rows_stop": np.int32(mine.stop)}

    # (a) global sum and gathers; each process feeds only its own rows
    rows = distributed.from_process_rows(d["rows"][mine], mesh, n)
    res["sum"] = distributed.to_host(jax.jit(lambda a: a.sum())(rows))
    res["gathered"] = distributed.to_host(rows)
    res["replicated"] = distributed.to_host(distributed.replicate(rows, mesh))
    res["process_ids"] = multihost_utils.process_allgather(np.int32(jax.process_index()))

    # (b) per-index draws sharded over the mesh (as chips over "chips")
    key = jax.random.PRNGKey(DRAW_KEY)
    sample = jax.jit(jax.shard_map(lambda i: jax.vmap(lambda j: draws(key, j))(i), mesh=mesh,
                                   in_specs=P(AXIS), out_specs=P(AXIS)))
    normal, uniform = distributed.to_host(sample(
        distributed.shard_rows(np.arange(n, dtype=np.uint32), mesh)))
    res["normal"], res["uniform"] = normal, uniform

    # (c) one data-parallel SGD step: the batch split over processes, parameters replicated
    # committed to a local device, as variables restored from a checkpoint are
    local = jax.device_put({"w": d["w"], "b": d["b"]}, jax.local_devices()[0])
    params = distributed.replicate(local, mesh)
    x, y = distributed.from_process_rows((d["x"][mine], d["y"][mine]), mesh, n)

    @jax.jit
    def step(params, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        return jax.tree.map(lambda p, g: p - LR * g, params, grads), loss

    new, loss = distributed.to_host(step(params, x, y))
    res["step_w"], res["step_b"], res["step_loss"] = new["w"], new["b"], loss

    # (d) orbax: every process saves its shards into the same directory, then restores
    tree = {"rows": rows, "b": params["b"], "step": distributed.replicate(np.int32(3), mesh)}
    manager = ocp.CheckpointManager(out / "ckpt", options=ocp.CheckpointManagerOptions(
        create=True, enable_async_checkpointing=False))
    manager.save(3, args=ocp.args.StandardSave(tree))
    manager.wait_until_finished()
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                          tree)
    restored = manager.restore(3, args=ocp.args.StandardRestore(target))
    res["ckpt_rows_sharded"] = np.bool_(not restored["rows"].is_fully_addressable)
    replicated = NamedSharding(mesh, P())
    as_replicated = manager.restore(3, args=ocp.args.StandardRestore(jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), tree)))
    manager.close()
    for name, t in (("ckpt", restored), ("ckpt_rep", as_replicated)):
        for k, v in distributed.to_host(t).items():
            res[f"{name}_{k}"] = v
    np.savez(out / f"p{jax.process_index()}.npz", **res)


def start(scenario: str, out: Path, *extra: str, num_processes: int = 2, local_devices: int = 2,
          ids=None, slurm: bool = False) -> list:
    """Start processes ``ids`` (default: all) of a ``num_processes`` run on a free localhost
    port, each with ``local_devices`` CPU devices (even where a GPU is) and its output in
    ``out/log<i>.txt``.

    ``slurm``: give the processes no flags but the variables ``srun`` sets, so that
    jax.distributed's SLURM auto-detection finds the run.
    """
    out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu")  # gloo on CPU devices, even on a GPU host
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={local_devices}".strip()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    procs = []
    for i in range(num_processes) if ids is None else ids:
        flags = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(num_processes),
                 "--process-id", str(i)]
        if slurm:
            flags = []
            env.update(SLURM_JOB_ID="1", SLURM_STEP_NODELIST="localhost",
                       SLURM_NTASKS=str(num_processes), SLURM_PROCID=str(i),
                       SLURM_LOCALID=str(i), JAX_COORDINATOR_PORT=str(port))
        cmd = [sys.executable, str(Path(__file__)), scenario, *flags, "--out", str(out), *extra]
        with open(out / f"log{i}.txt", "w") as log:
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                          env=dict(env), cwd=REPO))
    return procs


def die(victim: int, fail: str) -> None:
    import jax
    import numpy as np

    mesh = distributed.make_mesh(AXIS)
    total = jax.jit(lambda a: a.sum())
    ones = distributed.shard_rows(np.ones(mesh.size, np.float32), mesh)
    print(f"process {jax.process_index()}: sum {float(total(ones))}", flush=True)
    if jax.process_index() == victim:
        print(f"failing at {time.time():.3f}", flush=True)
        if fail == "RAISE":
            raise RuntimeError(f"process {victim} failed on purpose")
        os.kill(os.getpid(), getattr(signal, f"SIG{fail}"))
    while True:  # ended by the failure of a collective or by JAX's coordination service
        float(total(ones))
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", choices=("compute", "sum", "die"))
    parser.add_argument("--coordinator")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    parser.add_argument("--heartbeat-timeout", type=int, default=distributed.HEARTBEAT_TIMEOUT)
    parser.add_argument("--initialization-timeout", type=int,
                        default=distributed.INITIALIZATION_TIMEOUT)
    parser.add_argument("--shutdown-timeout", type=int, default=distributed.SHUTDOWN_TIMEOUT)
    parser.add_argument("--victim", type=int, default=1)
    parser.add_argument("--fail", choices=("KILL", "STOP", "RAISE"), default="KILL")
    parser.add_argument("--exit-on-error", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                           heartbeat_timeout=args.heartbeat_timeout,
                           initialization_timeout=args.initialization_timeout,
                           shutdown_timeout=args.shutdown_timeout)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    try:
        if args.scenario == "compute":
            compute(args.out)
        elif args.scenario == "sum":
            global_sum(args.out)
        else:
            die(args.victim, args.fail)
    except Exception:
        if not args.exit_on_error:
            raise
        traceback.print_exc()
        distributed.exit_now(1)


if __name__ == "__main__":
    main()
