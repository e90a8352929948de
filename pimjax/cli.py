"""The command line of pimjax's scripts: tyro parsing, process settings, one-line errors.

A script describes its flags as a frozen dataclass (nested dataclasses become ``--optim.lr``
style flags, hyphenated) and hands it to :func:`run` with its main function::

    def main(args: Args) -> list[dict]: ...

    if __name__ == "__main__":
        cli.run(main, Args, default=defaults)

:func:`run` parses the command line with tyro (every value, and every dataclass's own
validation, is checked before the main function starts: before any data is loaded or any
program compiled), calls :func:`pimjax.runtime.configure` once, then runs the main function.
A user error prints one line, ``error: ...``, on stderr and exits with status 2 (bad input:
a bad flag, ValueError, FileNotFoundError, a damaged checkpoint) or 1 (a run directory in
use, a diverged training), with no traceback. Every script also takes

* ``--debug`` (or ``PIMJAX_DEBUG=1``): show the traceback instead;
* ``--no-compile-cache`` (or ``PIMJAX_COMPILE_CACHE=0``): no persistent compilation cache;
* ``--coordinator HOST:PORT --num-processes N --process-id I`` (:class:`Processes`): run as
  process I of a multi-process run (see ``docs/distributed.md``). Without them, JAX's
  auto-detection (SLURM, Open MPI, Cloud TPU) or one process. They are validated with the
  other flags; :func:`run` then calls :func:`pimjax.distributed.initialize` before any JAX
  computation, and ends a multi-process run's failed process with
  :func:`pimjax.distributed.exit_now`, so that the others stop within the heartbeat timeout.

``default`` may be a function of the raw arguments, so that one flag can choose the other
flags' defaults (``--setup vgg11`` the paper's epochs and chips, ``--smoke`` tiny sizes):
flags given explicitly always win over such defaults.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import sys
import typing
import warnings
from collections.abc import Callable, Sequence
from typing import Annotated, Generic, TypeVar

import tyro

from pimjax import distributed, runtime
from pimjax.checkpoint import CheckpointError
from pimjax.files import RunLockedError

T = TypeVar("T")
R = TypeVar("R")

BAD_INPUT = (ValueError, FileNotFoundError)  # exit status 2 (CheckpointError is a ValueError)
BAD_INPUT_STATUS = 2
FAILURE_STATUS = 1
DEBUG_ENV = "PIMJAX_DEBUG"
_FLATTENED = tyro.conf.arg(name="")  # a nested dataclass whose flags carry no prefix


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions reported as one line (imported lazily: pimjax.train pulls in JAX)."""
    from pimjax.train import TrainingDivergedError

    return (*BAD_INPUT, CheckpointError, RunLockedError, TrainingDivergedError)


@dataclasses.dataclass(frozen=True)
class Processes:
    """How this process joins a multi-process run (all three flags, or none: auto-detection)."""

    coordinator: str | None = None
    """HOST:PORT of process 0, where the run's processes meet (multi-process runs)"""
    num_processes: int | None = None
    """processes of the run (with --coordinator and --process-id)"""
    process_id: int | None = None
    """this process's index, 0..N-1 (with --coordinator and --num-processes)"""
    heartbeat_timeout: int = distributed.HEARTBEAT_TIMEOUT
    """seconds after which a silent process is declared dead and the run stops"""

    def __post_init__(self):
        distributed.check_settings(self.coordinator, self.num_processes, self.process_id)
        if isinstance(self.heartbeat_timeout, bool) or self.heartbeat_timeout < 1:
            raise ValueError(f"--heartbeat-timeout={self.heartbeat_timeout} must be an integer "
                             ">= 1 (seconds)")

    def initialize(self) -> None:
        """Join the run and open its connections (:func:`pimjax.distributed.initialize`,
        :func:`pimjax.distributed.connect`); one process: nothing."""
        distributed.initialize(self.coordinator, self.num_processes, self.process_id,
                               heartbeat_timeout=self.heartbeat_timeout)
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
        description: str | None = None, prog: str | None = None) -> R:
    """Parse the flags, configure the process, run ``main(args)``; report user errors in one line.

    Returns what ``main`` returns. Warnings print as ``warning: ...`` lines. In a
    multi-process run, a process whose ``main`` fails (any exception) reports it and ends at
    once (:func:`pimjax.distributed.exit_now`); the others then stop within the heartbeat
    timeout, most at once with their next collective's error.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = has_flag(argv, "--debug") or os.environ.get(DEBUG_ENV, "0") not in ("", "0")
    errors = user_errors()
    with warnings.catch_warnings():
        if not debug:
            warnings.showwarning = _show_warning
        try:
            command = parse(cls, argv, default=default, description=description, prog=prog)
            runtime.configure(compile_cache=command.compile_cache)
            command.processes.initialize()
            return main(command.args)
        except Exception as e:
            status = BAD_INPUT_STATUS if isinstance(e, BAD_INPUT) else FAILURE_STATUS
            if jax_distributed():  # any failure must end this process now
                _fail_process(e, debug or not isinstance(e, errors), status)
            if debug or not isinstance(e, errors):
                raise
            fail(one_line(e), status)


def jax_distributed() -> bool:
    """Whether this process is part of a multi-process run (jax.distributed started)."""
    import jax

    return jax.distributed.is_initialized()


def _fail_process(error: BaseException, traceback: bool, status: int) -> typing.NoReturn:
    """Report the failure of one process of a multi-process run and end it at once."""
    import traceback as tb

    import jax

    if traceback:
        tb.print_exception(error, file=sys.stderr)
    print(f"error: process {jax.process_index()} of {jax.process_count()}: {one_line(error)}",
          file=sys.stderr, flush=True)
    distributed.exit_now(status)


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
