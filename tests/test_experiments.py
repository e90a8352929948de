"""The experiment scripts, their command line and the notebooks, on tiny data.

Smoke runs of every script (each trains at most a few hundred images for one epoch), flag
errors (one line, exit status 2, raised before any data is loaded or any model trained),
``--smoke`` next to explicit flags, a claim on Fashion-MNIST when the data is there, and the
notebooks executed with their printed numbers checked.
"""

import ast
import importlib
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import execute_notebook

import pimjax.data
from pimjax import cli, files
from pimjax.configs import claims, montecarlo, quickstart, setups

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

common = importlib.import_module("common")
claim1 = importlib.import_module("claim1_training")
claim2 = importlib.import_module("claim2_between")
claim3 = importlib.import_module("claim3_selftune")
quickstart_script = importlib.import_module("quickstart")
train_script = importlib.import_module("train")
montecarlo_script = importlib.import_module("montecarlo")

# The scripts' smoke runs make no bit-identity claim against another XLA level: they, their
# subprocesses (_shared_cache_env) and the notebook kernels compile with most optimizations off.
pytestmark = [pytest.mark.xla_level("fast"), pytest.mark.usefixtures("script_settings")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One folder of trained smoke models shared by the claim scripts (each trained once)."""
    return tmp_path_factory.mktemp("runs")


def _rows(path: Path) -> list[dict]:
    return json.loads(path.read_text())["rows"]


def _no_work(monkeypatch):
    """Make loading data, a checkpoint, or training fail loudly (not as a user error)."""
    def boom(*args, **kwargs):
        raise AssertionError("work started before the flags were validated")

    monkeypatch.setattr(pimjax.data, "load_dataset", boom)
    monkeypatch.setattr(common, "train", boom)
    monkeypatch.setattr(train_script, "train", boom)
    monkeypatch.setattr(montecarlo_script, "load_model", boom)


# ----------------------------------------------------------------------- tables and plans


def test_claim1_tables_gain_over_best_alternative():
    config = claims.claim1(smoke=True)
    base = dict(bits=2, act_bits=4)
    rows = [
        dict(base, method="qat", train_sigma=0.0, eval_sigma=0.0, mean=0.9, p5=0.9),
        dict(base, method="qat", train_sigma=0.0, eval_sigma=0.2, mean=0.5, p5=0.4),
        dict(base, method="ptq", train_sigma=0.2, eval_sigma=0.2, mean=0.6, p5=0.5),
        dict(base, method="ptq", train_sigma=0.2, eval_sigma=0.0, mean=0.8, p5=0.8),
        dict(base, method="qavat", train_sigma=0.2, eval_sigma=0.2, mean=0.7, p5=0.65),
        dict(base, method="qavat", train_sigma=0.2, eval_sigma=0.0, mean=0.85, p5=0.85),
    ]
    tabs = claim1.tables(config, rows)
    assert tabs["mean"][(2, 0.2)] == pytest.approx({"qat": 0.5, "ptq": 0.6, "qavat": 0.7,
                                                    "gain": 0.1})
    assert tabs["p5"][(2, 0.2)]["gain"] == pytest.approx(0.15)
    # at sigma 0 qavat is the qat model; ptq has no run trained at sigma 0 here
    assert tabs["mean"][(2, 0.0)] == pytest.approx({"qat": 0.9, "qavat": 0.9, "gain": 0.0})
    assert "gain" in claim1.format_tables(config, tabs)


def test_between_table_columns():
    row = {"granularity": "layer", "between_fraction": 0.5, "self_tune": "channel",
           "nominal": 0.958, "mean": 0.9558, "p5": 0.95, "drop_mean": 0.0022, "drop_p5": 0.008,
           "calib_cost": "channel: 256 images"}
    head, rule, line = common.format_between([row]).splitlines()
    assert line.split() == ["layer", "0.50", "channel", "95.80", "95.58", "-", "95.00", "0.22",
                            "0.80", "-", "-", "-", "channel:", "256", "images"]
    assert head.split()[:3] == ["gran", "between", "self-tune"] and set(rule) == {"-"}


def _committed_columns(claim: str) -> set[str]:
    """The columns of a committed claim table (results/<claim>/lenet5/<claim>.json)."""
    return set(_rows(ROOT / "results" / claim / "lenet5" / f"{claim}.json")[0])


def test_claim1_plan_shares_qat_and_float_runs():
    config = claims.Claim1(bits=(1, 2), sigmas=(0.0, 0.3))
    plan = claim1.plan_runs(config)
    names = [(r.method, r.bits, r.train_sigma) for r in plan]
    assert names.count(("qat", 1, 0.0)) == 1 and ("qavat", 1, 0.0) not in names
    assert {("ptq", b, s) for b in (1, 2) for s in (0.0, 0.3)} <= set(names)
    sources = {common.run_name(r.source) for r in plan if r.method == "ptq"}
    assert len(sources) == 2  # one float model per sigma (fp at 0, vat at 0.3), shared by bits
    assert all("_mnist_" in s for s in sources)


def test_run_names_tell_datasets_apart():
    mnist = claims.claim2(smoke=True)
    fashion = claims.Between(**{**vars(mnist), "dataset": "fashion_mnist"})
    a, b = (common.run_name(c.train_config("qavat", "W2A4", 0.2)) for c in (mnist, fashion))
    assert a != b and "fashion_mnist" in b
    out, runs_dir = common.claim_out("claim2", fashion, common.Output())
    assert out == Path("runs/smoke/claim2/lenet5-fashion_mnist") and runs_dir == out / "runs"
    assert common.claim_out("claim2", claims.claim2(), common.Output())[0] == Path(
        "results/claim2/lenet5")


def test_calibration_images_are_the_first_training_images():
    images = common.calibration_images("mnist", 16, None)
    first = pimjax.data.load_dataset("mnist", "train", limit=16)
    np.testing.assert_array_equal(images, np.asarray(pimjax.data.normalize(first.images, "mnist")))


def test_limit_above_the_split_warns_and_uses_the_split():
    with pytest.warns(UserWarning, match="has 10000: using 10000"):
        test = common.load_split("mnist", "test", None, 12000)
    assert len(test) == 10000


# ------------------------------------------------------------------------ command line


def test_flag_value_and_has_flag():
    argv = ["--setup", "vgg11", "--smoke", "--out=x", "--", "--setup", "lenet5"]
    assert cli.flag_value(argv, "--setup") == "vgg11" and cli.flag_value(argv, "--out") == "x"
    assert cli.has_flag(argv, "--smoke") and not cli.has_flag(argv, "--debug")
    assert cli.flag_value(["--setup"], "--setup") is None


BAD_FLAGS = [
    (claim1, ["--chips", "0"], "--chips=0 must be an integer >= 1"),
    (claim1, ["--bits", "9"], "--bits=9 is not a valid bitwidth"),
    (claim1, ["--methods", "foo"], "invalid choice 'foo'"),
    (claim1, ["--setup", "alexnet"], "setup='alexnet' is unknown"),
    (claim1, ["--epochs", "x"], "--epochs"),
    (claim2, ["--granularities", "wafer"], "invalid choice 'wafer'"),
    (claim2, ["--dataset", "cifar10"], "use one of ['mnist', 'fashion_mnist']"),
    (claim2, ["--fractions", "1.5"], "--fractions has [1.5]"),
    (claim2, ["--smoke", "--train-images", "16"], "below --batch-size 32"),
    (claim3, ["--tunes", "magic"], "invalid choice 'magic'"),
    (claim3, ["--calib-images", "0"], "--calib-images=0"),
    (quickstart_script, ["--chips", "0"], "--chips=0"),
    (quickstart_script, ["--sigma-within", "0"], "--sigma-within must be > 0"),
    (quickstart_script, ["--sigma-between", "0"], "--sigma-between must be > 0"),
    (montecarlo_script, ["--checkpoint", "nowhere", "--sigma-within", "-0.1"],
     "--sigma-within has -0.1"),
    (montecarlo_script, [], "missing required flag(s): --checkpoint"),
    (train_script, ["--out", "x", "--train-method", "qat"], "trains a quantized model"),
    (train_script, ["--out", "x", "--stop-after", "0"], "--stop-after=0"),
    (train_script, ["--out", "x", "--data.train-images", "100"], "below --optim.batch-size"),
    (train_script, ["--out", "x", "--quant.weight-bits", "9"], "--quant: weight_bits=9"),
    (train_script, ["--out", "x", "--num-processes", "2"], "--coordinator, --process-id missing"),
    (montecarlo_script, ["--checkpoint", "x", "--coordinator", "h:1", "--num-processes", "2",
                         "--process-id", "2"], "--process-id=2 is out of range"),
    (claim2, ["--coordinator", "h", "--num-processes", "2", "--process-id", "0"],
     "is not HOST:PORT"),
    (claim1, ["--heartbeat-timeout", "0"], "--heartbeat-timeout=0"),
    (claim1, ["--shard", "2/2"], "--shard=2/2 needs"),
    (claim3, ["--shard", "half"], "--shard='half' is not I/N"),
    (claim2, ["--merge", "--shard", "0/2"], "--merge with --shard"),
]


@pytest.mark.parametrize(("script", "argv", "message"), BAD_FLAGS,
                         ids=[f"{s.__name__}{' '.join(a)}" for s, a, _ in BAD_FLAGS])
def test_bad_flags_fail_in_one_line_before_any_work(script, argv, message, tmp_path,
                                                    monkeypatch, capsys):
    _no_work(monkeypatch)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    extra = [] if script in (montecarlo_script, train_script) else ["--out", str(out)]
    with pytest.raises(SystemExit) as e:
        script.main([*argv, *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not any(tmp_path.rglob("*")), "a bad flag left files behind"


def test_a_bad_flag_exits_2_in_one_line_and_debug_shows_the_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PIMJAX_COMPILE_CACHE": "0"}
    env.pop("PIMJAX_DEBUG", None)
    cmd = [sys.executable, str(ROOT / "experiments/claim2_between.py"), "--chips", "0", "--out",
           str(tmp_path / "out")]
    # the timeout only guards against a hang: validation fails before any data or compile
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == "error: --chips=0 must be an integer >= 1\n"
    assert not (tmp_path / "out").exists()
    debug = subprocess.run(cmd, env={**env, "PIMJAX_DEBUG": "1"}, capture_output=True,
                           text=True, timeout=120)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    assert debug.stderr.strip().endswith("ValueError: --chips=0 must be an integer >= 1")


def test_a_locked_output_folder_is_refused(tmp_path, monkeypatch, capsys):
    _no_work(monkeypatch)
    held, release = threading.Event(), threading.Event()

    def other_run():  # a lock held by another thread counts as another run
        with files.run_lock(tmp_path):
            held.set()
            release.wait(60)

    holder = threading.Thread(target=other_run)
    holder.start()
    held.wait(60)
    try:
        with pytest.raises(SystemExit) as e:
            claim2.main(["--smoke", "--out", str(tmp_path)])
    finally:
        release.set()
        holder.join()
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "in use by another run" in err[0]


def test_paper_size_dry_run_prints_the_estimate_without_loading_data(monkeypatch, capsys):
    _no_work(monkeypatch)
    assert claim1.main(["--setup", "vgg11", "--dry-run"]) is None
    out = capsys.readouterr().out
    assert "1000 chips x 10000 test images, A8" in out and "100 epoch(s) x 50000 images" in out
    # the tables' cells only: qat at 6 sigmas, ptq at 6, qavat at 5, for 4 bit widths
    assert "68 evaluations (each ptq/qavat model at its training sigma" in out
    assert re.search(r"estimated run time: [\d.]+ (s|min|h|days) \([\d.]+ (s|min|h|days) "
                     r"for 30 training", out)


def _parse(script, argv, default):
    return cli.parse(script.Args, argv, default=default).args


def test_smoke_changes_only_the_defaults_of_flags_not_given():
    c = _parse(claim1, ["--smoke", "--chips", "7", "--bits", "3"],
               common.claim_defaults(claim1.Args, claims.claim1)).claim
    smoke = claims.claim1(smoke=True)
    assert (c.chips, c.bits, c.epochs, c.test_images, c.sigmas) == (
        7, (3,), smoke.epochs, smoke.test_images, smoke.sigmas)
    c = _parse(claim3, ["--smoke", "--tunes", "none", "gain"],
               common.claim_defaults(claim3.Args, claims.claim3)).claim
    assert c.tunes == ("none", "gain") and c.calib_images == claims.claim3(smoke=True).calib_images
    c = _parse(claim2, ["--setup", "vgg11", "--epochs", "2"],
               common.claim_defaults(claim2.Args, claims.claim2)).claim
    assert (c.epochs, c.chips, c.test_images) == (2, 1000, None)  # the paper's sizes
    q = cli.parse(quickstart_script.Args, ["--smoke", "--chips", "5"], default=lambda a: (
        quickstart_script.Args(quickstart.quickstart(cli.has_flag(a, "--smoke"))))).args
    assert (q.quickstart.chips, q.quickstart.epochs) == (5, quickstart.quickstart(True).epochs)
    t = cli.parse(train_script.Args, ["--smoke", "--out", "x", "--optim.epochs", "3"],
                  default=train_script.defaults).args
    assert (t.config.optim.epochs, t.config.data.train_images) == (3, 256) and t.smoke


def test_montecarlo_defaults_are_untuned_and_within_only():
    m = montecarlo.montecarlo()
    assert m.tune == ("none",) and m.sigma_between == (0.0,) and not m.tunes_chips
    assert [s.variability.is_nominal for s in m.settings()] == [True, False, False]


def test_setups_are_valid_and_the_paper_sizes_are_marked():
    for name in setups.SETUP_NAMES:
        s = setups.get(name)
        config = s.train_config("qavat", "W2A4", 0.3)
        assert config.model.input_shape == pimjax.data.info(s.dataset).image_shape
        assert s.paper_size == (name in ("vgg11", "resnet18-cifar100"))
    assert setups.get("resnet18-cifar100").chips == 1000


# ------------------------------------------------------------------------- smoke runs


def test_claim2_smoke(runs, tmp_path, capsys):
    rows = claim2.main(["--smoke", "--out", str(tmp_path), "--runs", str(runs)])
    assert rows == _rows(tmp_path / "claim2.json")
    assert _committed_columns("claim2") <= set(rows[0])  # the committed tables stay readable
    assert [(r["granularity"], r["between_fraction"]) for r in rows] == [("layer", 0.0),
                                                                         ("layer", 1.0)]
    for r in rows:
        assert 0 <= r["p5"] <= r["mean"] <= 1 and r["chips"] == 4 and r["test_images"] == 64
        assert r["drop_mean"] == pytest.approx(r["nominal"] - r["mean"])
        assert r["dataset"] == "mnist" and r["train_images"] == 256
    assert rows[0]["sigma_between"] == 0 and rows[1]["sigma_within"] == 0
    for name in ("claim2.csv", "claim2.png", "claim2_table.txt"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / files.LOCK_FILE).read_text() == ""  # released
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes left no temporary file
    assert "between" in capsys.readouterr().out


def test_claim3_smoke_reuses_the_model(runs, tmp_path):
    before = sorted(p.name for p in runs.iterdir())
    rows = claim3.main(["--smoke", "--out", str(tmp_path), "--runs", str(runs)])
    assert sorted(p.name for p in runs.iterdir()) == before  # the claim-2 model, reused
    assert {r["self_tune"] for r in rows} == {"none", "channel", "bn"}
    assert _committed_columns("claim3") <= set(rows[0])
    for r in rows:
        assert (r["calib_images"] == 64) == (r["self_tune"] != "none")
    assert (tmp_path / "claim3.png").exists()


def test_smoke_with_explicit_flags_and_a_test_limit_above_the_split(runs, tmp_path, capsys):
    rows = claim2.main(["--smoke", "--chips", "2", "--fractions", "0.5", "--test-images",
                        "12000", "--out", str(tmp_path), "--runs", str(runs)])
    assert [(r["between_fraction"], r["chips"]) for r in rows] == [(0.5, 2)]
    assert rows[0]["test_images"] == 10000  # the real count, not the one asked for
    assert rows[0]["train_images"] == 256  # the smoke default, since not given
    assert "warning: 12000 test images asked for" in capsys.readouterr().err


def test_claim1_smoke_qat_qavat_and_resume(runs, tmp_path):
    rows, _ = claim1.main(["--smoke", "--methods", "qat", "qavat", "--out", str(tmp_path),
                           "--runs", str(runs)])
    assert {(r["method"], r["eval_sigma"]) for r in rows} == {
        (m, s) for m in ("qat", "qavat") for s in (0.0, 0.2)}
    assert all(r["chips"] == (1 if r["eval_sigma"] == 0 else 4) for r in rows)
    assert _committed_columns("claim1") <= set(rows[0])
    assert "gain" in (tmp_path / "claim1_tables.txt").read_text()
    # a second call reuses the runs and the cached evaluations
    evals = sorted(p.name for p in (tmp_path / "evals").iterdir())
    trained = sorted(p.name for p in runs.iterdir())
    claim1.main(["--smoke", "--methods", "qat", "qavat", "--out", str(tmp_path), "--runs",
                 str(runs)])
    assert _rows(tmp_path / "claim1.json") == rows
    assert sorted(p.name for p in (tmp_path / "evals").iterdir()) == evals
    assert sorted(p.name for p in runs.iterdir()) == trained


def _shared_cache_env(tmp_path) -> dict:
    """Environment of a script subprocess: this checkout, and this session's compile cache."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
    env.pop("PIMJAX_COMPILE_CACHE", None)
    cache = jax.config.jax_compilation_cache_dir
    if cache:
        (tmp_path / "cache").mkdir(exist_ok=True)
        link = tmp_path / "cache" / "jax-compile"
        if not link.exists():
            link.symlink_to(cache)
        env["PIMJAX_CACHE_DIR"] = str(tmp_path / "cache")
    return env


def test_claim1_shards_and_merge_equal_the_unsharded_table(runs, tmp_path):
    argv = ["--smoke", "--methods", "qat", "qavat"]
    rows, _ = claim1.main([*argv, "--out", str(tmp_path / "whole"), "--runs", str(runs)])
    out = tmp_path / "sharded"  # its own runs folder: the shards train the models too
    cmd = [sys.executable, str(ROOT / "experiments/claim1_training.py"), *argv, "--out", str(out)]
    env = _shared_cache_env(tmp_path)
    shards = [subprocess.Popen([*cmd, "--shard", f"{i}/2"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
    try:  # two jobs at once: cells 0, 2, 4 and 1, 3, 5 (a training and two evaluations each)
        logs = [p.communicate(timeout=600)[0] for p in shards]  # a hang fails
    finally:
        for p in shards:
            p.kill()
    assert [p.returncode for p in shards] == [0, 0], logs
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(
        p.name for p in runs.iterdir() if p.name in {r["run"] for r in rows})
    merged, _ = claim1.main([*argv, "--out", str(out), "--merge"])
    assert merged == rows  # the same bits, whichever job computed a cell
    assert (out / "claim1_tables.txt").read_text() == (
        tmp_path / "whole" / "claim1_tables.txt").read_text()
    # a lost evaluation is computed again by its shard alone; the other cells are reused
    cells = sorted((out / "evals").iterdir())
    before = {p.name: p.stat().st_mtime_ns for p in cells}
    lost = cells[0]
    kept = lost.read_text()
    lost.unlink()
    with pytest.raises(SystemExit) as e:  # --merge refuses an incomplete grid
        claim1.main([*argv, "--out", str(out), "--merge"])
    assert e.value.code == 2
    config = _parse(claim1, argv, common.claim_defaults(claim1.Args, claims.claim1)).claim
    plan = [c.path for c in claim1.plan_cells(config, out, out / "runs")]
    shard = f"{plan.index(lost) % 2}/2"  # the shard that owns the lost cell
    merged, _ = claim1.main([*argv, "--out", str(out), "--shard", shard])  # and merges
    assert merged == rows and lost.read_text() == kept
    assert all(p.stat().st_mtime_ns == before[p.name] for p in cells if p != lost)


@pytest.mark.slow
def test_claim1_smoke_all_methods(runs, tmp_path):
    rows, _ = claim1.main(["--smoke", "--out", str(tmp_path), "--runs", str(runs)])
    assert {r["method"] for r in rows} == {"qat", "ptq", "qavat"}
    assert (tmp_path / "claim1.png").exists()


def test_claim2_on_fashion_mnist(runs, tmp_path, monkeypatch):
    monkeypatch.setenv("PIMJAX_OFFLINE", "1")  # look for local files only
    if not os.environ.get("PIMJAX_DATA_DIR"):
        pytest.skip("PIMJAX_DATA_DIR is not set: no Fashion-MNIST to test on")
    try:
        pimjax.data.load_dataset("fashion_mnist", "test", limit=1)
    except (FileNotFoundError, ValueError) as e:
        pytest.skip(f"PIMJAX_DATA_DIR holds no Fashion-MNIST ({e})")
    rows = claim2.main(["--smoke", "--dataset", "fashion_mnist", "--out", str(tmp_path),
                        "--runs", str(runs)])
    assert {r["dataset"] for r in rows} == {"fashion_mnist"}
    assert all("_fashion_mnist_" in r["run"] for r in rows)
    assert (runs / rows[0]["run"] / "done.json").exists()
    assert json.loads((tmp_path / "claim2.json").read_text())["meta"]["args"]["dataset"] == (
        "fashion_mnist")


def test_quickstart_smoke(tmp_path, capsys):
    rows, found = quickstart_script.main(["--smoke", "--out", str(tmp_path)])
    keys = [(r["method"], r["chips_kind"], r["self_tune"]) for r in rows]
    assert keys == [("qat", "within", "none"), ("ptq", "within", "none"),
                    ("qavat", "within", "none"), ("qavat", "+between", "none"),
                    ("qavat", "+between", "channel")]
    for r in rows:
        assert r["chips"] == 4 and 0 <= r["min"] <= r["p5"] <= r["mean"] <= 1
        assert r["test_images"] == 64 and 0 < r["se"] < 0.5
        assert r["drop_mean"] == pytest.approx(r["nominal"] - r["mean"])
        assert r["sigma_between"] == (0.3 if r["chips_kind"] == "+between" else 0.0)
    assert rows[2]["nominal"] == rows[3]["nominal"] == rows[4]["nominal"]  # one qavat model
    tuned = rows[4]
    assert tuned["drop_mean_tuned"] == pytest.approx(tuned["nominal_tuned"] - tuned["mean"])
    assert all(r["nominal_tuned"] is None and r["drop_mean_tuned"] is None for r in rows[:4])
    # each claim's margin: a paired difference of two rows' means, with its standard error
    mean = dict(zip(keys, (r["mean"] for r in rows), strict=True))
    pairs = [(keys[2], keys[0]), (keys[2], keys[1]), (keys[2], keys[3]), (keys[4], keys[3]),
             (keys[4], keys[2])]
    assert [c["claim"] for c in found] == ["1", "1", "2", "3", "3"]
    for c, (a, b) in zip(found, pairs, strict=True):
        assert c["margin"] == pytest.approx(mean[a] - mean[b])
        assert c["se"] > 0 and c["z"] == pytest.approx(c["margin"] / c["se"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == rows and saved["meta"]["claims"] == found
    assert (tmp_path / "results.csv").exists() and (tmp_path / "quickstart.png").exists()
    out = capsys.readouterr().out
    for c in found:  # every margin is printed with its standard error
        assert f"claim {c['claim']}: {c['what']}: {100 * c['margin']:+.2f} ± " \
            f"{100 * c['se']:.2f}" in out
    assert "self-tuning cost per chip: channel: 64 unlabeled images" in out
    head = next(line for line in out.splitlines() if line.startswith("method"))
    assert head.split() == ["method", "chips", "self-tune", "nominal", "mean", "se", "p5", "min",
                            "drop", "drop", "t"]


def test_train_then_montecarlo_scripts(tmp_path):
    run = tmp_path / "run"
    summary = train_script.main(["--smoke", "--out", str(run), "--train-method", "qavat",
                                 "--quant.weight-bits", "2", "--quant.act-bits", "4",
                                 "--device.sigma-within", "0.2", "--no-progress"])
    assert summary["train_images"] == 256 and summary["epoch"] == 1
    assert (run / "checkpoints").is_dir() and (run / "metrics.csv").exists()

    rows = montecarlo_script.main(["--smoke", "--checkpoint", str(run), "--no-progress"])
    # the defaults: no between-chip variation, untuned only, the nominal model once at 0
    assert [(r["sigma_within"], r["sigma_between"], r["tune"], r["chips"]) for r in rows] == [
        (0.0, 0.0, "none", 1), (0.2, 0.0, "none", 4)]
    assert rows[0]["mean"] == rows[0]["nominal"] == rows[1]["nominal"]

    out = tmp_path / "mc"
    rows = montecarlo_script.main(["--smoke", "--checkpoint", str(run), "--out", str(out),
                                   "--tune", "none", "channel", "--no-progress"])
    assert [(r["sigma_within"], r["tune"], r["chips"], r["calib_images"]) for r in rows] == [
        (0.0, "none", 1, 0), (0.2, "none", 4, 0), (0.2, "channel", 4, 32)]
    assert all(r["images"] == 64 for r in rows)
    meta = json.loads((out / "summary.json").read_text())["meta"]
    assert (meta["dataset"], meta["test_images"], meta["calib_images"]) == ("mnist", 64, 32)
    assert (out / "nominal_stats_mnist_32.npz").exists()
    assert len((out / "chips.csv").read_text().splitlines()) == 1 + 1 + 4 + 4


# --------------------------------------------------------------------------- notebooks


def test_explore_notebook(runs, tmp_path, monkeypatch):
    qavat = sorted(p for p in runs.iterdir() if "_qavat_" in p.name and "_mnist_" in p.name)
    monkeypatch.setenv("PIMJAX_NOTEBOOK_SMOKE", "1")
    if qavat:  # reuse the smoke model trained above, else the notebook trains its own
        monkeypatch.setenv("PIMJAX_NOTEBOOK_RUN", str(qavat[0]))
    texts, nb = execute_notebook(ROOT / "notebooks" / "explore.ipynb", tmp_path, monkeypatch)
    line = next(t for t in texts if t.startswith("SUMMARY "))
    summary = json.loads(line.removeprefix("SUMMARY "))
    assert summary["chips"] == 4 and summary["test_images"] == 64
    assert len(summary["layers"]) == 5  # LeNet-5's analog layers
    errors = summary["std_error"]
    # per-channel self-tuning matches each channel's std: far closer to nominal than untuned
    assert np.mean(errors["+ channel"]) < 0.5 * np.mean(errors["untuned"])
    for res in summary["accuracy"].values():
        assert res["chips"] == 4 and 0 <= res["min"] <= res["mean"] <= 1
    assert summary["accuracy"]["untuned"]["nominal"] == summary["accuracy"]["channel"]["nominal"]
    figures = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
                  for o in c.outputs)
    assert figures >= 5


def test_tour_notebook_is_the_readme_snippet_and_runs(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    tour = nbformat.read(ROOT / "notebooks" / "tour.ipynb", as_version=4)
    code = [c.source for c in tour.cells if c.cell_type == "code"]
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert code[1].strip() in [b.strip() for b in blocks], "README and tour.ipynb differ"
    assert len([line for line in code[1].splitlines() if line.strip()]) <= 15
    texts, _ = execute_notebook(ROOT / "notebooks" / "tour.ipynb", tmp_path, monkeypatch)
    results = {}
    for line in texts[1].splitlines():
        label, _, rest = line.partition(" {")
        if label in ("untuned", "self-tuned"):
            results[label] = ast.literal_eval("{" + rest)
    assert set(results) == {"untuned", "self-tuned"}
    for r in results.values():
        assert r["chips"] == 100 and 0 <= r["min"] <= r["mean"] <= r["nominal"] + 0.05
    # between-chip variation costs accuracy; per-channel self-tuning recovers most of it
    assert results["untuned"]["drop_mean"] > 2 * results["self-tuned"]["drop_mean"]
    assert "LOGITS (8, 32, 10)" in texts[2]
