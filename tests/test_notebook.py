"""The quickstart notebook runs top to bottom on a tiny cube and checkpoint like the demo's:
runoff on a river network, forecast with the rain of the lead days."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

from pipeline.cli import main
from pipeline.synth import write_series

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_executes_on_a_model_with_forcings(tmp_path, monkeypatch):
    write_series(tmp_path / "in", days=80, height=24, width=32, seed=2, regime="river", covariates=["rainf"])
    assert main(["ingest", str(tmp_path / "in"), str(tmp_path / "qs.zarr")]) == 0
    assert main(["train", "--data_dir", str(tmp_path / "qs.zarr"), "--forcings", "rainf", "--leads", "1,2",
                 "--epochs", "1", "--batch_size", "4", "--hidden_channels", "4", "--patch", "16",
                 "--checkpoint_dir", str(tmp_path / "ckpt"), "--output_dir", str(tmp_path / "train")]) == 0
    monkeypatch.setenv("RUNOFF_CUBE", str(tmp_path / "qs.zarr"))
    monkeypatch.setenv("RUNOFF_CHECKPOINT", str(tmp_path / "ckpt" / "best.pth"))
    monkeypatch.setenv("RUNOFF_OUT", str(tmp_path / "out"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs)
    assert "| model |" in outputs and "forecast batch (4, 2, 1, 24, 32)" in outputs and "forcings: rainf" in outputs
    assert any(o.get("output_type") == "display_data" for cell in nb.cells for o in cell.get("outputs", []))
    assert len(list((tmp_path / "out" / "predictions").glob("QS_*_lead*.tif"))) == 2
