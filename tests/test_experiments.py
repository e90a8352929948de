"""Smoke runs of the claim experiment scripts and the exploration notebook (tiny data)."""

import csv
import importlib
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

common = importlib.import_module("common")
claim1 = importlib.import_module("claim1_training")
claim2 = importlib.import_module("claim2_between")
claim3 = importlib.import_module("claim3_selftune")
quickstart = importlib.import_module("quickstart")
train_script = importlib.import_module("train")
montecarlo_script = importlib.import_module("montecarlo")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One directory of trained smoke models shared by every script (trained once)."""
    return tmp_path_factory.mktemp("runs")


def _rows(path: Path) -> list[dict]:
    return json.loads(path.read_text())["rows"]


def test_claim1_tables_gain_over_best_alternative():
    args = claim1.parse_args(["--smoke", "--out", "unused"])
    base = dict(bits=2, act_bits=4)
    rows = [
        dict(base, method="qat", train_sigma=0.0, eval_sigma=0.0, mean=0.9, p5=0.9),
        dict(base, method="qat", train_sigma=0.0, eval_sigma=0.2, mean=0.5, p5=0.4),
        dict(base, method="ptq", train_sigma=0.2, eval_sigma=0.2, mean=0.6, p5=0.5),
        dict(base, method="ptq", train_sigma=0.2, eval_sigma=0.0, mean=0.8, p5=0.8),
        dict(base, method="qavat", train_sigma=0.2, eval_sigma=0.2, mean=0.7, p5=0.65),
        dict(base, method="qavat", train_sigma=0.2, eval_sigma=0.0, mean=0.85, p5=0.85),
    ]
    tabs = claim1.tables(args, rows)
    cell = tabs["mean"][(2, 0.2)]
    assert cell == pytest.approx({"qat": 0.5, "ptq": 0.6, "qavat": 0.7, "gain": 0.1})
    assert tabs["p5"][(2, 0.2)]["gain"] == pytest.approx(0.15)
    # at sigma 0 qavat is the qat model; ptq has no run trained at sigma 0 here
    assert tabs["mean"][(2, 0.0)] == pytest.approx({"qat": 0.9, "qavat": 0.9, "gain": 0.0})
    assert "gain" in claim1.format_tables(args, tabs)


def test_between_table_columns():
    row = {"granularity": "layer", "between_fraction": 0.5, "self_tune": "channel",
           "nominal": 0.958, "mean": 0.9558, "p5": 0.95, "drop_mean": 0.0022, "drop_p5": 0.008,
           "calib_cost": "channel: 256 images"}
    head, rule, line = common.format_between([row]).splitlines()
    assert line.split() == ["layer", "0.50", "channel", "95.80", "95.58", "95.00", "0.22",
                            "0.80", "channel:", "256", "images"]
    assert head.split()[:3] == ["gran", "between", "self-tune"] and set(rule) == {"-"}


def test_claim1_plan_shares_qat_and_vat_runs():
    args = claim1.parse_args(["--out", "unused", "--bits", "1,2", "--sigmas", "0,0.3"])
    plan = claim1.plan_runs(args)
    names = [(r["method"], r["bits"], r["train_sigma"]) for r in plan]
    assert names.count(("qat", 1, 0.0)) == 1 and ("qavat", 1, 0.0) not in names
    assert {("ptq", b, s) for b in (1, 2) for s in (0.0, 0.3)} <= set(names)
    sources = {common.run_name(r["source"]) for r in plan if r["method"] == "ptq"}
    assert len(sources) == 2  # one float model per sigma (fp at 0, vat at 0.3), shared by bits


@pytest.mark.parametrize("argv", [["--bits", "9"], ["--act-bits", "3"], ["--methods", "foo"]])
def test_claim1_rejects_bad_flags(argv):
    with pytest.raises(SystemExit):
        claim1.parse_args(["--out", "unused", *argv])


def test_between_rejects_bad_flags():
    with pytest.raises(SystemExit):
        claim2.parse_args(["--granularities", "wafer"])
    with pytest.raises(SystemExit):
        claim3.parse_args(["--tunes", "magic"])
    with pytest.raises(ValueError, match="setup"):
        common.check_setup("alexnet")


def test_claim2_smoke(runs, tmp_path, capsys):
    claim2.main(["--smoke", "--out", str(tmp_path), "--runs", str(runs)])
    rows = _rows(tmp_path / "claim2.json")
    assert [(r["granularity"], r["between_fraction"]) for r in rows] == [("layer", 0.0),
                                                                         ("layer", 1.0)]
    for r in rows:
        assert 0 <= r["p5"] <= r["mean"] <= 1 and r["chips"] == 4
        assert r["drop_mean"] == pytest.approx(r["nominal"] - r["mean"])
    assert rows[0]["sigma_between"] == 0 and rows[1]["sigma_within"] == 0
    assert (tmp_path / "claim2.csv").exists() and (tmp_path / "claim2.png").exists()
    assert "between" in capsys.readouterr().out


def test_claim3_smoke_reuses_the_model(runs, tmp_path):
    before = sorted(p.name for p in runs.iterdir())
    claim3.main(["--smoke", "--out", str(tmp_path), "--runs", str(runs)])
    assert sorted(p.name for p in runs.iterdir()) == before  # the claim-2 model, reused
    rows = _rows(tmp_path / "claim3.json")
    assert {r["self_tune"] for r in rows} == {"none", "channel", "bn"}
    for r in rows:
        assert (r["calib_images"] == 64) == (r["self_tune"] != "none")
    assert (tmp_path / "claim3.png").exists()


def test_claim1_smoke_qat_qavat(runs, tmp_path):
    claim1.main(["--smoke", "--methods", "qat,qavat", "--out", str(tmp_path), "--runs",
                 str(runs)])
    rows = _rows(tmp_path / "claim1.json")
    assert {(r["method"], r["eval_sigma"]) for r in rows} == {
        (m, s) for m in ("qat", "qavat") for s in (0.0, 0.2)}
    assert all(r["chips"] == (1 if r["eval_sigma"] == 0 else 4) for r in rows)
    assert "gain" in (tmp_path / "claim1_tables.txt").read_text()
    # a second call reuses the runs and the cached evaluations
    evals = sorted(p.name for p in (tmp_path / "evals").iterdir())
    claim1.main(["--smoke", "--methods", "qat,qavat", "--out", str(tmp_path), "--runs",
                 str(runs)])
    assert _rows(tmp_path / "claim1.json") == rows
    assert sorted(p.name for p in (tmp_path / "evals").iterdir()) == evals


@pytest.mark.slow
def test_claim1_smoke_all_methods(runs, tmp_path):
    claim1.main(["--smoke", "--out", str(tmp_path), "--runs", str(runs)])
    rows = _rows(tmp_path / "claim1.json")
    assert {r["method"] for r in rows} == {"qat", "ptq", "qavat"}
    assert (tmp_path / "claim1.png").exists()


def test_notebook_executes(runs, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    qavat = [p for p in runs.iterdir() if "_qavat_" in p.name]
    env = {"PIMJAX_NOTEBOOK_SMOKE": "1"}
    if qavat:  # reuse the smoke model trained above, else the notebook trains its own
        env["PIMJAX_NOTEBOOK_RUN"] = str(qavat[0])
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        nb = nbformat.read(ROOT / "notebooks" / "explore.ipynb", as_version=4)
        nbclient.NotebookClient(nb, kernel_name="python3", timeout=600,
                                resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.outputs)
    assert "nominal" in text and "channel" in text


def test_quickstart_smoke(tmp_path, capsys):
    quickstart.main(["--smoke", "--out", str(tmp_path)])
    rows = _rows(tmp_path / "results.json")
    assert [(r["method"], r["self_tune"]) for r in rows] == [
        ("qat", "none"), ("qat", "channel"), ("qavat", "none"), ("qavat", "channel")]
    for r in rows:
        assert r["chips"] == 16 and 0 <= r["min"] <= r["p5"] <= r["mean"] <= 1
        assert 0 <= r["sign_flipped_chips"] <= 16
    assert (tmp_path / "results.csv").exists() and (tmp_path / "quickstart.png").exists()
    out = capsys.readouterr().out
    assert "self-tuning cost per chip" in out and "qavat" in out


def test_train_then_montecarlo_scripts(tmp_path):
    run = tmp_path / "run"
    train_script.main(["--model", "lenet5", "--dataset", "mnist", "--quant", "W2A4",
                       "--method", "qavat", "--sigma_within", "0.2", "--epochs", "1",
                       "--limit_train", "256", "--limit_test", "64", "--batch_size", "32",
                       "--out", str(run), "--no_progress"])
    montecarlo_script.main(["--checkpoint", str(run), "--out", str(tmp_path / "mc"),
                            "--chips", "4", "--sigma-within", "0,0.2", "--sigma-between", "0",
                            "--tune", "none,channel", "--calib", "32", "--limit-test", "64",
                            "--no-progress"])
    with open(tmp_path / "mc" / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(float(r["sigma_within"]), r["tune"]) for r in rows} == {
        (s, t) for s in (0.0, 0.2) for t in ("none", "channel")}
    assert all(int(r["chips"]) == 4 and int(r["images"]) == 64 for r in rows)
    assert (tmp_path / "mc" / "chips.csv").exists()
