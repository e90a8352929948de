"""notebooks/devices.ipynb executes end to end on a tiny model (PIMJAX_NOTEBOOK_SMOKE=1).

Its smoke sizes are the drift experiment's, so its kernel reuses the programs this session
compiled (tests/test_drift.py) through the shared persistent compilation cache.
"""

import re

from helpers import ROOT, execute_notebook

NOTEBOOK = ROOT / "notebooks" / "devices.ipynb"


def test_devices_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("PIMJAX_NOTEBOOK_SMOKE", "1")
    monkeypatch.delenv("PIMJAX_NOTEBOOK_RUN", raising=False)
    # its kernel compiles at the level of tests/test_drift.py (most optimizations off), so the
    # shared persistent cache serves its programs
    texts, nb = execute_notebook(NOTEBOOK, tmp_path, monkeypatch)
    text = "".join(texts)
    for expected in ("programmed std", "overall gain", "output noise std measured",
                     "compensation gain", "mean accuracy over"):
        assert expected in text, expected
    # the per-read output noise of one layer matches its formula (50 reads, median of 84)
    measured, expected = map(float, re.search(
        r"measured ([0-9.]+) .*expected about ([0-9.]+)", text).groups())
    assert abs(measured / expected - 1) < 0.25, (measured, expected)
    figures = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
                  for o in c.outputs)
    assert figures >= 4
    # no absolute path of this machine in the notebook's code
    source = "".join(c.source for c in nb.cells if c.cell_type == "code")
    assert str(ROOT) not in source and "/work/" not in source and "/tmp/" not in source
