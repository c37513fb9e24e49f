"""The quick-start notebook runs top to bottom on the tiny model, and is kept in git without outputs."""

from pathlib import Path

import nbformat
import pytest

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "quickstart.ipynb"


def test_the_notebook_is_stored_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code, "the notebook has no code"
    assert all(not cell.outputs and cell.execution_count is None for cell in code), "strip the outputs"


@pytest.mark.slow
def test_the_notebook_runs_top_to_bottom(tmp_path):
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )
    assert "read 24 = embedded 24 + skipped 0" in outputs
    assert "unit norm: True" in outputs
    assert "text vs text+image:" in outputs
    assert all(f"{mode:<7}" in outputs for mode in ("vector", "text", "hybrid"))
    ndcg = float(outputs.split("MiniLM nDCG@10 ")[1].split(",")[0])
    shuffled = float(outputs.split("shuffled ranking nDCG@10 ")[1].split()[0])
    assert ndcg > 0.9 and shuffled < 0.1  # a real model retrieves, a shuffled ranking does not
    errors = [
        o
        for cell in notebook.cells
        if cell.cell_type == "code"
        for o in cell.outputs
        if o.output_type == "error"
    ]
    assert not errors
