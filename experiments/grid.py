"""A claim experiment's grid as independent cells, spread over separate jobs by ``--shard``.

Every job plans the same list of cells: the trainings first (a cell is a run folder,
finished when it holds ``done.json``), then the evaluations (a cell is one JSON file,
written atomically, holding the cell's spec and its table row; a file with another spec is
stale and computed again). Shard ``I`` of ``N`` (``--shard I/N``) computes the unfinished
cells ``i`` with ``i % N == I``. An evaluation whose model is not trained yet trains it, or,
when another job holds that run's lock, waits for it and reuses it, so no model is trained
twice. The tables are built from the evaluation files in plan order, so they are the same
whatever the sharding: by the shard that finishes last (it finds every evaluation's file),
or by a later run with ``--merge``. A killed shard is rerun alone; finished cells are reused.

A multi-process run (``--coordinator/--num-processes/--process-id``, or auto-detection)
computes each cell with all its processes together (trainings data-parallel, chips split
over every device); process 0 writes the files. Shards and processes combine: each shard
may itself be a multi-process run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from pimjax import cli, files


@dataclasses.dataclass(frozen=True)
class Cell:
    """One independent job of a grid: a training or an evaluation."""

    name: str
    path: Path
    """the file whose presence says the cell is finished (an evaluation's row file, or a
    training run's done.json)"""
    compute: Callable[[], dict | None]
    """computes the cell: an evaluation returns its row (stored at ``path``), a training
    writes its ``done.json`` itself"""
    spec: dict | None = None
    """an evaluation's settings, stored with its row (None: a training)"""


def cell_path(directory: Path, label: str, spec: dict) -> Path:
    """``<directory>/<label>_<hash of spec>.json``: one file per distinct evaluation."""
    text = json.dumps(files.jsonable(spec), sort_keys=True)
    return Path(directory) / f"{label}_{hashlib.sha1(text.encode()).hexdigest()[:10]}.json"


def finished(cell: Cell) -> bool:
    """Whether the cell's file exists (and, for an evaluation, holds its spec)."""
    if not cell.path.is_file():
        return False
    if cell.spec is None:
        return True
    try:
        return json.loads(cell.path.read_text()).get("spec") == files.jsonable(cell.spec)
    except (OSError, ValueError):  # unreadable: computed again
        return False


def rows(cells: list[Cell]) -> list[dict]:
    """The evaluation rows in plan order; ValueError naming the missing ones."""
    evals = [c for c in cells if c.spec is not None]
    missing = [c.name for c in evals if not finished(c)]
    if missing:
        raise ValueError(f"{len(missing)} of {len(evals)} evaluations are not computed yet "
                         f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): run "
                         "the shards that compute them (--shard I/N), then --merge")
    return [stored_row(c) for c in evals]


def stored_row(cell: Cell) -> dict:
    """The row a finished evaluation ``cell`` stored."""
    return json.loads(cell.path.read_text())["row"]


def store_row(cell: Cell, row: dict) -> None:
    """Keep an evaluation ``cell``'s ``row`` with its spec (atomically), finishing the cell."""
    files.write_json(cell.path, {"spec": cell.spec, "row": row})


def interrupted(args) -> str:
    """What a Ctrl-C leaves of a claim script's grid (``args.output.out``), and how to
    continue."""
    return (f"{args.output.out or 'the output folder'} keeps every finished training and "
            "evaluation: rerun the same command to continue")


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"I/N"`` as ``(I, N)`` (None: no shard); ValueError naming ``--shard``."""
    if text is None:
        return None
    try:
        index, count = (int(p) for p in str(text).split("/"))
    except ValueError:
        raise ValueError(f"--shard={text!r} is not I/N: e.g. --shard 0/4 computes the cells "
                         "0, 4, 8, ... of the grid") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard={text} needs N >= 1 and 0 <= I < N")
    return index, count


def lock_name(shard: tuple[int, int] | None) -> str | None:
    """The name of the run lock a shard ``(I, N)`` holds on the output folder (None: the
    folder's own lock, for the whole grid)."""
    index, count = shard or (0, 1)
    return None if count == 1 else f"shard-{index}-of-{count}"


def lock_early(argv: list[str]) -> None:
    """:func:`pimjax.cli.lock_early` for a claim script: its --out, its shard's lock; nothing
    for --merge and --dry-run, which take no lock, or a bad --shard (parsing reports it)."""
    if cli.has_flag(argv, "--merge") or cli.has_flag(argv, "--dry-run"):
        return
    try:
        name = lock_name(parse_shard(cli.flag_value(argv, "--shard")))
    except ValueError:
        return
    cli.lock_early(argv, name=name)


def run(cells: list[Cell], out: Path, merge: Callable[[list[dict]], object], *,
        shard: tuple[int, int] | None = None, merge_only: bool = False,
        progress: bool = True):
    """Compute shard ``(I, N)`` of ``cells`` (default: all); build the tables
    (``merge(rows)``, process 0 only) once every evaluation is done.

    Returns what ``merge`` returns, or None where no tables are built.
    """
    from pimjax import distributed  # (imports JAX: not at import, see lock_early)

    if merge_only:
        return merge(rows(cells)) if distributed.is_primary() else None
    index, count = shard or (0, 1)
    primary = distributed.is_primary()
    with distributed.shared_run_lock(out, lock_name(shard)):
        for i, cell in enumerate(cells):
            # process 0's view of the files decides for every process (they compute together)
            if i % count != index or distributed.agree(finished(cell)):
                continue
            if progress and count > 1 and primary:
                print(f"[shard {index}/{count}] cell {i + 1} of {len(cells)}: {cell.name}",
                      flush=True)
            row = cell.compute()
            if cell.spec is not None and primary:
                store_row(cell, row)
        if not primary:
            return None
        missing = [c for c in cells if c.spec is not None and not finished(c)]
        if missing:
            print(f"shard {index}/{count} done; {len(missing)} evaluation(s) of other shards "
                  "are not: the last shard to finish writes the tables (or rerun with --merge "
                  "once all are done)", flush=True)
            return None
        return merge(rows(cells))
