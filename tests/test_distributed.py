"""Multi-process runs: two CPU processes on localhost against one-process results; settings.

The two-process tests start ``tests/distributed_worker.py`` (or an experiment script) twice
on a free localhost port and kill both if they have not ended within ``HANG_S`` seconds, so
a hang fails the test instead of blocking the suite. The one-process oracles run in this
process, on as many devices (4) as the two workers have together.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import distributed_worker as worker  # tests/ is on sys.path under pytest
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import refusal_in_another_thread
from jax.sharding import SingleDeviceSharding

from pimjax import distributed, files

LOCAL_DEVICES = 2  # per worker process: a global mesh of 4 devices over 2 processes
HANG_S = 180  # hard limit of one launch (a normal one takes 5 to 20 s)
# ... of a launch that compiles a model (Monte-Carlo, training): 20 to 60 s of CPU time per
# process, which took up to 180 s of wall-clock time on the 2 shared cores of a loaded machine
COMPILE_HANG_S = 600
# What the other process prints when a peer died: JAX's coordination service aborting it,
# or a collective failing at once (which ends the worker when it runs with --exit-on-error)
PEER_DIED = re.compile(r"JAX distributed service detected fatal errors|Gloo \S+ failed")


def launch(scenario: str, out: Path, *extra: str, slurm: bool = False,
           script: str | None = None, hang_s: float = HANG_S) -> list:
    """Run the worker (or ``script``) in two processes: ``[(returncode, output), ...]``; a
    hang fails."""
    procs = worker.start(scenario, out, *extra, local_devices=LOCAL_DEVICES, slurm=slurm,
                         script=script)
    return finish(procs, out, script or scenario, hang_s)


def finish(procs, out: Path, what: str, hang_s: float = HANG_S) -> list:
    """Wait for the processes; kill them and fail the test if they run past ``hang_s``."""
    deadline = time.monotonic() + hang_s
    try:
        for p in procs:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.wait()
        tails = "\n".join(f"--- process {i}\n{(out / f'log{i}.txt').read_text()[-2000:]}"
                          for i in range(len(procs)))
        pytest.fail(f"{what}: processes still running after {hang_s} s (hang)\n{tails}")
    return [(p.returncode, (out / f"log{i}.txt").read_text()) for i, p in enumerate(procs)]


def results(out: Path, runs: list) -> list[dict]:
    """Each process's saved results, after checking that every process succeeded."""
    for i, (rc, text) in enumerate(runs):
        assert rc == 0, f"process {i} failed (exit {rc}):\n{text[-3000:]}"
    return [dict(np.load(out / f"p{i}.npz")) for i in range(len(runs))]


@pytest.fixture(scope="module")
def computed(tmp_path_factory):
    """The ``compute`` scenario run by two processes: (results of each process, output dir)."""
    out = tmp_path_factory.mktemp("distributed")
    runs = launch("compute", out)
    for i, (rc, text) in enumerate(runs):
        assert rc == 0, f"process {i} failed (exit {rc}):\n{text[-3000:]}"
    return [dict(np.load(out / f"p{i}.npz")) for i in range(len(runs))], out


# --------------------------------------------------------------------- two processes


def test_global_sum_and_gather_match_one_process(computed):
    results, _ = computed
    d = worker.data(int(results[0]["mesh_size"]))
    n = d["rows"].shape[0]
    assert [int(r["process_count"]) for r in results] == [2, 2]
    assert int(results[0]["mesh_size"]) == 2 * LOCAL_DEVICES
    # each process fed only its own contiguous block of rows
    assert [(int(r["rows_start"]), int(r["rows_stop"])) for r in results] == [(0, n // 2),
                                                                             (n // 2, n)]
    for r in results:
        assert float(r["sum"]) == d["rows"].astype(np.float64).sum()  # small integers: exact
        np.testing.assert_array_equal(r["gathered"], d["rows"])
        np.testing.assert_array_equal(r["replicated"], d["rows"])
        np.testing.assert_array_equal(r["process_ids"], [0, 1])


def test_per_index_draws_bit_identical_to_one_process(computed):
    results, _ = computed
    n = results[0]["normal"].shape[0]
    with jax.default_device(jax.devices("cpu")[0]):  # the workers' platform
        key = jax.random.PRNGKey(worker.DRAW_KEY)
        normal, uniform = jax.jit(jax.vmap(lambda j: worker.draws(key, j)))(
            jnp.arange(n, dtype=jnp.uint32))
    for r in results:
        np.testing.assert_array_equal(r["normal"], np.asarray(normal))
        np.testing.assert_array_equal(r["uniform"], np.asarray(uniform))


def test_data_parallel_step_matches_one_process(computed):
    results, _ = computed
    d = worker.data(int(results[0]["mesh_size"]))
    x, y, w, b = (d[k].astype(np.float64) for k in ("x", "y", "w", "b"))
    residual = x @ w + b - y  # NumPy oracle of the full-batch step, in float64
    scale = 2.0 / residual.size
    want_w = w - worker.LR * scale * x.T @ residual
    want_b = b - worker.LR * scale * residual.sum(axis=0)
    for r in results:
        np.testing.assert_allclose(r["step_loss"], np.mean(residual ** 2), rtol=1e-6)
        np.testing.assert_allclose(r["step_w"], want_w, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(r["step_b"], want_b, rtol=1e-5, atol=1e-6)
    # the replicated parameters are the same bits in every process
    np.testing.assert_array_equal(results[0]["step_w"], results[1]["step_w"])


def test_orbax_checkpoint_saved_by_two_processes(computed):
    results, out = computed
    d = worker.data(int(results[0]["mesh_size"]))
    for r in results:
        assert bool(r["ckpt_rows_sharded"])
        for prefix in ("ckpt", "ckpt_rep"):  # restored onto the saved and a replicated sharding
            np.testing.assert_array_equal(r[f"{prefix}_rows"], d["rows"])
            np.testing.assert_array_equal(r[f"{prefix}_b"], d["b"])
            assert int(r[f"{prefix}_step"]) == 3
    # one process (this one) restores what two processes saved
    device = SingleDeviceSharding(jax.local_devices()[0])
    target = {"rows": jax.ShapeDtypeStruct(d["rows"].shape, np.float32, sharding=device),
              "b": jax.ShapeDtypeStruct((2,), np.float32, sharding=device),
              "step": jax.ShapeDtypeStruct((), np.int32, sharding=device)}
    with ocp.CheckpointManager(out / "ckpt") as manager:
        assert manager.latest_step() == 3
        restored = manager.restore(3, args=ocp.args.StandardRestore(target))
    np.testing.assert_array_equal(restored["rows"], d["rows"])
    np.testing.assert_array_equal(restored["b"], d["b"])


def test_slurm_variables_start_the_run_without_flags(tmp_path):
    runs = launch("sum", tmp_path, slurm=True)  # initialize() with no settings: auto-detection
    for i, (rc, text) in enumerate(runs):
        assert rc == 0, f"process {i} failed (exit {rc}):\n{text[-3000:]}"
        r = np.load(tmp_path / f"p{i}.npz")
        assert int(r["process_count"]) == 2 and int(r["mesh_size"]) == 2 * LOCAL_DEVICES
        assert float(r["sum"]) == worker.data(int(r["mesh_size"]))["rows"].astype(float).sum()


@pytest.mark.slow
def test_first_collective_reached_40_s_apart_after_connect(tmp_path):
    """Without distributed.connect(), gloo's first collective fails when the processes reach
    it more than 30 s apart (jax 0.10.2); connect() opens the connections at the start."""
    runs = launch("sum", tmp_path, "--late", "40")
    for i, (rc, text) in enumerate(runs):
        assert rc == 0, f"process {i} failed (exit {rc}):\n{text[-3000:]}"


@pytest.mark.parametrize("victim", [1, 0], ids=["worker-killed", "coordinator-killed"])
def test_killed_process_stops_the_other(tmp_path, victim):
    runs = launch("die", tmp_path, "--victim", str(victim), "--heartbeat-timeout", "5")
    rc, text = runs[1 - victim]
    assert runs[victim][0] == -signal.SIGKILL, runs[victim][1][-2000:]
    assert rc != 0 and PEER_DIED.search(text), text[-3000:]


def test_exception_ended_by_exit_now_stops_the_other(tmp_path):
    runs = launch("die", tmp_path, "--victim", "1", "--fail", "RAISE", "--exit-on-error",
                  "--heartbeat-timeout", "5")
    assert runs[1][0] == 1 and "failed on purpose" in runs[1][1], runs[1][1][-2000:]
    assert runs[0][0] != 0 and PEER_DIED.search(runs[0][1]), runs[0][1][-3000:]


# ------------------------------------------------------- Monte-Carlo and training


def test_montecarlo_chips_split_over_two_processes_are_bit_identical(tmp_path):
    runs = launch("montecarlo", tmp_path, hang_s=COMPILE_HANG_S)
    want = worker.mc_results(*worker.mc_inputs())  # one process, the same 4 devices
    assert int(jax.device_count()) == 2 * LOCAL_DEVICES
    for r in results(tmp_path, runs):
        assert set(r) == set(want)
        for name, value in want.items():  # per-chip accuracy, loss, tune: the same bits
            np.testing.assert_array_equal(r[name], value, err_msg=name)
    assert len(np.unique(want["loss"])) == worker.MC_CHIPS  # the chips differ


def _close(got: list[dict], want: dict) -> None:
    for r in got:
        assert set(r) == set(want)
        for name, value in want.items():  # gradients are summed in another order: float noise
            np.testing.assert_allclose(r[name], value, rtol=2e-4, atol=2e-5, err_msg=name)
    for name in want:  # every process holds the same replicated values
        np.testing.assert_array_equal(got[0][name], got[1][name], err_msg=name)


def test_train_step_over_two_processes_matches_one_process(tmp_path):
    runs = launch("train_step", tmp_path, hang_s=COMPILE_HANG_S)
    _close(results(tmp_path, runs), worker.train_step_results(worker.train_config()))


@pytest.mark.slow
def test_training_run_over_two_processes_resumed_matches_one_process(tmp_path):
    runs = launch("train", tmp_path, hang_s=COMPILE_HANG_S)
    want = worker.train_run_results(worker.train_config(), tmp_path / "one-process")
    got = results(tmp_path, runs)
    _close(got, want)
    assert [int(r["epochs_first"]) for r in got] == [1, 1]  # stopped, then resumed
    run = tmp_path / "run"
    history = json.loads((run / "metrics.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]  # written by process 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["1", "2"]
    assert (run / files.LOCK_FILE).read_text() == ""  # process 0's lock, released


def test_killed_process_stops_a_training_script(tmp_path):
    """Kill process 1 of experiments/train.py once epoch 1 is written: process 0 must end
    with an error (a failed collective or JAX's heartbeat) before the hang limit."""
    run = tmp_path / "run"
    procs = worker.start("", tmp_path, "--smoke", "--out", str(run), "--optim.epochs", "100",
                         "--no-progress", "--heartbeat-timeout", "5",
                         local_devices=LOCAL_DEVICES, script="experiments/train.py")
    deadline = time.monotonic() + COMPILE_HANG_S
    while not (run / "metrics.json").exists():
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            break
        time.sleep(0.2)
    procs[1].kill()
    (rc0, text0), (rc1, _) = finish(procs, tmp_path, "train.py after a kill", hang_s=120)
    assert (run / "metrics.json").exists(), text0[-3000:]
    assert rc1 == -signal.SIGKILL
    assert rc0 != 0 and (PEER_DIED.search(text0) or "error: process 0 of 2" in text0), \
        text0[-3000:]


# ------------------------------------------------------------------------ one process


@pytest.mark.parametrize("kwargs, flag", [
    (dict(coordinator="127.0.0.1:1234", num_processes=2, process_id=2), "--process-id=2"),
    (dict(coordinator="127.0.0.1:1234", num_processes=2, process_id=-1), "--process-id=-1"),
    (dict(coordinator="127.0.0.1:1234", num_processes=0, process_id=0), "--num-processes=0"),
    (dict(coordinator="127.0.0.1", num_processes=2, process_id=0), "--coordinator"),
    (dict(coordinator="127.0.0.1:0", num_processes=2, process_id=0), "--coordinator"),
    (dict(coordinator="host:70000", num_processes=2, process_id=0), "--coordinator"),
    (dict(coordinator="a b:1234", num_processes=2, process_id=0), "--coordinator"),
    (dict(coordinator="127.0.0.1:1234", num_processes=2), "--process-id missing"),
    (dict(num_processes=2, process_id=0), "--coordinator missing"),
    (dict(coordinator="127.0.0.1:1234", num_processes=2, process_id=0, heartbeat_timeout=0),
     "heartbeat_timeout=0"),
])
def test_initialize_rejects_bad_settings_before_starting(kwargs, flag):
    with pytest.raises(ValueError, match=re.escape(flag)) as err:
        distributed.initialize(**kwargs)
    assert "\n" not in str(err.value)
    assert not jax.distributed.is_initialized()


def test_coordinator_address_forms():
    assert distributed.check_coordinator("10.0.0.1:12345") == ("10.0.0.1", 12345)
    assert distributed.check_coordinator("node-01.cluster:80") == ("node-01.cluster", 80)
    assert distributed.check_coordinator("[::1]:8476") == ("[::1]", 8476)


def test_initialize_one_process_is_a_no_op(monkeypatch):
    distributed.initialize("127.0.0.1:1234", 1, 0)  # after JAX started: nothing to join
    for var in [v for v in os.environ if v.startswith(("SLURM_", "OMPI_", "JAX_COORD"))]:
        monkeypatch.delenv(var)
    assert not distributed.cluster_detected()
    distributed.initialize()
    assert not jax.distributed.is_initialized() and jax.process_count() == 1


def test_slurm_step_is_detected_by_jax(monkeypatch):
    for var, value in {"SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "node1",
                       "SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}.items():
        monkeypatch.setenv(var, value)
    assert distributed.cluster_detected()


def test_make_mesh_spans_all_devices_in_process_order():
    mesh = distributed.make_mesh("chips")
    assert mesh.axis_names == ("chips",) and mesh.size == jax.device_count()
    assert list(mesh.devices.flat) == jax.devices()
    two = distributed.make_mesh("batch", jax.devices()[:2])
    assert two.size == 2
    with pytest.raises(ValueError, match="axis"):
        distributed.make_mesh("")
    with pytest.raises(ValueError, match="devices is empty"):
        distributed.make_mesh("chips", [])
    with pytest.raises(ValueError, match="twice"):
        distributed.make_mesh("chips", jax.devices()[:1] * 2)


def test_run_locks_named_waiting_and_shared_in_one_process(tmp_path):
    with files.run_lock(tmp_path):
        with files.run_lock(tmp_path, "shard-0-of-2"):  # a separate lock in the same folder
            assert "(shard-0-of-2) is in use" in refusal_in_another_thread(
                lambda: files.run_lock(tmp_path, "shard-0-of-2"))
            with files.run_lock(tmp_path, "shard-0-of-2"):  # this thread again: held on
                pass
        # one process: the plain lock
        assert "in use by another run" in refusal_in_another_thread(
            lambda: distributed.shared_run_lock(tmp_path))
    assert distributed.agree(True) and not distributed.agree(False)
    # wait=True blocks until the holder (another thread, i.e. another open file) releases
    held, order = threading.Event(), []

    def holder():
        with files.run_lock(tmp_path):
            held.set()
            time.sleep(0.3)
            order.append("released")

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait()
    with files.run_lock(tmp_path, wait=True):
        order.append("acquired")
    thread.join()
    assert order == ["released", "acquired"]


def test_host_helpers_in_one_process():
    assert distributed.is_primary()
    mesh = distributed.make_mesh("chips")
    n = 2 * mesh.size
    assert distributed.process_rows(n, mesh) == slice(0, n)
    x = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    committed = jax.device_put(x, jax.devices()[-1])  # a committed single-device array
    sharded = distributed.shard_rows(committed, mesh)
    assert sharded.sharding.spec[0] == "chips"
    np.testing.assert_array_equal(distributed.to_host(sharded), x)
    rep = distributed.replicate({"x": committed, "s": 3}, mesh)
    assert rep["x"].sharding.is_fully_replicated
    np.testing.assert_array_equal(distributed.to_host(rep)["x"], x)
    assert distributed.to_host(rep)["s"] == 3
    np.testing.assert_array_equal(distributed.to_host(distributed.from_process_rows(x, mesh, n)),
                                  x)
    with pytest.raises(ValueError, match="rows 0..7 of 8"):
        distributed.from_process_rows(x[:4], distributed.make_mesh("chips", jax.devices()[:2]),
                                      8)
    with pytest.raises(ValueError, match="multiple of the mesh"):
        distributed.process_rows(n + 1, mesh)
    with pytest.raises(ValueError, match="multiple of the mesh"):
        distributed.shard_rows(x[:n - 1], mesh)


def test_slurm_gives_each_task_the_gpu_of_its_local_id(monkeypatch):
    """What docs/distributed.md's SLURM advice rests on: jax's SLURM detection sets
    ``local_device_ids=[SLURM_LOCALID]``, so a task must see all of its node's GPUs
    (--gpus-per-node), not one (--gpus-per-task=1), unless local_device_ids is given."""
    from jax._src.clusters import ClusterEnv

    for var, value in {"SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "node1",
                       "SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1"}.items():
        monkeypatch.setenv(var, value)
    detect = ClusterEnv.auto_detect_unset_distributed_params
    assert detect(None, None, None, None, None, 10)[1:] == (4, 3, [1])
    assert detect(None, None, None, [0], None, 10)[3] == [0]  # given ids are kept
