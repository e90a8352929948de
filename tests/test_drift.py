"""The drift experiment (experiments/drift.py --smoke) and noise-aware training under PCM.

One smoke run trains a qat and a qavat-under-pcm LeNet-5 and sweeps their PCM chips over
read times and compensations; the tests check its files, its reuse of finished work, the
training under the PCM device, and the library's compensations.
"""

import dataclasses
import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from pimjax import devices, drift, selftune
from pimjax.configs import drift as presets
from pimjax.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
common = importlib.import_module("common")
drift_script = importlib.import_module("drift")

# no bit-identity claim against another level here: compile with most optimizations off
pytestmark = pytest.mark.xla_level("fast")


@pytest.fixture(autouse=True)
def _keep_session_settings(monkeypatch):
    """The script calls runtime.configure(): keep this session's compilation cache."""
    monkeypatch.setenv("PIMJAX_COMPILE_CACHE", "0")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One --smoke run: its output folder and rows."""
    out = tmp_path_factory.mktemp("drift")
    with pytest.MonkeyPatch.context() as m:
        m.setenv("PIMJAX_COMPILE_CACHE", "0")
        rows = drift_script.main(["--smoke", "--out", str(out)])
    return out, rows


def test_smoke_writes_every_point(smoke):
    out, rows = smoke
    args = presets.drift_config(smoke=True)
    points = {(r["model"], r["compensation"], r["t"]) for r in rows}
    assert points == {(m, c, t) for m in args.models for c in args.compensations
                      for t in args.times}
    for r in rows:
        assert r["chips"] == args.chips and 0 <= r["min"] <= r["p5"] <= r["mean"] <= 1
        assert (r["calib_images"] > 0) == (r["compensation"] in selftune.TUNE_VARIANTS)
    saved = json.loads((out / "drift.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows))
    for name in ("drift.csv", "drift_table.txt", "drift.png"):
        assert (out / name).stat().st_size > 0
    assert "10 years" not in (out / "drift_table.txt").read_text()
    assert "1 year" in (out / "drift_table.txt").read_text()
    # paired differences: every compensation but drift against drift, qavat-pcm against qat
    vs_drift, vs_qat = saved["meta"]["vs_drift"], saved["meta"]["vs_qat"]
    assert {r["compensation"] for r in vs_drift} == {"none - drift", "channel - drift"}
    assert {r["model"] for r in vs_qat} == {"qavat-pcm - qat"}
    assert len(vs_drift) == 2 * 2 * 2 and len(vs_qat) == 3 * 2
    assert all(r["se"] >= 0 for r in vs_drift + vs_qat)


def test_smoke_rerun_reuses_models_and_evaluations(smoke):
    out, rows = smoke
    evals = {p.name: p.stat().st_mtime_ns for p in (out / "evals").iterdir()}
    runs = sorted(p.name for p in (out / "runs").iterdir())
    again = drift_script.main(["--smoke", "--out", str(out)])
    assert again == rows
    assert {p.name: p.stat().st_mtime_ns for p in (out / "evals").iterdir()} == evals
    assert sorted(p.name for p in (out / "runs").iterdir()) == runs


def test_qavat_trains_under_the_pcm_device(smoke):
    """qavat with DeviceConfig(preset="pcm"): the loss falls, and the chips change training."""
    out, _ = smoke
    args = presets.drift_config(smoke=True)
    histories = {}
    for model in ("qat", "qavat-pcm"):
        config = args.train_config(model)
        run = out / "runs" / common.run_name(config)
        saved = TrainConfig.from_dict(json.loads((run / "config.json").read_text()))
        assert saved == config
        histories[model] = json.loads((run / "metrics.json").read_text())
    assert args.train_config("qavat-pcm").device.preset == "pcm"
    assert "_pcm_" in common.run_name(args.train_config("qavat-pcm"))
    pcm = histories["qavat-pcm"][-1]
    assert np.isfinite(pcm["train_loss"]) and pcm["train_loss"] < pcm["first_loss"]
    assert pcm["test_acc"] > 0.2  # 10 classes: chance is 0.1
    # the same seed, data and first weights: only the PCM chips make the first loss differ
    assert pcm["first_loss"] != histories["qat"][-1]["first_loss"]


def test_smoke_flags_are_checked_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        drift_script.main(["--smoke", "--out", str(tmp_path), "--chips", "0"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "--chips" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


# -------------------------------------------------------------------- the library part


def test_differences_pair_chips_and_images():
    """Hand-computed: mean of per-chip differences, SE from chips' and images' variances."""
    def point(model, comp, acc, img):
        return drift_script.Point({"model": model, "compensation": comp, "t": 1.0,
                                   "time": "1 s"}, np.array(acc), np.array(img))

    base = point("qat", "drift", [0.90, 0.80, 0.70], [1.0, 2 / 3, 1 / 3, 1.0])
    tuned = point("qat", "channel", [0.95, 0.80, 0.75], [1.0, 1.0, 1 / 3, 1.0])
    (row,) = drift_script.differences([base, tuned], "drift", "compensation")
    assert row["compensation"] == "channel - drift" and row["model"] == "qat"
    assert row["diff"] == pytest.approx(0.1 / 3)
    d_chip, d_img = np.array([0.05, 0.0, 0.05]), np.array([0.0, 1 / 3, 0.0, 0.0])
    want = np.sqrt(d_chip.var(ddof=1) / 3 + d_img.var(ddof=1) / 4)
    assert row["se"] == pytest.approx(want)
    assert drift_script.differences([base, tuned], "paired", "compensation") == []


def test_compensations_build_the_right_device():
    base = devices.pcm()
    dev, tuning = drift.compensated(base, "drift")
    assert isinstance(dev.compensation, devices.GlobalDriftCompensation) and tuning is None
    dev, tuning = drift.compensated(devices.pcm(drift_compensation=True), "none")
    assert dev.compensation is None and tuning is None
    calib = np.zeros((4, 28, 28, 1), np.float32)
    dev, tuning = drift.compensated(base, "bn", calib)
    assert dev == base and tuning.variant == "bn"
    with pytest.raises(ValueError, match="calibration images"):
        drift.compensated(base, "channel")
    with pytest.raises(ValueError, match="compensation='magic'"):
        drift.compensated(base, "magic")
    assert dataclasses.replace(base, compensation=None) == base


def test_time_labels():
    assert [drift.time_label(t) for t in drift.TIMES.values()] == list(drift.TIMES)
    assert drift.time_label(7200.0) == "2 h" and drift.time_label(0.5) == "0.5 s"

