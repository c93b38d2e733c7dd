"""The walkthrough notebook: committed without outputs, and executed end to end on the demo data."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from clitools import REPO
from nbclient import NotebookClient

NOTEBOOK = REPO / "notebooks" / "01_save_and_retrain.ipynb"
CELL_TIMEOUT_S = 600  # a hang guard per cell, not a speed check


def test_notebook_is_committed_without_outputs() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code)


def _text(notebook: nbformat.NotebookNode) -> str:
    return "".join(
        output.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
    )


@pytest.mark.slow  # trains twice (~40 s of CPU); every step it shows has its own e2e test in `make test`
def test_notebook_runs_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RETRAIN_WORK", str(tmp_path / "work"))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()

    text = _text(notebook)
    assert "identical logits on 18 test images: True" in text
    assert "head re-initialised" in text and "trainable parameters: 1,026 of" in text  # a 512x2 head + 2 biases
    assert "v001: 6 classes" in text and "v002: 2 classes ['curved', 'straight']" in text
    assert "parent " + str(tmp_path / "work" / "shapes_v1_state_dict.pth") in text
    assert "max |onnxruntime - torch|" in text and "onnxruntime accuracy on the new test split" in text
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    # curves, confusion matrix and top losses of the first model, the confusion matrix of the retrained one
    assert sum("image/png" in output.get("data", {}) for output in outputs) >= 4
    assert (tmp_path / "work" / "models" / "shapes" / "v002" / "report" / "report.md").is_file()
