"""Result files written atomically, and an exclusive lock on a run's output directory.

Every file is written to a temporary file in the same directory and renamed into place, so a
run killed mid-write never leaves a half-written table that a rerun would trust. A run holds
:func:`run_lock` on its directory for its whole life: a second live run on the same directory
is refused at once, naming the holder's pid; the lock is an OS file lock (``flock``), so the
kernel releases it when its holder dies and a killed run's lock is simply taken over.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import io
import json
import os
import socket
import tempfile
import threading
import warnings
from pathlib import Path

LOCK_FILE = ".pimjax.lock"


class RunLockedError(RuntimeError):
    """Another live process holds the lock on a run directory."""


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, obj) -> Path:
    """Write ``obj`` as indented JSON atomically (numpy scalars and arrays become numbers)."""
    return write_text(path, json.dumps(jsonable(obj), indent=2) + "\n")


def write_csv(path: str | os.PathLike, rows: list[dict]) -> Path:
    """Write ``rows`` (dicts; the union of their keys, in order, is the header) atomically."""
    fields = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(jsonable(rows))
    return write_text(path, buf.getvalue())


def save_figure(fig, path: str | os.PathLike, **kwargs) -> Path:
    """Save a matplotlib figure atomically (its format from the file suffix)."""
    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".") or "png", **kwargs)
    return write_bytes(path, buf.getvalue())


def jsonable(obj):
    """``obj`` with numpy scalars/arrays, tuples, paths and dataclasses made JSON-friendly."""
    import dataclasses

    import numpy as np

    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(dataclasses.asdict(obj))
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


@contextlib.contextmanager
def run_lock(directory: str | os.PathLike, name: str | None = None, wait: bool = False):
    """Hold an exclusive lock on ``directory`` (created if need be) for the ``with`` block.

    Raises :class:`RunLockedError` at once if another live process holds it; with ``wait``,
    blocks until that process releases it instead. ``name``: a separate lock in the same
    directory (its file ``.pimjax-<name>.lock``), e.g. one per shard of a sweep. Re-entrant:
    a lock this thread of this process already holds (the lock file names it,
    :func:`holder_id`) is simply held on, and released by the outer holder; another thread
    counts as another run. ``directory`` being a file raises FileExistsError naming it.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(errno.EEXIST, "is a file, not a folder", str(directory))
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / (LOCK_FILE if name is None else f".pimjax-{name}.lock")
    me = holder_id()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            if holder == me:  # held by this thread through another descriptor
                yield path
                return
            if not wait:
                what = directory if name is None else f"{directory} ({name})"
                raise RunLockedError(
                    f"{what} is in use by another run ({holder}): wait for it to finish, or "
                    "choose another output directory") from None
            fcntl.flock(fd, fcntl.LOCK_EX)
        stale = os.pread(fd, 200, 0).decode(errors="replace").strip()
        if stale:  # a holder that died without releasing: the kernel dropped its flock
            warnings.warn(f"{directory}: took over the lock of a run that stopped without "
                          f"releasing it ({stale})", stacklevel=3)
        os.ftruncate(fd, 0)
        os.pwrite(fd, me.encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # a clean release leaves an empty lock file
    finally:
        os.close(fd)  # closing releases the flock (of this descriptor only)


def holder_id() -> str:
    """How a lock file names its holder, this thread: ``pid <pid> on <host>[, thread <id>]``
    (the thread's native id, unless it is the main thread)."""
    me = f"pid {os.getpid()} on {socket.gethostname()}"
    thread = threading.get_native_id()
    return me if threading.current_thread() is threading.main_thread() else \
        f"{me}, thread {thread}"
