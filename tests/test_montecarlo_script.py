"""experiments/montecarlo.py keeps its work: finished evaluations survive a stopped sweep and
are reused only for the same settings, the result files are vouched for by a manifest, and
the nominal statistics are written atomically, checked on load and recomputed when damaged.
"""

import csv
import errno
import hashlib
import importlib
import io
import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.experimental import multihost_utils

from pimjax import distributed, files, selftune
from pimjax.configs import montecarlo as presets
from pimjax.train import load_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

common = importlib.import_module("common")
train_script = importlib.import_module("train")
mc = importlib.import_module("montecarlo")

# smoke runs, as in test_experiments.py
pytestmark = [pytest.mark.xla_level("fast"), pytest.mark.usefixtures("script_settings")]

STATS = "nominal_stats_mnist_32.npz"  # the smoke sweep's 32 calibration images


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A smoke qavat run (one epoch on 256 images), trained once for this module."""
    path = tmp_path_factory.mktemp("mc") / "run"
    with pytest.MonkeyPatch.context() as m:
        m.setenv("PIMJAX_COMPILE_CACHE", "0")
        train_script.main(["--smoke", "--out", str(path), "--train-method", "qavat",
                           "--quant.weight-bits", "2", "--quant.act-bits", "4",
                           "--device.sigma-within", "0.2", "--no-progress"])
    return path


def _argv(run: Path, out: Path, *extra: str, sigmas=("0", "0.2", "0.3")) -> list[str]:
    # by default 5 evaluations: the nominal model, then (none, channel) at 0.2 and at 0.3
    return ["--smoke", "--checkpoint", str(run), "--out", str(out), "--sigma-within",
            *sigmas, "--tune", "none", "channel", "--no-progress", *extra]


class _Killed(BaseException):
    """Stands for a kill: nothing of the script handles it."""


def _count_evaluations(monkeypatch, stop_after: int | None = None) -> list:
    """Count common.evaluate's calls; with ``stop_after``, the next one after that many dies."""
    calls, evaluate = [], common.evaluate

    def counted(*args, **kwargs):
        if stop_after is not None and len(calls) == stop_after:
            raise _Killed
        calls.append(args[2].sigma_within)  # the evaluated VariabilityModel
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(common, "evaluate", counted)
    return calls


def _manifest(out: Path) -> dict:
    return json.loads((out / mc.MANIFEST).read_text())


def _rows(out: Path) -> list[dict]:
    """summary.json's rows but their seconds (a reused row keeps its first run's time)."""
    rows = json.loads((out / "summary.json").read_text())["rows"]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def _summary_csv(out: Path) -> list[dict]:
    rows = list(csv.DictReader(io.StringIO((out / "summary.csv").read_text())))
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def _same_results(a: Path, b: Path) -> None:
    assert (a / "chips.csv").read_bytes() == (b / "chips.csv").read_bytes()
    assert _rows(a) == _rows(b)
    assert _summary_csv(a) == _summary_csv(b)


def _complete(out: Path) -> None:
    """The manifest vouches for every result file, by its hash."""
    m = _manifest(out)
    assert m["complete"] and all(e["done"] for e in m["evaluations"])
    assert sorted(m["files"]) == sorted(mc.RESULTS)
    for name, digest in m["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest, name


# -------------------------------------------------------------- item 3: nothing lost


def test_a_stopped_sweep_keeps_its_evaluations_and_a_rerun_reuses_them(run, tmp_path,
                                                                       monkeypatch):
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    with monkeypatch.context() as m:
        calls = _count_evaluations(m)
        mc.main(_argv(run, whole))
        assert len(calls) == 5
    _complete(whole)

    with monkeypatch.context() as m:
        _count_evaluations(m, stop_after=3)
        with pytest.raises(_Killed):
            mc.main(_argv(run, stopped))
    # the three finished evaluations are on disk, and the manifest says which they are
    assert len(list((stopped / mc.EVALS).glob("*.json"))) == 3
    manifest = _manifest(stopped)
    assert not manifest["complete"] and manifest["files"] == {}
    assert [e["done"] for e in manifest["evaluations"]] == [True, True, True, False, False]
    assert [(e["sigma_within"], e["tune"]) for e in manifest["evaluations"]] == [
        (0.0, "none"), (0.2, "none"), (0.2, "channel"), (0.3, "none"), (0.3, "channel")]
    assert not (stopped / "summary.csv").exists() and not (stopped / "chips.csv").exists()

    with monkeypatch.context() as m:
        calls = _count_evaluations(m)
        rows = mc.main(_argv(run, stopped))
        assert calls == [0.3, 0.3]  # only the two evaluations that were not finished
    assert [(r["sigma_within"], r["tune"]) for r in rows] == [
        (0.0, "none"), (0.2, "none"), (0.2, "channel"), (0.3, "none"), (0.3, "channel")]
    _complete(stopped)
    _same_results(whole, stopped)


def test_an_evaluation_is_reused_only_with_the_same_settings(run, tmp_path, monkeypatch):
    out = tmp_path / "mc"
    mc.main(_argv(run, out, sigmas=("0.2",)))  # untuned and channel-tuned at 0.2

    def evaluations(*extra, **patches) -> list:
        with monkeypatch.context() as m:
            for name, value in patches.items():
                m.setattr(mc, name, value)
            calls = _count_evaluations(m)
            mc.main(_argv(run, out, *extra, sigmas=("0.2",)))
        _complete(out)
        return calls

    assert evaluations() == []  # the same sweep: everything reused
    assert evaluations("--calib-images", "16") == [0.2]  # changes the tuned evaluation only
    assert evaluations("--seed", "1") == [0.2, 0.2]  # other chips
    assert evaluations("--chips", "3") == [0.2, 0.2]
    assert evaluations("--test-images", "48") == [0.2, 0.2]

    def retrained(path):  # the same run folder holding other weights
        model, variables, config = load_model(path)
        params = jax.tree.map(lambda p: p * 1.01, variables["params"])
        return model, dict(variables, params=params), config

    assert evaluations(load_model=retrained) == [0.2, 0.2]
    assert evaluations(load_model=retrained) == []


def test_a_failure_while_writing_the_results_leaves_a_manifest_saying_so(run, tmp_path,
                                                                          monkeypatch):
    whole, out = tmp_path / "whole", tmp_path / "mc"
    mc.main(_argv(run, whole))
    write_csv = files.write_csv

    def full_disk(path, rows):
        if Path(path).name == "chips.csv":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return write_csv(path, rows)

    with monkeypatch.context() as m:
        m.setattr(files, "write_csv", full_disk)
        with pytest.raises((OSError, SystemExit)):
            mc.main(_argv(run, out))
    manifest = _manifest(out)
    assert (out / "summary.csv").exists() and not (out / "chips.csv").exists()
    assert not manifest["complete"] and manifest["files"] == {}  # summary.csv is not vouched for
    assert all(e["done"] for e in manifest["evaluations"])

    with monkeypatch.context() as m:
        calls = _count_evaluations(m)
        mc.main(_argv(run, out))
        assert calls == []
    _complete(out)
    _same_results(whole, out)


# --------------------------------------------------------- item 4: nominal statistics


def _stats() -> selftune.NominalStats:
    return selftune.NominalStats(
        mean={"conv1": np.array([0.5, -1.0, 0.0], np.float32), "fc": np.array([2.0], np.float32)},
        var={"conv1": np.array([1.0, 0.25, 0.0], np.float32), "fc": np.array([3.0], np.float32)},
        num_images=7)


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


META = np.frombuffer(b'{"num_images": 7}', np.uint8)
ONE = np.ones(3, np.float32)


def test_saved_stats_round_trip_and_a_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = selftune.save_stats(tmp_path / "stats.npz", _stats())
    loaded = selftune.load_stats(path)
    assert loaded.num_images == 7
    for name in ("conv1", "fc"):
        np.testing.assert_array_equal(loaded.mean[name], _stats().mean[name])
        np.testing.assert_array_equal(loaded.var[name], _stats().var[name])

    def dies_midway(file, **arrays):
        file.write(b"PK\x03\x04 half of a zip")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", dies_midway)
    with pytest.raises(OSError):
        selftune.save_stats(path, selftune.NominalStats(mean={}, var={}, num_images=1))
    monkeypatch.undo()
    assert selftune.load_stats(path).num_images == 7  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["stats.npz"]  # no temporary file left


@pytest.mark.parametrize("damage", [
    "truncated", "empty", "text", "no meta", "no variances", "nan", "negative variance",
    "zero images", "matrix"])
def test_a_damaged_stats_file_raises_a_stats_file_error(tmp_path, damage):
    path = selftune.save_stats(tmp_path / "stats.npz", _stats())
    good = path.read_bytes()
    content = {
        "truncated": good[:len(good) // 2],
        "empty": b"",
        "text": b"not statistics\n",
        "no meta": _npz(**{"mean:a": ONE, "var:a": ONE}),
        "no variances": _npz(**{"mean:a": ONE, "__meta__": META}),
        "nan": _npz(**{"mean:a": ONE * np.nan, "var:a": ONE, "__meta__": META}),
        "negative variance": _npz(**{"mean:a": ONE, "var:a": -ONE, "__meta__": META}),
        "zero images": _npz(**{"mean:a": ONE, "var:a": ONE,
                               "__meta__": np.frombuffer(b'{"num_images": 0}', np.uint8)}),
        "matrix": _npz(**{"mean:a": np.ones((3, 2)), "var:a": np.ones((3, 2)),
                          "__meta__": META}),
    }[damage]
    path.write_bytes(content)
    with pytest.raises(selftune.StatsFileError, match="stats.npz is damaged") as info:
        selftune.load_stats(path)
    assert info.value.path == path


def test_a_damaged_stats_file_is_computed_again_with_a_warning(run, tmp_path, capsys):
    out = tmp_path / "mc"
    argv = _argv(run, out, sigmas=("0.2",))
    want = mc.main(argv)
    good = (out / STATS).read_bytes()
    (out / STATS).write_bytes(good[:len(good) // 3])  # e.g. a disk that filled up
    capsys.readouterr()

    got = mc.main(argv)
    err = capsys.readouterr().err
    assert f"warning: nominal stats file {out / STATS} is damaged" in err
    assert "Traceback" not in err
    assert (out / STATS).read_bytes() == good  # written again, whole
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in got] == [
        {k: v for k, v in r.items() if k != "seconds"} for r in want]


def test_other_processes_get_process_0s_stats_and_never_read_the_file(run, tmp_path,
                                                                      monkeypatch):
    model, variables, _ = load_model(run)
    calib = common.calibration_images("mnist", 32, None)
    args = mc.Args(presets.montecarlo(True), run)
    out = tmp_path / "mc"
    stats = selftune.nominal_stats(model, variables, calib)
    selftune.save_stats(out / STATS, stats)

    sent = []

    def broadcast(tree):  # process 0's tree, as the collective would deliver it
        if not sent:
            sent.append(jax.tree.map(np.asarray, tree))
        return sent[0]

    def boom(*args, **kwargs):
        raise AssertionError("a process other than 0 read, computed or wrote the stats")

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", broadcast)
    got0 = mc.nominal_stats(args, model, variables, calib, out, "mnist")  # process 0 reads
    monkeypatch.setattr(distributed, "is_primary", lambda mesh=None: False)
    for name in ("load_stats", "save_stats", "nominal_stats"):
        monkeypatch.setattr(selftune, name, boom)
    got1 = mc.nominal_stats(args, model, variables, calib, out, "mnist")
    for got in (got0, got1):
        assert got.num_images == 32
        for name in stats.mean:  # the same bits as process 0's file
            np.testing.assert_array_equal(got.mean[name], stats.mean[name])
            np.testing.assert_array_equal(got.var[name], stats.var[name])
