"""One process of the multi-process tests (tests/test_distributed.py starts several).

``PYTHONPATH=. python tests/distributed_worker.py SCENARIO --coordinator HOST:PORT --num-processes N
--process-id I --out DIR``:

* ``compute``: a global sum and gathers, per-index ``fold_in`` draws sharded over the mesh,
  one data-parallel SGD step of a linear model (each process feeds its own rows), and an
  orbax checkpoint of a sharded pytree saved and restored by all processes; every process
  writes what it gathered to ``DIR/p<I>.npz``.
* ``sum``: the global sum of (a) only, to check how the processes found each other;
  ``--late S``: process 1 starts it S seconds after process 0 (after ``connect``).
* ``montecarlo``: ``montecarlo.evaluate_chips`` (self-tuned) and ``tune_chips`` of
  :func:`mc_inputs`'s model, chips split over every device of every process; every process
  writes the per-chip results it gathered.
* ``train_step``: one ``train_step`` of :func:`train_config`'s run on a global batch (each
  process feeds its own rows); every process writes the metrics and new parameters.
* ``train``: ``train.train`` of :func:`train_config` for one epoch into ``DIR/run``, and a
  resumed call for the second; every process writes the final parameters and history.
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

from pimjax import distributed, runtime  # no JAX computation before initialize

REPO = Path(__file__).resolve().parents[1]
AXIS = "x"
DRAW_KEY = 7  # seed of the per-index draws
LR = 0.1  # learning rate of the data-parallel step
MC_KEY, MC_CHIPS, MC_CHUNK = 3, 12, 8  # Monte-Carlo: chip key, chips (2 chunks, padded)


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


def mc_inputs():
    """LeNet-5 W2A4 (activation clips and BN statistics set by one train-mode pass), 96 MNIST
    test images and 64 calibration images, the paper's device, and the self-tuning recipe."""
    import jax
    import numpy as np

    from pimjax import data, devices, selftune
    from pimjax.models import get_model

    model = get_model("lenet5", quant="W2A4")
    calib = data.normalize(data.load_dataset("mnist", "train", limit=64).images, "mnist")
    test = data.load_dataset("mnist", "test", limit=96)
    key = jax.random.PRNGKey(0)
    local = jax.local_devices()[0]  # each process computes the same variables by itself
    with jax.default_device(local):
        v = jax.jit(model.init)(key, calib[:2])
        _, upd = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
            v, calib)
        variables = {**v, **upd}
        stats = selftune.nominal_stats(model, variables, calib)
    device = devices.paper(sigma_within=0.3, sigma_between=0.2, between_granularity="layer")
    tuning = selftune.SelfTune("channel", np.asarray(calib), stats)
    return model, variables, test, device, tuning


def mc_results(model, variables, test, device, tuning) -> dict:
    """What the ``montecarlo`` scenario gathers (also the one-process oracle of the test)."""
    import jax
    import numpy as np

    from pimjax import montecarlo

    key = jax.random.PRNGKey(MC_KEY)
    res = montecarlo.evaluate_chips(model, variables, device, key, MC_CHIPS, test,
                                    tuning=tuning, chips_per_chunk=MC_CHUNK, progress=False)
    tuned = montecarlo.tune_chips(model, variables, device, key, MC_CHIPS, tuning,
                                  chips_per_chunk=MC_CHUNK)
    out = {"accuracy": res.accuracy, "loss": res.loss, "image_accuracy": res.image_accuracy,
           "nominal": np.array([res.nominal_accuracy, res.nominal_loss,
                                res.nominal_tuned_accuracy])}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tuned.tune)[0]:
        out["tune" + jax.tree_util.keystr(path)] = np.asarray(leaf)
    return out


def train_config(epochs: int = 2):
    """A seconds-long qavat run of LeNet-5 W2A4 on 256 MNIST images, batch 32, with 4 chips
    evaluated after each epoch."""
    import dataclasses

    from pimjax.configs import setups
    from pimjax.devices import DeviceConfig

    config = setups.lenet5().train_config("qavat", "W2A4", 0.2, epochs=epochs, train_images=256,
                                          test_images=64, batch_size=32)
    return dataclasses.replace(config, eval=dataclasses.replace(
        config.eval, chips=4, device=DeviceConfig(sigma_within=0.2)))


def train_step_results(config) -> dict:
    """One data-parallel train_step from the initial state on the first batch: metrics and
    parameters (also the one-process oracle of the test)."""
    import jax

    from pimjax import data, train
    from pimjax.train.loop import BATCH_AXIS

    mesh = distributed.make_mesh(BATCH_AXIS)
    ds = data.load_dataset("mnist", "train", limit=256)
    with jax.default_device(jax.local_devices()[0]):
        state = train.create_train_state(config, jax.random.PRNGKey(0),
                                         data.normalize(ds.images[:1], "mnist"), len(ds))
    state = distributed.replicate(state, mesh)
    bs = config.optim.batch_size
    rows = distributed.process_rows(bs, mesh)
    images, labels = next(train.train_batches(ds, bs, config.seed, 1, rows))
    batch = distributed.from_process_rows((images, labels), mesh, bs)
    keys = [jax.random.PRNGKey(k) for k in (1, 2, 3)]
    state, metrics = train.train_step(state, batch, *keys)
    out = {f"metric_{k}": v for k, v in distributed.to_host(metrics).items()}
    for path, leaf in jax.tree_util.tree_flatten_with_path(distributed.to_host(state.params))[0]:
        out["params" + jax.tree_util.keystr(path)] = leaf
    return out


def train_run_results(config, workdir: Path) -> dict:
    """train() for one epoch into ``workdir``, then resumed to the end: final parameters and
    per-epoch history (also the one-process oracle of the test)."""
    import jax
    import numpy as np

    from pimjax import train

    first = train.train(config, workdir=workdir, stop_after=1, progress=False)
    result = train.train(config, workdir=workdir, resume=True, progress=False)
    out = {"epochs_first": np.int32(len(first.history))}
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "test_acc_chips_mean"):
        out[f"history_{key}"] = np.array([row[key] for row in result.history])
    for path, leaf in jax.tree_util.tree_flatten_with_path(
            distributed.to_host(result.state.params))[0]:
        out["params" + jax.tree_util.keystr(path)] = leaf
    return out


def global_sum(out: Path, late: float = 0.0) -> None:
    import jax
    import numpy as np

    mesh = distributed.make_mesh(AXIS)
    d = data(mesh.size)
    if jax.process_index() == 1:
        time.sleep(late)
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
          ids=None, slurm: bool = False, script: str | None = None) -> list:
    """Start processes ``ids`` (default: all) of a ``num_processes`` run on a free localhost
    port, each with ``local_devices`` CPU devices (even where a GPU is) and its output in
    ``out/log<i>.txt``.

    ``slurm``: give the processes no flags but the variables ``srun`` sets, so that
    jax.distributed's SLURM auto-detection finds the run. ``script``: run this script of the
    repository (e.g. ``experiments/train.py``) with the process flags and ``extra`` instead
    of a scenario of this worker.
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
        if script is not None:
            cmd = [sys.executable, str(REPO / script), *flags, *extra]
        with open(out / f"log{i}.txt", "w") as log:
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                          env=dict(env), cwd=REPO))
    return procs


def test_cache() -> str:
    """The test session's compilation cache folder (as tests/conftest.py chooses it)."""
    return os.environ.get("PIMJAX_TEST_COMPILE_CACHE",
                          os.path.join("/tmp", "pimjax-test-jax-cache"))


def save(out: Path, results: dict) -> None:
    """This process's results in ``out/p<i>.npz``."""
    import jax
    import numpy as np

    np.savez(out / f"p{jax.process_index()}.npz", **results)


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
    parser.add_argument("scenario", choices=("compute", "sum", "die", "montecarlo",
                                             "train_step", "train"))
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
    parser.add_argument("--late", type=float, default=0.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.scenario in ("montecarlo", "train_step", "train"):
        runtime.configure(compile_cache=test_cache())
    distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                           heartbeat_timeout=args.heartbeat_timeout,
                           initialization_timeout=args.initialization_timeout,
                           shutdown_timeout=args.shutdown_timeout)
    if args.scenario != "die":  # (die: its first collective is the one it watches)
        distributed.connect()
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    try:
        if args.scenario == "compute":
            compute(args.out)
        elif args.scenario == "sum":
            global_sum(args.out, args.late)
        elif args.scenario == "montecarlo":
            save(args.out, mc_results(*mc_inputs()))
        elif args.scenario == "train_step":
            save(args.out, train_step_results(train_config()))
        elif args.scenario == "train":
            save(args.out, train_run_results(train_config(), args.out / "run"))
        else:
            die(args.victim, args.fail)
    except Exception:
        if not args.exit_on_error:
            raise
        traceback.print_exc()
        distributed.exit_now(1)


if __name__ == "__main__":
    main()
