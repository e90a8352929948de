"""Runs over several processes and hosts on JAX's own engine, and THE mesh helper.

A multi-process run is the same script started once per process: each process calls
:func:`initialize` first (it starts ``jax.distributed``), then builds the global mesh with
:func:`make_mesh` and works on global ``jax.Array`` s; XLA moves the data between
processes (gloo collectives on CPU). Nothing here distributes work by itself.

Host data and global arrays:

* :func:`replicate`: the same value on every device of the mesh (parameters, images);
* :func:`shard_rows`: rows split over the mesh from data every process holds in full
  (chip keys, a batch every process loaded);
* :func:`process_rows` / :func:`from_process_rows`: each process holds only its own rows
  (its shard of a global batch);
* :func:`to_host`: a global array back as NumPy on every process (a collective: every
  process must call it); only :func:`is_primary` should then write files.

Failure behaviour (jax 0.10.2 on CPU, two processes on one machine, measured by
``benchmarks/distributed_failure.py``; see ``docs/distributed.md``): when one process dies
(SIGKILL) or hangs (SIGSTOP), every other process exits within ``heartbeat_timeout`` + about
1 s with JAX's "Terminating process because the JAX distributed service detected fatal
errors" (SIGABRT, exit status 134); a killed process 0 (the coordinator) stops the others at
once. A collective with a killed peer fails at once (``JaxRuntimeError: Gloo ... failed:
... Connection closed by peer``), and the process still exits only at the same bound. A
process that never connects would make JAX abort the others after ``initialization_timeout``
with a C++ stack; with explicit settings, :func:`initialize` first waits for every process
itself (:func:`rendezvous`) and raises :class:`ProcessesMissingError` naming the missing ones.

A Python exception is different: the failing process stays alive in JAX's exit barrier while
the others wait in their next collective, and the run ends only after ``shutdown_timeout``.
Entry points therefore end a failed process with :func:`exit_now`, which the others see as a
dead process (the bounds above).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import sys
import time
from typing import NoReturn

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pimjax import files

# Seconds without a heartbeat after which a process is declared dead and the others abort
# (jax's default is 100 s). Heartbeats come from a background thread, so long computations
# do not delay them.
HEARTBEAT_TIMEOUT = 30
# Seconds every process waits for all the others to connect (jax's default).
INITIALIZATION_TIMEOUT = 300
# Seconds a finished process waits at exit for the others to finish (jax's default); only a
# live but slower process is waited for: a dead one fails the wait after HEARTBEAT_TIMEOUT.
SHUTDOWN_TIMEOUT = 300

_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+):([0-9]{1,5})$")

log = logging.getLogger(__name__)


class ProcessesMissingError(RuntimeError):
    """Processes of a multi-process run did not arrive within the initialization timeout."""


# ------------------------------------------------------------------------------- settings


def check_coordinator(coordinator: str) -> tuple[str, int]:
    """``(host, port)`` of a ``HOST:PORT`` address, or ValueError naming ``--coordinator``."""
    match = _HOST_PORT.match(coordinator) if isinstance(coordinator, str) else None
    if match is None or not 1 <= int(match.group(2)) <= 65535:
        raise ValueError(f"coordinator={coordinator!r} is not HOST:PORT (port 1..65535): pass "
                         "--coordinator with process 0's address, e.g. 10.0.0.1:12345")
    return match.group(1), int(match.group(2))


def check_settings(coordinator: str | None, num_processes: int | None,
                   process_id: int | None) -> None:
    """Raise ValueError (naming the flag) unless the settings are all unset or all valid."""
    given = {"--coordinator": coordinator, "--num-processes": num_processes,
             "--process-id": process_id}
    if all(v is None for v in given.values()):
        return
    missing = [flag for flag, v in given.items() if v is None]
    if missing:
        raise ValueError(f"{', '.join(missing)} missing: pass --coordinator, --num-processes "
                         "and --process-id together, or none of them (auto-detection)")
    for flag, value, low in (("--num-processes", num_processes, 1),
                             ("--process-id", process_id, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{flag}={value!r} must be an integer >= {low}")
    if process_id >= num_processes:
        raise ValueError(f"--process-id={process_id} is out of range for --num-processes="
                         f"{num_processes}: use 0..{num_processes - 1}")
    check_coordinator(coordinator)


def _check_timeouts(**timeouts) -> None:
    for name, value in timeouts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}={value!r} must be a positive number of seconds")


def cluster_detected() -> bool:
    """Whether jax.distributed's own auto-detection recognises this environment.

    SLURM (inside ``srun``), Open MPI and Cloud TPU VMs are detected by JAX itself; pimjax only
    asks JAX's registry of cluster environments (no public API for it in jax 0.10).
    """
    try:
        from jax._src.clusters import ClusterEnv
        envs = [e for e in ClusterEnv._cluster_types if not e.opt_in_only_method]
    except (ImportError, AttributeError):  # registry moved: let jax.distributed decide
        return True
    return any(env.is_env_present() for env in envs)


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, heartbeat_timeout: int = HEARTBEAT_TIMEOUT,
               initialization_timeout: int = INITIALIZATION_TIMEOUT,
               shutdown_timeout: int = SHUTDOWN_TIMEOUT) -> None:
    """Join a multi-process run: explicit settings, else JAX's auto-detection, else one process.

    Call it once, before any JAX computation (entry points do; importing pimjax never does).
    With ``coordinator`` (process 0's ``HOST:PORT``), ``num_processes`` and ``process_id``
    given, those are used (``num_processes=1`` is a no-op). With none of them, SLURM / Open
    MPI / Cloud TPU settings are detected by ``jax.distributed``; elsewhere the run stays a
    single process and nothing happens. CPU collectives use gloo. See the module docstring
    for what the timeouts bound. With explicit settings, processes that do not arrive within
    ``initialization_timeout`` raise :class:`ProcessesMissingError` (:func:`rendezvous`).
    """
    check_settings(coordinator, num_processes, process_id)
    _check_timeouts(heartbeat_timeout=heartbeat_timeout,
                    initialization_timeout=initialization_timeout,
                    shutdown_timeout=shutdown_timeout)
    timeouts = dict(heartbeat_timeout_seconds=heartbeat_timeout,
                    initialization_timeout=initialization_timeout,
                    shutdown_timeout_seconds=shutdown_timeout)
    if coordinator is None:
        if jax.distributed.is_initialized() or not cluster_detected():
            return
        _use_gloo()
        try:
            jax.distributed.initialize(**timeouts)
        except ValueError as e:  # jax found no cluster after all: stay one process
            if "coordinator_address" not in str(e):
                raise
            return
        log.info("joined the multi-process run jax.distributed detected")
    else:
        if num_processes == 1:
            return
        _use_gloo()
        rendezvous(coordinator, int(num_processes), int(process_id), initialization_timeout)
        # Explicit settings are used as given: no detection (under SLURM it would also pin
        # each process to one local GPU).
        jax.distributed.initialize(coordinator, int(num_processes), int(process_id),
                                   cluster_detection_method="deactivate", **timeouts)
        # (not jax.process_count(): that would start the backends here)
        log.info("process %d of %d joined the run coordinated at %s", process_id,
                 num_processes, coordinator)


# How long a process waits for a stranger's first line, and for a peer to close first.
_HELLO_TIMEOUT = 10
_CLOSE_TIMEOUT = 2


def rendezvous(coordinator: str, num_processes: int, process_id: int, timeout: float) -> None:
    """Wait until all ``num_processes`` processes have started, before ``jax.distributed``.

    JAX aborts a process whose peers do not all connect within its initialization timeout,
    with a C++ stack and no word of which are missing. So process 0 first listens on the
    coordinator's port itself: every other process connects and says its id, and process 0
    answers all of them once the last one arrived (then frees the port for JAX's service),
    or after ``timeout`` seconds names the missing ones. Raises
    :class:`ProcessesMissingError` (in process 0 and in every process that arrived) or
    ValueError (settings that disagree, a port in use).
    """
    host, port = check_coordinator(coordinator)
    if process_id == 0:
        _gather(coordinator, port, num_processes, timeout)
    else:
        _join(coordinator, host, port, num_processes, process_id, timeout)


def _missing_message(missing, num_processes: int, coordinator: str, timeout: float) -> str:
    ids = ", ".join(map(str, missing))
    return (f"process{'es' if len(missing) > 1 else ''} {ids} of {num_processes} did not join "
            f"the run at {coordinator} within {timeout:g} s (--init-timeout): start "
            f"{'them' if len(missing) > 1 else 'it'} with the same --coordinator and "
            "--num-processes, or raise --init-timeout")


def _gather(coordinator: str, port: int, num_processes: int, timeout: float) -> None:
    """Process 0's side of :func:`rendezvous`."""
    try:
        if socket.has_dualstack_ipv6():
            server = socket.create_server(("", port), family=socket.AF_INET6,
                                          dualstack_ipv6=True)
        else:
            server = socket.create_server(("", port))
    except OSError as e:
        raise ValueError(f"--coordinator {coordinator}: process 0 cannot listen on port {port} "
                         f"({e.strerror}): choose a free port") from None
    deadline = time.monotonic() + timeout
    arrived: dict[int, socket.socket] = {}
    try:
        with server:
            while len(arrived) < num_processes - 1:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                server.settimeout(remaining)
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    break
                conn.settimeout(_HELLO_TIMEOUT)
                try:
                    words = _read_line(conn).split()
                except OSError:
                    words = []
                if len(words) != 3 or words[0] != "pimjax" or not all(
                        w.isdigit() for w in words[1:]):
                    conn.close()  # not one of ours
                    continue
                count, index = int(words[1]), int(words[2])
                error = None
                if count != num_processes:
                    error = (f"process {index} was started with --num-processes {count}, "
                             f"process 0 with {num_processes}: start all with the same")
                elif index in arrived or not 0 < index < num_processes:
                    error = (f"two processes were started with --process-id {index}: give "
                             "each process its own id")
                if error is not None:
                    for c in (*arrived.values(), conn):
                        _send(c, f"error {error}")
                    raise ValueError(error)
                arrived[index] = conn
        missing = sorted(set(range(1, num_processes)) - set(arrived))
        message = _missing_message(missing, num_processes, coordinator, timeout)
        for conn in arrived.values():
            _send(conn, f"missing {message}" if missing else "go")
        for conn in arrived.values():  # the others close first: the port stays free for JAX
            with contextlib.suppress(OSError):
                conn.settimeout(_CLOSE_TIMEOUT)
                conn.recv(1)
    finally:
        for conn in arrived.values():
            conn.close()
    if missing:
        raise ProcessesMissingError(message)


def _join(coordinator: str, host: str, port: int, num_processes: int, process_id: int,
          timeout: float) -> None:
    """A process's side of :func:`rendezvous` (any but process 0)."""
    deadline = time.monotonic() + timeout
    host = host.strip("[]")
    while True:
        try:
            conn = socket.create_connection((host, port), timeout=_HELLO_TIMEOUT)
            break
        except OSError:
            if time.monotonic() >= deadline:
                raise ProcessesMissingError(
                    f"process 0 (the coordinator, {coordinator}) did not start within "
                    f"{timeout:g} s (--init-timeout): start it, check --coordinator, or raise "
                    "--init-timeout") from None
            time.sleep(0.2)
    with conn:
        conn.sendall(f"pimjax {num_processes} {process_id}\n".encode())
        # process 0 answers within its own timeout, which began before this connection
        conn.settimeout(timeout + _HELLO_TIMEOUT)
        try:
            answer = _read_line(conn)
        except OSError:
            answer = ""
    kind, _, text = answer.partition(" ")
    if kind == "go":
        return
    if kind == "missing":
        raise ProcessesMissingError(text)
    if kind == "error":
        raise ValueError(text)
    raise ProcessesMissingError(f"process 0 (the coordinator, {coordinator}) stopped before "
                                "every process arrived: see its output")


def _send(conn: socket.socket, line: str) -> None:
    with contextlib.suppress(OSError):
        conn.sendall(line.encode() + b"\n")


def _read_line(conn: socket.socket, limit: int = 4096) -> str:
    data = b""
    while not data.endswith(b"\n") and len(data) < limit:
        chunk = conn.recv(limit)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


def connect() -> None:
    """Open the connections of collectives over every device now, while the processes are in
    step (one process: nothing). Call it right after :func:`initialize`; it starts JAX's
    backends.

    jax 0.10 on CPU opens gloo's connections for a set of devices at the first collective
    over them, and that first collective fails (``Gloo context initialization failed:
    DEADLINE_EXCEEDED: GetKeyValue() timed out ... 30 s``) when the processes reach it more
    than 30 s apart, e.g. when one of them compiles or loads data slower. Once open, later
    collectives over the same devices may be reached any time apart (measured: 45 s).
    """
    if jax.process_count() == 1:
        return
    mesh = make_mesh("connect")
    to_host(jax.jit(lambda a: a.sum())(shard_rows(np.ones(mesh.size, np.float32), mesh)))


def exit_now(code: int) -> NoReturn:
    """End this process with ``code``; in a multi-process run skip JAX's exit barrier.

    Output is flushed, but no other ``atexit`` handler runs: call it after reporting the
    error. The other processes then stop within ``heartbeat_timeout`` instead of waiting up
    to ``shutdown_timeout`` for this one.
    """
    if not jax.distributed.is_initialized():
        raise SystemExit(code)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    logging.shutdown()
    os._exit(code)


def _use_gloo() -> None:
    """CPU collectives over TCP (gloo), unless the user chose an implementation already."""
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


# ------------------------------------------------------------------------------------ mesh


def make_mesh(axis: str, devices=None) -> Mesh:
    """A 1-D mesh named ``axis`` over ``devices`` (default: every device of every process).

    The default order is process by process, so each process holds one contiguous block of
    rows of an array sharded over ``axis`` (see :func:`process_rows`).
    """
    if not isinstance(axis, str) or not axis:
        raise ValueError(f"axis={axis!r} must be a non-empty mesh axis name, e.g. 'chips'")
    if devices is None:
        devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    devices = list(devices)
    if not devices:
        raise ValueError("devices is empty: pass at least one device (or None for all)")
    if len(set(devices)) != len(devices):
        raise ValueError("devices lists a device twice: pass each device once")
    return Mesh(np.array(devices), (axis,))


def mesh_processes(mesh: Mesh) -> tuple[int, ...]:
    """The indices of the processes that own a device of ``mesh``, in increasing order."""
    return tuple(sorted({d.process_index for d in mesh.devices.flat}))


def is_primary(mesh: Mesh | None = None) -> bool:
    """True in the process that writes files and prints: process 0 (the only one if alone).

    With ``mesh``: the lowest-numbered process of that mesh.
    """
    if mesh is None:
        return jax.process_index() == 0
    return jax.process_index() == mesh_processes(mesh)[0]


def agree(flag: bool) -> bool:
    """Process 0's ``flag`` in every process (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(multihost_utils.broadcast_one_to_all(np.int32(bool(flag))))


@contextlib.contextmanager
def shared_run_lock(directory, name: str | None = None):
    """:func:`pimjax.files.run_lock` on ``directory`` for all the processes of a run.

    Only process 0 takes the lock; in a multi-process run the others learn whether it got
    it (a collective: every process must enter) and raise the same
    :class:`pimjax.files.RunLockedError` if it did not. So the processes of one run never
    refuse each other, and a second run on the directory is refused in all of them.
    """
    if jax.process_count() == 1:
        with files.run_lock(directory, name):
            yield
        return
    lock = files.run_lock(directory, name) if is_primary() else contextlib.nullcontext()
    try:
        lock.__enter__()
    except files.RunLockedError:
        agree(False)
        raise
    try:
        if not agree(True):
            raise files.RunLockedError(f"{directory} is in use by another run (process 0 could "
                                       "not lock it): wait for it to finish, or choose another "
                                       "output directory")
        yield
    finally:
        lock.__exit__(None, None, None)


def _axis(mesh: Mesh) -> str:
    if len(mesh.axis_names) != 1:
        raise ValueError(f"mesh has axes {mesh.axis_names}: pass a 1-D mesh from make_mesh")
    return mesh.axis_names[0]


def _check_rows(num_rows: int, mesh: Mesh, what: str) -> None:
    if isinstance(num_rows, bool) or not isinstance(num_rows, (int, np.integer)) \
            or num_rows <= 0 or num_rows % mesh.size:
        raise ValueError(f"{what}={num_rows!r} must be a positive multiple of the mesh's "
                         f"{mesh.size} devices: pad it")


def process_rows(num_rows: int, mesh: Mesh) -> slice:
    """The rows ``[start, stop)`` of a ``num_rows``-row array sharded over ``mesh`` held here."""
    axis = _axis(mesh)
    _check_rows(num_rows, mesh, "num_rows")
    mine = [i for i, d in enumerate(mesh.devices.flat) if d.process_index == jax.process_index()]
    if not mine:
        raise ValueError(f"the mesh over '{axis}' has no device of process "
                         f"{jax.process_index()}: build it with make_mesh")
    if mine != list(range(mine[0], mine[-1] + 1)):
        raise ValueError(f"this process's devices are not contiguous on mesh axis '{axis}': "
                         "build the mesh with make_mesh's default device order")
    block = num_rows // mesh.size
    return slice(mine[0] * block, (mine[-1] + 1) * block)


def _put(x, sharding: NamedSharding):
    # A global array is resharded by XLA. Host and process-local arrays go through host
    # memory: jax.device_put of a committed single-device array (e.g. variables restored by
    # orbax) onto a multi-process sharding raises "does not support cross-host device
    # transfers" on CPU (jax 0.10.2).
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        impl = jax.random.key_impl(x)
        data = _put(jax.random.key_data(x), _trailing(sharding, x.ndim))
        return jax.random.wrap_key_data(data, impl=impl)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _trailing(sharding: NamedSharding, ndim: int) -> NamedSharding:
    """The sharding of a key array's data: the key's spec, the key-data axis unsharded."""
    spec = tuple(sharding.spec) + (None,) * (ndim + 1 - len(sharding.spec))
    return NamedSharding(sharding.mesh, P(*spec))


def replicate(tree, mesh: Mesh):
    """A pytree (the same value in every process) copied onto every device of the mesh."""
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: _put(x, sharding), tree)


def shard_rows(tree, mesh: Mesh):
    """Arrays every process holds in full, split by rows (axis 0) over the mesh."""
    sharding = NamedSharding(mesh, P(_axis(mesh)))

    def put(x):
        _check_rows(np.shape(x)[0] if np.ndim(x) else 0, mesh, "rows")
        return _put(x, sharding)

    return jax.tree.map(put, tree)


def from_process_rows(tree, mesh: Mesh, num_rows: int):
    """Global ``num_rows``-row arrays from each process's own rows (``process_rows``)."""
    sharding = NamedSharding(mesh, P(_axis(mesh)))
    rows = process_rows(num_rows, mesh)

    def put(x):
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[0] != rows.stop - rows.start:
            raise ValueError(f"this process holds {x.shape[:1]} rows, it must hold rows "
                             f"{rows.start}..{rows.stop - 1} of {num_rows} (process_rows)")
        return jax.make_array_from_process_local_data(sharding, x, (num_rows, *x.shape[1:]))

    return jax.tree.map(put, tree)


def to_host(tree):
    """Every array of a pytree as a whole NumPy array, in every process (call it in all)."""
    def get(x):
        if isinstance(x, jax.Array) and not (x.is_fully_addressable
                                             or x.sharding.is_fully_replicated):
            return multihost_utils.process_allgather(x, tiled=True)
        return np.asarray(x)

    return jax.tree.map(get, tree)
