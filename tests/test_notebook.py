"""The quickstart notebook runs top to bottom on a tiny cube and checkpoint."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_executes(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("RUNOFF_CUBE", str(trained / "qs.zarr"))
    monkeypatch.setenv("RUNOFF_CHECKPOINT", str(trained / "ckpt" / "best.pth"))
    monkeypatch.setenv("RUNOFF_OUT", str(tmp_path / "out"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs)
    assert "| model |" in outputs and "forecast batch" in outputs
    assert any(o.get("output_type") == "display_data" for cell in nb.cells for o in cell.get("outputs", []))
    assert list((tmp_path / "out" / "predictions").glob("QS_*_lead1.tif"))
