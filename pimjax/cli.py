"""The command line of pimjax's scripts: tyro parsing, process settings, one-line errors.

A script describes its flags as a frozen dataclass (nested dataclasses become ``--optim.lr``
style flags, hyphenated) and hands it to :func:`run` with its main function::

    def main(args: Args) -> list[dict]: ...

    if __name__ == "__main__":
        cli.run(main, Args, default=defaults)

:func:`run` parses the command line with tyro (every value, and every dataclass's own
validation, is checked before the main function starts: before any data is loaded or any
program compiled), calls :func:`pimjax.runtime.configure` once, then runs the main function.
A user error prints one line, ``error: ...``, on stderr, with no traceback, and exits with

* status 2 (:data:`BAD_INPUT_STATUS`): bad input, a bad flag, ValueError, FileNotFoundError,
  a damaged checkpoint;
* status 1 (:data:`FAILURE_STATUS`): a run directory in use, a diverged training, processes
  of a multi-process run that never arrived;
* status 3 (:data:`FILE_SYSTEM_STATUS`): the file system refused a write or a folder (a full
  disk, a read-only or forbidden folder, a file where a folder should be), any OSError but
  a missing file: the line names the path and the cause;
* status 130 (:data:`INTERRUPTED_STATUS`): Ctrl-C; one line says what was kept and how to
  continue (the script's ``interrupted`` message).

Every script also takes

* ``--debug`` (or ``PIMJAX_DEBUG=1``): show the traceback instead;
* ``--no-compile-cache`` (or ``PIMJAX_COMPILE_CACHE=0``): no persistent compilation cache;
* ``--coordinator HOST:PORT --num-processes N --process-id I`` (:class:`Processes`): run as
  process I of a multi-process run (see ``docs/distributed.md``). Without them, JAX's
  auto-detection (SLURM, Open MPI, Cloud TPU) or one process. They are validated with the
  other flags; :func:`run` then calls :func:`pimjax.distributed.initialize` before any JAX
  computation (processes missing after ``--init-timeout`` seconds are named in one line),
  and ends a multi-process run's failed process with :func:`pimjax.distributed.exit_now`,
  so that the others stop within the heartbeat timeout.

A script whose output folder is locked while it runs calls :func:`lock_early` first, before
its heavy imports: a second run on the same folder is refused within a second or two, not
after JAX is imported. This module imports neither JAX nor the rest of pimjax until needed.

``default`` may be a function of the raw arguments, so that one flag can choose the other
flags' defaults (``--setup vgg11`` the paper's epochs and chips, ``--smoke`` tiny sizes):
flags given explicitly always win over such defaults.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import errno
import importlib.util
import io
import os
import re
import sys
import threading
import time
import typing
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Generic, TypeVar

import tyro

from pimjax import files, runtime
from pimjax.files import RunLockedError

T = TypeVar("T")
R = TypeVar("R")

BAD_INPUT = (ValueError, FileNotFoundError)  # exit status 2 (CheckpointError is a ValueError)
BAD_INPUT_STATUS = 2
FAILURE_STATUS = 1
FILE_SYSTEM_STATUS = 3
INTERRUPTED_STATUS = 130  # 128 + SIGINT, as shells report a Ctrl-C
INTERRUPT_WAIT = 60  # seconds a Ctrl-C waits for background writers (a checkpoint) to finish
# What the file system says, and what to do about it (errors whose cause is the disk).
_FILE_SYSTEM_HINTS = {
    errno.ENOSPC: "free some space, or choose another output folder",
    errno.EDQUOT: "free some space, or choose another output folder",
    errno.EROFS: "choose a writable output folder",
    errno.EACCES: "choose a folder you may write to",
    errno.EPERM: "choose a folder you may write to",
    errno.EEXIST: "remove it, or choose another path",
    errno.ENOTDIR: "a part of the path is a file: remove it, or choose another path",
    errno.EISDIR: "a folder is in the way: choose another path",
    errno.EIO: "the disk failed: check it, or choose another output folder",
    errno.EFBIG: "the file is too large for this file system: choose another output folder",
}
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)
# Environment variables by which jax.distributed would detect a multi-process run (its
# SLURM, Open MPI, Kubernetes and Cloud TPU detection; read without importing JAX).
_CLUSTER_VARIABLES = ("OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST",
                      "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES")
_SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                    "SLURM_LOCALID")
DEBUG_ENV = "PIMJAX_DEBUG"
_FLATTENED = tyro.conf.arg(name="")  # a nested dataclass whose flags carry no prefix


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions reported as one line (imported lazily: pimjax.train pulls in JAX)."""
    from pimjax.checkpoint import CheckpointError
    from pimjax.distributed import ProcessesMissingError
    from pimjax.train import TrainingDivergedError

    return (*BAD_INPUT, CheckpointError, RunLockedError, TrainingDivergedError,
            ProcessesMissingError)


def file_system_error(error: BaseException) -> OSError | None:
    """The OSError behind ``error`` (itself, or a cause that is a failing disk), or None.

    A missing file (FileNotFoundError) is bad input, not the file system's refusal.
    """
    if isinstance(error, OSError) and not isinstance(error, FileNotFoundError):
        return error
    seen = {id(error)}  # a cause: only a failing disk (another error's message may be better)
    error = error.__cause__ or error.__context__
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _DISK_ERRNOS:
            return error
        error = error.__cause__ or error.__context__
    return None


def file_system_message(error: OSError) -> str:
    """One line naming the path, the file system's reason and what to do about it."""
    paths = " -> ".join(os.fspath(f) for f in (error.filename, error.filename2) if f is not None)
    reason = error.strerror or one_line(error)
    hint = _FILE_SYSTEM_HINTS.get(error.errno)
    text = f"{paths}: {reason}" if paths else reason
    return f"{text} ({hint})" if hint else text


@dataclasses.dataclass(frozen=True)
class Processes:
    """How this process joins a multi-process run (all three flags, or none: auto-detection)."""

    coordinator: str | None = None
    """HOST:PORT of process 0, where the run's processes meet (multi-process runs)"""
    num_processes: int | None = None
    """processes of the run (with --coordinator and --process-id)"""
    process_id: int | None = None
    """this process's index, 0..N-1 (with --coordinator and --num-processes)"""
    # (the defaults are pimjax.distributed's HEARTBEAT_TIMEOUT and INITIALIZATION_TIMEOUT,
    # written out: importing that module imports JAX; tests/test_cli.py checks they agree)
    heartbeat_timeout: int = 30
    """seconds after which a silent process is declared dead and the run stops"""
    init_timeout: int = 300
    """seconds the processes wait for each other at start; then the missing ones are named"""

    def __post_init__(self):
        settings = (self.coordinator, self.num_processes, self.process_id)
        if any(v is not None for v in settings):  # (the default instance imports no JAX)
            from pimjax import distributed

            distributed.check_settings(*settings)
        for flag, value in (("--heartbeat-timeout", self.heartbeat_timeout),
                            ("--init-timeout", self.init_timeout)):
            if isinstance(value, bool) or value < 1:
                raise ValueError(f"{flag}={value} must be an integer >= 1 (seconds)")

    def initialize(self) -> None:
        """Join the run and open its connections (:func:`pimjax.distributed.initialize`,
        :func:`pimjax.distributed.connect`); one process: nothing."""
        from pimjax import distributed

        distributed.initialize(self.coordinator, self.num_processes, self.process_id,
                               heartbeat_timeout=self.heartbeat_timeout,
                               initialization_timeout=self.init_timeout)
        if jax_distributed():
            distributed.connect()


@dataclasses.dataclass(frozen=True)
class Command(Generic[T]):
    """A script's own flags, plus the flags every pimjax script takes."""

    args: Annotated[T, _FLATTENED]
    processes: Annotated[Processes, _FLATTENED] = Processes()
    debug: bool = False
    """show the traceback of an error (also PIMJAX_DEBUG=1)"""
    compile_cache: bool = True
    """the persistent compilation cache (--no-compile-cache, or PIMJAX_COMPILE_CACHE=0: off)"""


def has_flag(argv: Sequence[str], flag: str) -> bool:
    """Whether the boolean ``flag`` (e.g. ``"--smoke"``) is among the raw arguments."""
    return flag in _options(argv)


def flag_value(argv: Sequence[str], flag: str) -> str | None:
    """The value given to ``flag`` (``--flag v`` or ``--flag=v``; the last one wins), or None."""
    value = None
    args = _options(argv)
    for i, token in enumerate(args):
        if token == flag and i + 1 < len(args):
            value = args[i + 1]
        elif token.startswith(flag + "="):
            value = token[len(flag) + 1:]
    return value


def _options(argv: Sequence[str]) -> list[str]:
    args = list(argv)
    return args[:args.index("--")] if "--" in args else args


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return text or type(error).__name__


def fail(message: str, status: int = BAD_INPUT_STATUS) -> typing.NoReturn:
    """Print ``error: message`` on stderr and exit with ``status``."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(status)


def parse(cls: type[T], argv: Sequence[str] | None = None, *,
          default: T | Callable[[list[str]], T] | None = None,
          description: str | None = None, prog: str | None = None) -> Command[T]:
    """Parse ``argv`` into ``Command[cls]``; a bad flag prints one line and exits with 2.

    ``default``: the defaults (an instance of ``cls``, or a function of the raw arguments
    that returns one; ``tyro.MISSING`` fields are required flags).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if callable(default) and not isinstance(default, cls):
        default = default(argv)
    kwargs = {} if default is None else {"default": Command(default)}
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            command = tyro.cli(Command[cls], args=argv, description=description, prog=prog,
                               **kwargs)
    except SystemExit as e:
        if e.code in (0, None):
            sys.stderr.write(captured.getvalue())
            raise
        fail(_parse_error(captured.getvalue(), _flattened_names(cls)))
    sys.stderr.write(captured.getvalue())  # tyro's warnings, if any
    return command


def run(main: Callable[[T], R], cls: type[T], argv: Sequence[str] | None = None, *,
        default: T | Callable[[list[str]], T] | None = None,
        description: str | None = None, prog: str | None = None,
        interrupted: Callable[[T], str] | None = None) -> R:
    """Parse the flags, configure the process, run ``main(args)``; report user errors in one line.

    Returns what ``main`` returns. Warnings print as ``warning: ...`` lines. In a
    multi-process run, a process whose ``main`` fails (any exception) reports it and ends at
    once (:func:`pimjax.distributed.exit_now`); the others then stop within the heartbeat
    timeout, most at once with their next collective's error. ``interrupted(args)``: what a
    Ctrl-C leaves and how to continue, printed as ``interrupted: ...`` (exit status 130).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = has_flag(argv, "--debug") or os.environ.get(DEBUG_ENV, "0") not in ("", "0")
    errors = user_errors()
    command = None
    with warnings.catch_warnings():
        if not debug:
            warnings.showwarning = _show_warning
        try:
            command = parse(cls, argv, default=default, description=description, prog=prog)
            runtime.configure(compile_cache=command.compile_cache)
            command.processes.initialize()
            return main(command.args)
        except KeyboardInterrupt:
            if debug:
                raise
            _let_threads_finish()
            if command is None:
                kept = "nothing was started"
            elif interrupted is None:
                kept = "the files written so far are kept"
            else:
                kept = interrupted(command.args)
            print(f"interrupted: {kept}", file=sys.stderr, flush=True)
            _end(INTERRUPTED_STATUS)
        except Exception as e:
            disk = file_system_error(e)
            if disk is not None:
                status, known, message = FILE_SYSTEM_STATUS, True, file_system_message(disk)
            else:
                status = BAD_INPUT_STATUS if isinstance(e, BAD_INPUT) else FAILURE_STATUS
                known, message = isinstance(e, errors), one_line(e)
            if jax_distributed():  # any failure must end this process now
                _fail_process(e, message, debug or not known, status)
            if debug or not known:
                raise
            fail(message, status)


def lock_early(argv: Sequence[str] | None = None, flag: str = "--out", *,
               default: str | os.PathLike | None = None, name: str | None = None) -> Path | None:
    """Take the run lock on the folder given to ``flag`` now, before the heavy imports.

    A script calls it first thing (``if __name__ == "__main__"``) so that a second run on a
    locked folder is refused in a second or two, not after JAX is imported; the lock is then
    held until the process exits, and the script's own :func:`pimjax.files.run_lock` on the
    folder later in this process simply holds on to it. ``default``: the folder without
    ``flag``; ``name``: as for :func:`pimjax.files.run_lock`. Does nothing (None) for a folder
    that does not exist yet, without ``flag``, with ``--help``, or when the process may be
    one of several (:func:`single_process`: there only process 0 may lock, which needs JAX
    to tell). A folder that is a file or lies under one, or a locked one, prints one line and
    exits (3, 1).
    Returns the lock file's path.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    value = flag_value(argv, flag) or default
    if value is None or has_flag(argv, "--help") or has_flag(argv, "-h"):
        return None
    directory = Path(value)
    debug = has_flag(argv, "--debug") or os.environ.get(DEBUG_ENV, "0") not in ("", "0")
    stack = contextlib.ExitStack()
    with warnings.catch_warnings():
        if not debug:
            warnings.showwarning = _show_warning
        try:
            if directory.exists() and not directory.is_dir():
                raise FileExistsError(errno.EEXIST, f"{flag} is a file, not a folder",
                                      str(directory))
            found = next((p for p in directory.parents if p.exists()), None)
            if found is not None and not found.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, f"{flag} lies under {found}, a file",
                                         str(directory))
            if not directory.is_dir() or not single_process(argv):
                return None
            path = stack.enter_context(files.run_lock(directory, name))
        except (RunLockedError, OSError) as e:
            if debug:
                raise
            disk = file_system_error(e)
            if disk is None:
                fail(one_line(e), FAILURE_STATUS)
            fail(file_system_message(disk), FILE_SYSTEM_STATUS)
    atexit.register(stack.close)  # a clean release at exit (the kernel's would look stale)
    return path


def single_process(argv: Sequence[str], environ=os.environ) -> bool:
    """Whether these raw arguments and environment surely make a one-process run.

    ``--num-processes 1``, or none of the process flags and none of the environments that
    JAX's auto-detection turns into a multi-process run (a SLURM step of several tasks, Open
    MPI, Kubernetes, a Cloud TPU VM), judged without importing JAX.
    """
    count = flag_value(argv, "--num-processes")
    if count is not None:
        return count.strip() == "1"
    if flag_value(argv, "--coordinator") is not None or flag_value(argv, "--process-id"):
        return False
    if any(v in environ for v in _CLUSTER_VARIABLES):
        return False
    if all(v in environ for v in _SLURM_VARIABLES) and environ["SLURM_NTASKS"] != "1":
        return False
    return importlib.util.find_spec("libtpu") is None


def jax_distributed() -> bool:
    """Whether this process is part of a multi-process run (jax.distributed started)."""
    import jax

    return jax.distributed.is_initialized()


def _fail_process(error: BaseException, message: str, traceback: bool,
                  status: int) -> typing.NoReturn:
    """Report the failure of one process of a multi-process run and end it at once."""
    import traceback as tb

    import jax

    from pimjax import distributed

    if traceback:
        tb.print_exception(error, file=sys.stderr)
    print(f"error: process {jax.process_index()} of {jax.process_count()}: {message}",
          file=sys.stderr, flush=True)
    distributed.exit_now(status)


def _let_threads_finish(timeout: float = INTERRUPT_WAIT) -> None:
    """Wait (at most ``timeout`` s; a second Ctrl-C: no longer) for the other threads.

    A Ctrl-C can stop the main thread while a library's writer thread (orbax saving a
    checkpoint) is still at work: once the interpreter shuts down, that thread fails with a
    traceback and leaves a temporary folder. Letting it finish first keeps its work.
    """
    deadline = time.monotonic() + timeout
    with contextlib.suppress(KeyboardInterrupt):
        for thread in threading.enumerate():
            if thread is not threading.current_thread() and not thread.daemon:
                with contextlib.suppress(RuntimeError):  # (a thread the Ctrl-C left unstarted)
                    thread.join(max(0.0, deadline - time.monotonic()))


def _end(status: int) -> typing.NoReturn:
    """Exit with ``status``; in a multi-process run at once (no exit barrier)."""
    if "jax" in sys.modules and jax_distributed():
        from pimjax import distributed

        distributed.exit_now(status)
    raise SystemExit(status)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {one_line(message)}", file=file or sys.stderr, flush=True)


# ------------------------------------------------------------------------ tyro's messages

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_BOX = "╭╮╰╯│─"
_FIELD = re.compile(r"Error parsing ([A-Za-z_][\w.]*):")


def _flattened_names(cls) -> set[str]:
    """Names of the (nested) dataclass fields whose flags carry no prefix, plus the
    :class:`Command` fields ``args`` and ``processes``."""
    names, todo, seen = {"args", "processes"}, [cls], set()
    while todo:
        kind = todo.pop()
        if not dataclasses.is_dataclass(kind) or kind in seen:
            continue
        seen.add(kind)
        try:
            hints = typing.get_type_hints(kind, include_extras=True)
        except Exception:  # unresolvable annotations: nothing to learn here
            continue
        for name, hint in hints.items():
            meta = getattr(hint, "__metadata__", ())
            if any(getattr(m, "name", None) == "" for m in meta):
                names.add(name)
            todo.extend(a for a in typing.get_args(hint) if dataclasses.is_dataclass(a))
            if dataclasses.is_dataclass(hint):
                todo.append(hint)
    return names


def _parse_error(text: str, flattened: set[str]) -> str:
    """tyro's boxed error message as one line: the text between the box's first two rules.

    tyro draws ``title / rule / message / rule / help footer``, with UTF-8 box characters
    (the title inside the top border) or, when stdout is not UTF-8, with dashes.
    """
    title, parts = "", []
    for raw in _ANSI.sub("", text).splitlines():
        line = raw.strip()
        if line.startswith(("╭", "╰")):
            title = title or line.strip(_BOX + " ")
            parts.append(None)
            continue
        line = line.strip("│").strip()
        parts.append(None if line and set(line) <= set("─-") else line)
    rules = [i for i, p in enumerate(parts) if p is None]
    if len(rules) >= 2:
        title = title or " ".join(p for p in parts[:rules[0]] if p)
        body = [p for p in parts[rules[0] + 1:rules[1]] if p]
    else:
        body = [p for p in parts if p]
    message = re.sub(r"\s+", " ", " ".join(body)).strip()
    if not message:
        return re.sub(r"\s+", " ", text).strip() or "invalid arguments (see --help)"

    def flag(match: re.Match) -> str:
        parts = [p for p in match.group(1).split(".") if p not in flattened]
        return "--" + ".".join(p.replace("_", "-") for p in parts) + ":" if parts else ""

    message = _FIELD.sub(flag, message).strip().removeprefix("Error parsing ")
    if title == "Required options":
        flags = re.findall(r"(?<!\S)--[\w.-]+", message)
        message = "missing required flag(s): " + (", ".join(flags) or message)
    return f"{message} (see --help)"
