"""Shared fixtures: small synthetic series written as real GeoTIFFs, and a CLI runner."""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.synth import write_series


@dataclass
class CliResult:
    status: int
    out: str
    err: str


@pytest.fixture
def run_cli(capsys):
    """Run ``runoff ARGS`` in-process; return status, stdout and stderr."""

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        status = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(status, captured.out, captured.err)

    return run


@pytest.fixture(scope="session")
def series_dir(tmp_path_factory) -> Path:
    """40 synthetic days, 32x40 px, EPSG:2154 GeoTIFFs (read-only: copy before changing)."""
    out = tmp_path_factory.mktemp("series") / "input"
    write_series(out, days=40, height=32, width=40, seed=1)
    return out


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    """A model trained for two epochs (leads 1 and 2) on 80 synthetic days: the folder
    holds ``in/`` (rasters), ``qs.zarr`` and ``ckpt/``."""
    from pipeline.ingest import ingest
    from pipeline.train import TrainConfig, train

    root = tmp_path_factory.mktemp("trained")
    write_series(root / "in", days=80, height=40, width=52, seed=4)
    ingest(root / "in", root / "qs.zarr")
    train(TrainConfig(data_dir=str(root / "qs.zarr"), epochs=2, batch_size=4, hidden_channels=[4], patch=16,
                      leads=[1, 2], checkpoint_dir=str(root / "ckpt"), output_dir=str(root / "out"), device="cpu"))
    return root


@pytest.fixture
def series_copy(series_dir, tmp_path) -> Path:
    """A private, writable copy of ``series_dir``."""
    dst = tmp_path / "input"
    shutil.copytree(series_dir, dst)
    return dst


def predict_and_evaluate(run_cli, weights: Path, cube: Path, out: Path) -> tuple[int, str]:
    """``runoff predict --last`` and ``runoff evaluate`` of ``weights`` on ``cube``, both
    asserted to succeed: the number of forecast GeoTIFFs written, and metrics.md's text."""
    result = run_cli("predict", "--weights_path", weights, "--input_dir", cube, "--output_dir", out / "pred",
                     "--last", "--max_plots", "0")
    assert result.status == 0, result.err
    result = run_cli("evaluate", "--weights_path", weights, "--data_dir", cube, "--output_dir", out / "eval")
    assert result.status == 0, result.err
    return len(list((out / "pred").glob("QS_*.tif"))), (out / "eval" / "metrics.md").read_text()


def synthetic_cube(root: Path, days: int, height: int, width: int, seed: int) -> str:
    """Write a synthetic series under ``root/in`` and ingest it into ``root/qs.zarr``."""
    from pipeline.ingest import ingest

    write_series(root / "in", days=days, height=height, width=width, seed=seed)
    ingest(root / "in", root / "qs.zarr")
    return str(root / "qs.zarr")


def tree_digest(path: Path) -> str:
    """Digest of every file name and content under ``path`` (to prove nothing changed)."""
    h = hashlib.sha256()
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def one_error_line(err: str) -> str:
    """Assert stderr holds exactly one line, an error line, and return it."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("runoff: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    """Every test runs in its own folder: default paths (stores/, checkpoints/, outputs/)
    never touch the repository."""
    monkeypatch.chdir(tmp_path)
