"""pimjax.cli: one-line errors for the file system (exit 3), Ctrl-C (exit 130), a locked
output folder refused before JAX is imported, and processes that never arrive named."""

import dataclasses
import errno
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import distributed_worker as worker  # tests/ is on sys.path under pytest
import pytest

from pimjax import checkpoint, cli, distributed, files

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
train_script = importlib.import_module("train")
HANG_S = 180  # hard limit of a script subprocess (a smoke training takes 10 to 60 s)


@dataclasses.dataclass(frozen=True)
class Args:
    """A one-flag script."""

    out: Path = Path("unused")


def _env(tmp_path: Path) -> dict:
    """A script subprocess's environment: this checkout, the test session's compile cache."""
    link = tmp_path / "cache" / "jax-compile"
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(worker.test_cache(), target_is_directory=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
           "PIMJAX_CACHE_DIR": str(link.parent)}
    for name in ("PIMJAX_DEBUG", "PIMJAX_COMPILE_CACHE"):
        env.pop(name, None)
    return env


def _run(main, argv=(), **kwargs):
    """``cli.run(main, Args, argv)``: its exit status (None: returned normally)."""
    try:
        cli.run(main, Args, list(argv), **kwargs)
    except SystemExit as e:
        return e.code
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------- file-system errors


@pytest.mark.parametrize("error, words", [
    (OSError(errno.ENOSPC, "No space left on device", "run/checkpoints/3"),
     ["run/checkpoints/3", "No space left on device", "free some space"]),
    (OSError(errno.EROFS, "Read-only file system", "/ro/run"),
     ["/ro/run", "Read-only file system", "writable"]),
    (PermissionError(errno.EACCES, "Permission denied", "run/config.json"),
     ["run/config.json", "Permission denied"]),
    # a checkpoint writer's own error (an OSError) and an error whose cause is a full disk
    (checkpoint.CheckpointWriteError("cannot write checkpoint run/checkpoints/3 (...)"),
     ["cannot write checkpoint run/checkpoints/3"]),
])
def test_file_system_errors_exit_3_in_one_line(error, words, capsys):
    def main(args):
        raise error

    assert _run(main) == cli.FILE_SYSTEM_STATUS
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("error: ") and all(w in line for w in words), line


def test_a_disk_error_behind_another_error_is_reported_as_the_disk(capsys):
    def main(args):
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "run/x")
        except OSError as e:
            raise ValueError("could not save") from e

    assert _run(main) == cli.FILE_SYSTEM_STATUS
    assert "run/x: No space left on device" in _one_error_line(capsys.readouterr().err)


def test_a_missing_file_stays_bad_input(capsys):
    def main(args):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "data/x.idx")

    assert _run(main) == cli.BAD_INPUT_STATUS
    assert "data/x.idx" in _one_error_line(capsys.readouterr().err)


def test_writing_under_a_file_and_locking_a_file_exit_3(tmp_path, capsys):
    """A path through a file (NotADirectoryError), and an output folder that is a file
    (run_lock's FileExistsError), as a read-only or full folder would be: one line, exit 3."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")

    def write(args):
        files.write_json(a_file / "sub" / "result.json", {})

    assert _run(write) == cli.FILE_SYSTEM_STATUS
    assert str(a_file / "sub") in _one_error_line(capsys.readouterr().err)

    def lock(args):
        with files.run_lock(a_file):
            pass

    assert _run(lock) == cli.FILE_SYSTEM_STATUS
    line = _one_error_line(capsys.readouterr().err)
    assert f"{a_file}: is a file, not a folder" in line, line


def test_an_out_that_is_a_file_is_refused_before_any_work(tmp_path):
    a_file = tmp_path / "run"
    a_file.write_text("x")
    done = subprocess.run([sys.executable, "experiments/train.py", "--smoke", "--out",
                           str(a_file)], cwd=ROOT, env=_env(tmp_path), capture_output=True,
                          text=True, timeout=HANG_S)
    assert done.returncode == cli.FILE_SYSTEM_STATUS, done.stderr
    assert f"{a_file}: --out is a file, not a folder" in _one_error_line(done.stderr)
    under = subprocess.run([sys.executable, "experiments/train.py", "--smoke", "--out",
                            str(a_file / "sub")], cwd=ROOT, env=_env(tmp_path),
                           capture_output=True, text=True, timeout=HANG_S)
    assert under.returncode == cli.FILE_SYSTEM_STATUS, under.stderr
    assert f"{a_file / 'sub'}: --out lies under {a_file}, a file" in _one_error_line(
        under.stderr)
    # the same through the parsed flags (in-process: no early lock)
    with pytest.raises(FileExistsError, match="--out is a file"):
        cli.parse(train_script.Args, ["--smoke", "--out", str(a_file)],
                  default=train_script.defaults)


# ------------------------------------------------------------------------------ Ctrl-C


def test_ctrl_c_exits_130_with_one_line_saying_what_is_kept(capsys):
    def main(args):
        raise KeyboardInterrupt

    status = _run(main, interrupted=lambda args: f"{args.out} keeps it: rerun")
    assert status == cli.INTERRUPTED_STATUS
    assert _one_error_line(capsys.readouterr().err) == "interrupted: unused keeps it: rerun"


def test_ctrl_c_waits_for_writer_threads_and_survives_one_it_left_unstarted(monkeypatch,
                                                                           capsys):
    """The interrupted main thread lets a library's writer thread finish (it would fail at
    interpreter shutdown); a thread whose start() the Ctrl-C cut short cannot be joined."""
    done = []
    writer = threading.Thread(target=lambda: (time.sleep(0.5), done.append("written")))
    unstarted = threading.Thread(target=lambda: None)
    listed = threading.enumerate

    def main(args):
        writer.start()
        monkeypatch.setattr(threading, "enumerate", lambda: [*listed(), unstarted])
        raise KeyboardInterrupt

    assert _run(main) == cli.INTERRUPTED_STATUS
    assert done == ["written"]
    assert _one_error_line(capsys.readouterr().err).startswith("interrupted: the files")


def test_ctrl_c_stops_a_training_script_in_one_line(tmp_path):
    """SIGINT once the first checkpoint is written: exit 130, one line naming --resume, no
    traceback, and the run resumes from what was kept; a --resume with another model is
    refused without touching the run, and --restart starts it over."""
    out = tmp_path / "run"
    cmd = [sys.executable, "experiments/train.py", "--smoke", "--no-progress", "--out",
           str(out)]
    # the default SIGINT handler, even where this test runs with SIGINT ignored
    proc = subprocess.Popen([*cmd, "--optim.epochs", "1000"], cwd=ROOT, env=_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + HANG_S
        while not _checkpoints(out / "checkpoints"):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "no checkpoint written (hang)"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=HANG_S)
    finally:
        proc.kill()
    assert proc.returncode == cli.INTERRUPTED_STATUS, err
    line = _one_error_line(err)
    assert line.startswith(f"interrupted: {out} keeps") and "--resume" in line, line
    assert not (out / files.LOCK_FILE).read_text()  # released cleanly
    done = subprocess.run([*cmd, "--optim.epochs", "1000", "--resume", "--stop-after", "1"],
                          cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True,
                          timeout=HANG_S)
    assert done.returncode == 0, done.stderr  # continued from what was kept
    # another model on --resume: refused in one line, the run's files untouched
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()
              and p.name != files.LOCK_FILE}
    other = subprocess.run([*cmd, "--optim.epochs", "1000", "--resume", "--model.width", "0.5"],
                           cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True,
                           timeout=HANG_S)
    assert other.returncode == cli.BAD_INPUT_STATUS, other.stderr
    assert "model.width: 1.0 -> 0.5" in _one_error_line(other.stderr)
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p for p in out.rglob("*") if p.is_file() and p.name != files.LOCK_FILE) \
        == sorted(before)
    # --restart discards the run and trains from the start
    again = subprocess.run([*cmd, "--optim.epochs", "1", "--restart"], cwd=ROOT,
                           env=_env(tmp_path), capture_output=True, text=True, timeout=HANG_S)
    assert again.returncode == 0, again.stderr
    assert _checkpoints(out / "checkpoints") == ["1"]


def _checkpoints(directory: Path) -> list[str]:
    """The complete checkpoints of ``directory`` (numbered folders), or []."""
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if p.name.split(".")[0].isdigit())


# --------------------------------------------------------------------- early run lock

PROBE = textwrap.dedent("""
    import runpy, sys
    sys.path.insert(0, "experiments")
    sys.argv = ["experiments/train.py", *sys.argv[1:]]
    try:
        runpy.run_path("experiments/train.py", run_name="__main__")
    finally:
        print("jax imported:", "jax" in sys.modules, flush=True)
""")


def test_a_locked_out_is_refused_before_jax_is_imported(tmp_path):
    out = tmp_path / "run"
    with files.run_lock(out):  # held by this process: the script's process is refused
        done = subprocess.run([sys.executable, "-c", PROBE, "--smoke", "--out", str(out)],
                              cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True,
                              timeout=HANG_S)
    assert done.returncode == cli.FAILURE_STATUS, done.stderr
    line = _one_error_line(done.stderr)
    assert line == f"error: {out} is in use by another run ({files.holder_id()}): wait for " \
                   "it to finish, or choose another output directory"
    assert done.stdout.strip() == "jax imported: False"


def test_importing_cli_imports_no_jax(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import sys, pimjax.cli; "
                           "print(sorted(m for m in sys.modules if m.split('.')[0] in "
                           "('jax', 'numpy', 'orbax', 'flax')))"],
                          cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True,
                          timeout=HANG_S)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def test_lock_early_holds_the_lock_for_the_run_and_releases_it(tmp_path):
    """The early lock, then the script's own run_lock (train() takes shared_run_lock) in the
    same process; another process is refused meanwhile; a clean release at exit."""
    out = tmp_path / "run"
    out.mkdir()
    script = textwrap.dedent(f"""
        import sys
        from pimjax import cli, distributed, files
        assert cli.lock_early(["--out", {str(out)!r}]) is not None
        with distributed.shared_run_lock({str(out)!r}):
            with files.run_lock({str(out)!r}):
                print("held", flush=True)
                sys.stdin.readline()
        print("inner released", flush=True)
        sys.stdin.readline()
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=_env(tmp_path),
                            text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    def refused():
        with pytest.raises(files.RunLockedError, match=f"pid {proc.pid} on"):
            with files.run_lock(out):
                pass

    try:
        assert proc.stdout.readline().strip() == "held"
        refused()
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "inner released"
        refused()  # the early lock holds on until the process exits
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(timeout=HANG_S)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert (out / files.LOCK_FILE).read_text() == ""  # released cleanly: no stale warning


def test_lock_early_only_where_surely_one_process(tmp_path):
    assert cli.single_process([], environ={})
    assert cli.single_process(["--num-processes", "1"], environ={"SLURM_JOB_ID": "1"})
    assert not cli.single_process(["--num-processes", "2"], environ={})
    assert not cli.single_process(["--coordinator", "h:1"], environ={})
    slurm = dict(SLURM_JOB_ID="1", SLURM_STEP_NODELIST="n1", SLURM_NTASKS="2",
                 SLURM_PROCID="0", SLURM_LOCALID="0")
    assert not cli.single_process([], environ=slurm)
    assert cli.single_process([], environ={**slurm, "SLURM_NTASKS": "1"})
    assert not cli.single_process([], environ={"OMPI_MCA_orte_hnp_uri": "x"})
    # nothing to lock: no folder yet, --help, several processes
    assert cli.lock_early(["--out", str(tmp_path / "new")]) is None
    assert not (tmp_path / "new").exists()
    assert cli.lock_early(["--out", str(tmp_path), "--help"]) is None
    assert cli.lock_early(["--out", str(tmp_path), "--num-processes", "2"]) is None
    assert not (tmp_path / files.LOCK_FILE).exists()


# ----------------------------------------------------------- processes that never arrive


def test_process_flag_defaults_are_distributeds():
    p = cli.Processes()
    assert p.heartbeat_timeout == distributed.HEARTBEAT_TIMEOUT
    assert p.init_timeout == distributed.INITIALIZATION_TIMEOUT
    with pytest.raises(ValueError, match="--init-timeout=0"):
        cli.Processes(init_timeout=0)


def _rendezvous_all(port: int, num_processes: int, ids, timeout: float = 3,
                    counts=None) -> dict:
    results = {}

    def run(i, n):
        try:
            distributed.rendezvous(f"127.0.0.1:{port}", n, i, timeout)
            results.setdefault(i, []).append("go")
        except (distributed.ProcessesMissingError, ValueError) as e:
            results.setdefault(i, []).append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=run, args=(i, (counts or {}).get(i, num_processes)))
               for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "rendezvous hangs"
    return results


def test_rendezvous_names_the_missing_processes_everywhere():
    port = _free_port()
    assert _rendezvous_all(port, 3, (2, 0, 1)) == {0: ["go"], 1: ["go"], 2: ["go"]}
    got = _rendezvous_all(port, 4, (0, 2))
    for i in (0, 2):
        assert got[i] == ["ProcessesMissingError: processes 1, 3 of 4 did not join the run at "
                          f"127.0.0.1:{port} within 3 s (--init-timeout): start them with "
                          "the same --coordinator and --num-processes, or raise --init-timeout"]
    alone = _rendezvous_all(port, 2, (1,), timeout=1)[1][0]
    assert alone.startswith(f"ProcessesMissingError: process 0 (the coordinator, 127.0.0.1:"
                            f"{port}) did not start within 1 s")
    clash = _rendezvous_all(port, 3, (0, 1, 1))
    assert any("two processes were started with --process-id 1" in r
               for r in clash[0] + clash[1])
    other = _rendezvous_all(port, 2, (0, 1), counts={1: 3})
    assert "started with --num-processes 3, process 0 with 2" in other[0][0]


def test_a_process_that_never_arrives_is_named_in_one_line(tmp_path):
    """Process 1 of 2 is never started: process 0 ends after --init-timeout, naming it,
    instead of JAX's C++ abort after 300 s."""
    [proc] = worker.start("unused", tmp_path, "--smoke", "--out", str(tmp_path / "run"),
                          "--init-timeout", "3", num_processes=2, ids=[0],
                          script="experiments/train.py")
    try:
        proc.wait(timeout=HANG_S)
    finally:
        proc.kill()
    text = (tmp_path / "log0.txt").read_text()
    assert proc.returncode == cli.FAILURE_STATUS, text
    assert "Check failure" not in text and "Traceback" not in text, text
    last = text.strip().splitlines()[-1]
    assert last.startswith("error: process 1 of 2 did not join the run at 127.0.0.1:"), text
    assert "within 3 s (--init-timeout)" in last


def test_a_claim_shard_locks_early_only_its_own_shard(tmp_path):
    """grid.lock_early takes the lock grid.run takes: a shard's, so shards never refuse each
    other; --merge takes none."""
    out = tmp_path / "claim"
    out.mkdir()
    script = textwrap.dedent(f"""
        import json, os, sys
        sys.path.insert(0, "experiments")
        import grid
        from pimjax import files
        grid.lock_early(["--out", {str(out)!r}, "--shard", "0/2"])
        grid.lock_early(["--out", {str(out)!r}, "--merge"])
        with files.run_lock({str(out)!r}, "shard-1-of-2"):  # another shard's lock
            pass
        print(json.dumps([sorted(os.listdir({str(out)!r})), "jax" in sys.modules]))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=HANG_S)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [[".pimjax-shard-0-of-2.lock",
                                        ".pimjax-shard-1-of-2.lock"], False]
