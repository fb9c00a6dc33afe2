"""docs/notebook.ipynb runs top to bottom in a real Jupyter kernel (issue 17), and is kept in
git without outputs."""

from __future__ import annotations

import os
import shutil

import pytest

from helpers import ROOT

NOTEBOOK = ROOT / "docs" / "notebook.ipynb"


def test_notebook_is_stored_without_outputs():
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


def test_notebook_runs_in_a_kernel(tmp_path, minilm_dir):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("peft")
    shutil.copy(NOTEBOOK, tmp_path / "notebook.ipynb")
    notebook = nbformat.read(tmp_path / "notebook.ipynb", as_version=4)
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    previous = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        client = nbclient.NotebookClient(
            notebook, timeout=600, kernel_name="python3",
            resources={"metadata": {"path": str(tmp_path)}},
        )  # fmt: skip
        client.execute()  # raises CellExecutionError on any error
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    html = [o for o in outputs if "text/html" in o.get("data", {})]
    assert any("<iframe srcdoc=" in o["data"]["text/html"] for o in html)  # the report inline
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the spectra
    text = "".join(o.get("text", "") for o in outputs)
    assert "18 modules adapted" in text and "trainable params" in text
    assert list(tmp_path.iterdir()) == [tmp_path / "notebook.ipynb"]  # nothing written
