"""pimjax.files: atomic result files (no temp file, never a partial target) and the run lock
(a second live holder refused at once naming its pid; a killed holder's lock taken over)."""

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from helpers import refusal_in_another_thread

from pimjax import files
from pimjax import train as T


def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_writers_round_trip_and_leave_no_temp_file(tmp_path):
    out = tmp_path / "sub"
    files.write_json(out / "a.json", {"x": np.float32(0.5), "y": np.arange(3), "p": out,
                                       "t": (1, 2)})
    assert json.loads((out / "a.json").read_text()) == {"x": 0.5, "y": [0, 1, 2],
                                                         "p": str(out), "t": [1, 2]}
    files.write_csv(out / "b.csv", [{"a": 1, "b": np.int64(2)}, {"a": 3, "c": "z"}])
    with open(out / "b.csv") as f:
        assert list(csv.DictReader(f)) == [{"a": "1", "b": "2", "c": ""},
                                           {"a": "3", "b": "", "c": "z"}]
    files.write_text(out / "c.txt", "hello\n")
    files.write_bytes(out / "d.bin", b"\x00\x01")
    assert (out / "d.bin").read_bytes() == b"\x00\x01"
    assert oct((out / "c.txt").stat().st_mode & 0o777) == oct(0o644)
    assert _listing(out) == ["a.json", "b.csv", "c.txt", "d.bin"]


@pytest.mark.parametrize("fail_in", ["fsync", "replace", "interrupt"])
def test_a_writer_failing_mid_write_keeps_the_old_file(tmp_path, monkeypatch, fail_in):
    """The data is written to a temporary file that fails before it replaces the target: the
    target keeps its old content whole, and the temporary file is removed."""
    target = tmp_path / "table.csv"
    files.write_text(target, "old,complete\n")
    exc = KeyboardInterrupt if fail_in == "interrupt" else OSError
    seen = []

    def fail(*args, **kwargs):
        # the temporary file already holds the new data when this runs
        seen.append(sorted(p.name for p in tmp_path.iterdir()))
        raise exc("disk full")

    monkeypatch.setattr(os, "replace" if fail_in == "replace" else "fsync", fail)
    with pytest.raises(exc):
        files.write_csv(target, [{"new": i} for i in range(1000)])
    monkeypatch.undo()
    assert len(seen[0]) == 2 and seen[0][0].startswith(".table.csv.")  # the temp file existed
    assert target.read_text() == "old,complete\n"
    assert _listing(tmp_path) == ["table.csv"]


def test_a_killed_writer_never_leaves_a_partial_target(tmp_path):
    """A process killed while writing 64 MiB leaves no target at all (only its temp file)."""
    target = tmp_path / "big.bin"
    code = textwrap.dedent(f"""
        import os, sys
        from pimjax import files
        real = os.fsync
        def slow(fd):
            print("written", flush=True)
            sys.stdin.readline()  # hold here until killed
        os.fsync = slow
        files.write_bytes({str(target)!r}, b"x" * (64 << 20))
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    try:
        assert proc.stdout.readline().strip() == "written"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert not target.exists()
    (temp,) = tmp_path.iterdir()
    assert temp.name.startswith(".big.bin.") and temp.name.endswith(".tmp")


HOLDER = textwrap.dedent("""
    import sys
    from pimjax import files
    with files.run_lock(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.readline()  # hold the lock until told (or killed)
    print("released", flush=True)
""")


def _holder(directory):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parents[1])
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_live_holder_is_refused_at_once_naming_its_pid(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(files.RunLockedError, match=rf"in use by another run \(pid "
                                                       rf"{proc.pid} on .*\)"):
            with files.run_lock(tmp_path):
                pass
        # train() refuses the directory before loading data or compiling anything
        with pytest.raises(files.RunLockedError, match=f"pid {proc.pid}"):
            T.train(T.TrainConfig(), workdir=tmp_path, num_devices=1, progress=False)
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "released"
        proc.wait(timeout=30)
    finally:
        proc.kill()
    # a clean release leaves an empty lock file: taken without a warning
    assert (tmp_path / files.LOCK_FILE).read_text() == ""
    with files.run_lock(tmp_path) as path:
        assert path.read_text() == f"pid {os.getpid()} on {os.uname().nodename}"


def test_a_killed_holders_lock_is_taken_over_with_a_warning(tmp_path):
    proc = _holder(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert f"pid {proc.pid}" in (tmp_path / files.LOCK_FILE).read_text()  # never released
    with pytest.warns(UserWarning, match=rf"took over the lock .*\(pid {proc.pid} on "):
        with files.run_lock(tmp_path):  # now held by this process: another one is refused
            other = subprocess.run([sys.executable, "-c", HOLDER, str(tmp_path)],
                                   capture_output=True, text=True, input="\n", timeout=60,
                                   cwd=Path(__file__).parents[1])
    assert other.returncode != 0
    assert f"RunLockedError: {tmp_path} is in use by another run (pid {os.getpid()}" \
        in other.stderr
    assert (tmp_path / files.LOCK_FILE).read_text() == ""


def test_the_lock_is_reentrant_in_its_thread_and_refuses_other_threads(tmp_path):
    """A script holds its output folder's lock from its start (cli.lock_early), then train()
    locks it again in the same thread: held on, released by the outer holder only."""
    with files.run_lock(tmp_path) as path:
        with files.run_lock(tmp_path):
            assert path.read_text() == files.holder_id()
        assert path.read_text() == files.holder_id()  # the inner exit released nothing
        assert f"in use by another run ({files.holder_id()})" in refusal_in_another_thread(
            lambda: files.run_lock(tmp_path))
    assert path.read_text() == ""
    assert refusal_in_another_thread(lambda: files.run_lock(tmp_path)) == ""


def test_a_folder_that_is_a_file_is_named(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(FileExistsError, match="is a file, not a folder") as e:
        with files.run_lock(tmp_path / "out"):
            pass
    assert e.value.filename == str(tmp_path / "out")
