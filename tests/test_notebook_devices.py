"""notebooks/devices.ipynb executes end to end on a tiny model (PIMJAX_NOTEBOOK_SMOKE=1).

Its smoke sizes are the drift experiment's, so its kernel reuses the programs this session
compiled (tests/test_drift.py) through the shared persistent compilation cache.
"""

import os
import re
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "devices.ipynb"


def test_devices_notebook_executes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("PIMJAX_NOTEBOOK_SMOKE", "1")
    monkeypatch.delenv("PIMJAX_NOTEBOOK_RUN", raising=False)
    # the kernel imports this checkout's pimjax, whatever is installed
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    monkeypatch.delenv("PIMJAX_COMPILE_CACHE", raising=False)
    # the kernel compiles at the level of tests/test_drift.py (most optimizations off), so
    # the shared persistent cache serves its programs
    monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
    cache = jax.config.jax_compilation_cache_dir
    if cache:  # the kernel's runtime.configure() then shares this session's compiled programs
        (tmp_path / "cache").mkdir()
        (tmp_path / "cache" / "jax-compile").symlink_to(cache)
        monkeypatch.setenv("PIMJAX_CACHE_DIR", str(tmp_path / "cache"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, kernel_name="python3", timeout=600,
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.outputs)
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
