"""notebooks/devices.ipynb executes end to end on a tiny model (PIMJAX_NOTEBOOK_SMOKE=1)."""

import os
from pathlib import Path

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
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, kernel_name="python3", timeout=600,
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.outputs)
    for expected in ("programmed std", "overall gain", "output noise std measured",
                     "compensation gain", "mean accuracy over"):
        assert expected in text, expected
    # no absolute path of this machine in the notebook's code
    source = "".join(c.source for c in nb.cells if c.cell_type == "code")
    assert str(ROOT) not in source and "/work/" not in source and "/tmp/" not in source
    assert os.environ["PIMJAX_NOTEBOOK_SMOKE"] == "1"
