"""`--scheduler`: ingest, predict and evaluate on a real dask.distributed LocalCluster."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import rasterio

from .conftest import one_error_line
from .test_ingest import _assert_same_cube

pytest.importorskip("distributed")


def test_ingest_on_a_two_process_cluster_equals_the_threaded_ingest(series_dir, tmp_path, run_cli):
    assert run_cli("ingest", series_dir, tmp_path / "threads.zarr").status == 0
    result = run_cli("ingest", series_dir, tmp_path / "cluster.zarr", "--scheduler", "local:2")
    assert result.status == 0, result.err
    assert "wrote 40 daily map(s)" in result.out
    _assert_same_cube(tmp_path / "threads.zarr", tmp_path / "cluster.zarr")


def test_predict_and_evaluate_on_a_cluster(trained, tmp_path, run_cli):
    common = ["--weights_path", trained / "ckpt" / "best.pth", "--max_plots", "0", "--last"]
    for name, extra in (("threads", []), ("cluster", ["--scheduler", "local:2"])):
        result = run_cli("predict", *common, "--input_dir", trained / "qs.zarr", "--output_dir", tmp_path / name, *extra)
        assert result.status == 0, result.err
    files = sorted(p.name for p in (tmp_path / "threads").glob("*.tif"))
    assert files and files == sorted(p.name for p in (tmp_path / "cluster").glob("*.tif"))
    for name in files:
        with rasterio.open(tmp_path / "threads" / name) as a, rasterio.open(tmp_path / "cluster" / name) as b:
            np.testing.assert_array_equal(a.read(1), b.read(1))

    from distributed import LocalCluster

    # a scheduler that is already running, joined by its address
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        result = run_cli("evaluate", "--weights_path", trained / "ckpt" / "best.pth", "--data_dir",
                         trained / "qs.zarr", "--output_dir", tmp_path / "eval", "--scheduler", cluster.scheduler_address)
        assert cluster.scheduler.transition_counter > 0, "no task reached the cluster"
    assert result.status == 0, result.err
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["meta"]["windows"] > 0


def test_an_unreadable_file_on_a_cluster_is_one_line(series_dir, tmp_path):
    folder = tmp_path / "in"
    shutil.copytree(series_dir, folder)
    (folder / "QS_20190201.tif").write_text("not a raster")
    # a child process: the workers write to the terminal's stderr, which capsys does not see
    result = subprocess.run([sys.executable, "-m", "pipeline", "ingest", str(folder), str(tmp_path / "qs.zarr"),
                             "--scheduler", "local:2"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "QS_20190201.tif: not a readable raster" in one_error_line(result.stderr)
    assert not (tmp_path / "qs.zarr").exists()


@pytest.mark.parametrize("spec, words", [("banana", "expected local:N or a scheduler address"),
                                         ("local:0", "N >= 1"),
                                         ("tcp://127.0.0.1:9", "cannot reach the scheduler")])
def test_bad_scheduler_is_one_line_exit_2(spec, words, series_dir, tmp_path, run_cli):
    result = run_cli("ingest", series_dir, tmp_path / "qs.zarr", "--scheduler", spec)
    assert result.status == 2
    assert words in one_error_line(result.err)
    assert not (tmp_path / "qs.zarr").exists()
