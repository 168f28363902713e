"""The quick-start notebook runs from top to bottom without an error, and its LSTM learns."""

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_runs_clean():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()
    outputs = "".join(
        output.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])
    )  # fmt: skip
    test_mse, baseline = map(float, re.search(r"test MSE ([\d.]+) \(baseline ([\d.]+)\)", outputs).groups())
    assert test_mse < baseline / 2
    assert (
        sum(
            cell.cell_type == "code" and any(o.output_type == "display_data" for o in cell.outputs)
            for cell in notebook.cells
        )
        >= 3
    )
