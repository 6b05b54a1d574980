"""Every notebook in notebooks/ runs headless, top to bottom, in its small-size mode."""

from __future__ import annotations

import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def execute_notebook(path: pathlib.Path, timeout_s: int = 600) -> nbformat.NotebookNode:
    """Runs a notebook in a fresh kernel from the repo root; raises CellExecutionError on failure."""
    notebook = nbformat.read(path, as_version=4)
    os.environ["DPO_JAX_SMALL"] = "1"  # the kernel inherits it: notebooks shrink their runs
    os.environ.setdefault("MPLBACKEND", "Agg")
    client = nbclient.NotebookClient(
        notebook,
        timeout=timeout_s,
        kernel_name="python3",
        resources={"metadata": {"path": str(REPO)}},
    )
    client.execute()
    return notebook


def test_notebooks_are_stored_without_outputs():
    assert NOTEBOOKS, "notebooks/ holds no notebook"
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert not cell.outputs, f"{path.name} is stored with outputs"


# custom_loss.ipynb is over 20 s: a fresh kernel imports the stack and trains twice; it is
# the notebook flow's one end-to-end test (a new loss, registered and trained at once)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path):
    notebook = execute_notebook(path)
    executed = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in executed if c.source.strip())


def test_a_raising_cell_fails_execution(tmp_path):
    """The harness itself must fail on an exception, or the test above proves nothing."""
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [
        nbformat.v4.new_code_cell("x = 1"),
        nbformat.v4.new_code_cell("raise ValueError('boom')"),
    ]
    path = tmp_path / "raises.ipynb"
    nbformat.write(notebook, path)
    with pytest.raises(nbclient.exceptions.CellExecutionError, match="boom"):
        execute_notebook(path, timeout_s=120)
