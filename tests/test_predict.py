"""`runoff predict`: GeoTIFFs on exactly the source grid, tiling, NetCDF, figures, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import xarray as xr

from pipeline.model import ConvLSTMForecaster
from pipeline.inference import forecast_window
from pipeline.synth import write_series

from .conftest import one_error_line


def test_geotiffs_match_the_source_grid_and_carry_tags(trained, tmp_path, run_cli):
    out = tmp_path / "pred"
    result = run_cli("predict", "--weights_path", trained / "ckpt" / "model_epoch2.pth", "--input_dir",
                     trained / "in", "--output_dir", out, "--dates", "2019-03-01:2019-03-03",
                     "--plots-dir", tmp_path / "plots")
    assert result.status == 0, result.err
    files = sorted(out.glob("*.tif"))
    assert [f.name for f in files] == [f"QS_201903{d:02d}_lead{lead}.tif" for d, lead in
                                       [(2, 1), (3, 1), (3, 2), (4, 1), (4, 2), (5, 2)]]
    with rasterio.open(trained / "in" / "QS_20190301.tif") as src, rasterio.open(out / "QS_20190302_lead1.tif") as f:
        assert f.crs == src.crs and f.transform == src.transform
        assert (f.width, f.height) == (src.width, src.height)
        assert f.dtypes[0] == "float32" and f.nodata is not None and f.compression is not None
        assert f.overviews(1), "internal overviews"
        tags = f.tags()
        assert tags["issue_date"] == "2019-03-01" and tags["valid_date"] == "2019-03-02" and tags["lead_days"] == "1"
        assert len(tags["checkpoint_sha256"]) == 64 and tags["package_version"] and tags["units"] == "kg m-2"
        assert f.descriptions[0].startswith("QS forecast")
        data = f.read(1, masked=True)
        source_nodata = src.read(1) == src.nodata
        assert np.array_equal(data.mask, source_nodata)  # the sea stays nodata
        assert data.min() >= 0
    assert not list(out.glob(".*partial"))
    figures = sorted((tmp_path / "plots").glob("compare_*.png"))
    assert figures and all(f.stat().st_size > 10_000 for f in figures)


def test_max_plots_is_the_number_of_figures_written(trained, tmp_path, run_cli):
    result = run_cli("predict", "--weights_path", trained / "ckpt" / "best.pth", "--input_dir", trained / "qs.zarr",
                     "--output_dir", tmp_path / "pred", "--dates", "2019-03-01:2019-03-04",
                     "--plots_dir", tmp_path / "plots", "--max_plots", "2")
    assert result.status == 0, result.err
    # 4 issue days x 2 leads: the first map and the latest forecast
    figures = sorted(p.name for p in (tmp_path / "plots").glob("compare_*.png"))
    assert figures == ["compare_20190302_lead1.png", "compare_20190306_lead2.png"]


def test_split_period_keeps_the_forecasts_whose_targets_lie_in_it(trained, tmp_path, run_cli):
    out = tmp_path / "pred"
    result = run_cli("predict", "--weights_path", trained / "ckpt" / "best.pth", "--input_dir", trained / "qs.zarr",
                     "--output_dir", out, "--split", "2019-03-16..", "--max_plots", "0")
    assert result.status == 0, result.err
    valid = [(f.name[3:11], f.name[-5]) for f in sorted(out.glob("*.tif"))]
    # issue days 03-15 .. 03-19: every target (leads 1 and 2) on or after 03-16, the cube ends 03-21
    assert valid == [(f"201903{d:02d}", lead) for d in range(16, 22) for lead in "12"
                     if 16 + int(lead) - 1 <= d <= 19 + int(lead)]


def test_cog_layout_is_valid(trained, tmp_path, run_cli):
    pytest.importorskip("rio_cogeo", reason="rio-cogeo not installed")
    from rio_cogeo.cogeo import cog_validate

    run_cli("predict", "--weights_path", trained / "ckpt" / "best.pth", "--input_dir", trained / "qs.zarr",
            "--output_dir", tmp_path, "--last", "--max_plots", "0")
    for path in tmp_path.glob("*.tif"):
        valid, errors, _ = cog_validate(str(path))
        assert valid, errors


def test_netcdf_holds_all_forecasts_with_grid_mapping(trained, tmp_path, run_cli):
    result = run_cli("predict", "--weights_path", trained / "ckpt" / "best.pth", "--input_dir", trained / "qs.zarr",
                     "--output_dir", tmp_path, "--dates", "2019-03-01:2019-03-04", "--format", "netcdf",
                     "--max_plots", "0")
    assert result.status == 0, result.err
    nc = next(tmp_path.glob("*.nc"))
    ds = xr.open_dataset(nc, engine="netcdf4", decode_coords="all")
    assert ds.qs_forecast.dims == ("time", "lead", "y", "x") and ds.sizes["time"] == 4 and ds.sizes["lead"] == 2
    assert ds.rio.crs.to_epsg() == 2154
    with rasterio.open(tmp_path / "QS_20190302_lead1.tif") as f:
        np.testing.assert_allclose(ds.qs_forecast.isel(time=0, lead=0).values, f.read(1, masked=True).filled(np.nan),
                                   rtol=1e-6)


def test_tiled_equals_untiled():
    torch.manual_seed(0)
    model = ConvLSTMForecaster(in_channels=1, hidden_channels=[6, 6], kernel_size=3, leads=2)
    x = np.random.default_rng(0).normal(size=(4, 1, 90, 131)).astype(np.float32)
    whole = forecast_window(model, x, torch.device("cpu"), tile=512)
    tiled = forecast_window(model, x, torch.device("cpu"), tile=48)
    assert np.abs(whole - tiled).max() < 1e-4


def test_bad_input_one_line_exit_2_no_partial_outputs(trained, tmp_path, run_cli):
    ckpt = trained / "ckpt" / "best.pth"
    other = tmp_path / "other"
    write_series(other, days=10, height=20, width=24, seed=1)
    few = tmp_path / "few"
    few.mkdir()
    for f in sorted((trained / "in").glob("*.tif"))[:3]:
        shutil.copy(f, few / f.name)
    text = tmp_path / "weights.pth"
    text.write_text("not a checkpoint")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cases = [
        (["--weights_path", ckpt, "--input_dir", other], ["trained on grid", "40x52", "20x24"]),
        (["--weights_path", ckpt, "--input_dir", few], ["needs 6 consecutive days"]),
        (["--weights_path", text, "--input_dir", trained / "qs.zarr"], ["weights.pth"]),
        (["--weights_path", tmp_path / "none.pth", "--input_dir", trained / "qs.zarr"], ["no such file"]),
        (["--weights_path", ckpt, "--input_dir", trained / "qs.zarr", "--output_dir", blocker / "out"],
         ["--output_dir"]),
        (["--weights_path", ckpt, "--input_dir", trained / "qs.zarr", "--dates", "2030-01-01:2030-02-01"],
         ["--dates"]),
        (["--weights_path", ckpt, "--input_dir", trained / "qs.zarr", "--max_plots", "-5"], ["--max_plots -5"]),
        (["--weights_path", ckpt, "--input_dir", trained / "qs.zarr", "--dates", "2019-02-20:2019-02-10"],
         ["--dates 2019-02-20:2019-02-10: START lies after END"]),
        (["--weights_path", ckpt, "--input_dir", trained / "qs.zarr", "--split", "2019-01-01..2019-01-03"],
         ["--split 2019-01-01..2019-01-03: no issue day", "are possible"]),
        (["--weights_path", ckpt, "--input_dir", trained / "qs.zarr", "--tile", "8"],
         ["--tile 8: must exceed twice the reach"]),
    ]
    for args, words in cases:
        out = tmp_path / "out"
        shutil.rmtree(out, ignore_errors=True)
        full = args if "--output_dir" in args else [*args, "--output_dir", out]
        result = run_cli("predict", *full, "--plots_dir", tmp_path / "plots")
        assert result.status == 2, (args, result.out)
        line = one_error_line(result.err)
        assert all(w in line for w in words), (words, line)
        assert not out.exists() and not (tmp_path / "plots").exists(), args  # not even an empty folder


QGIS_CHECK = r'''
import json, os, sys
from qgis.core import QgsApplication, QgsRasterLayer, QgsRasterBandStats
QgsApplication.setPrefixPath("/usr", True)
app = QgsApplication([], False)
app.initQgis()
layer = QgsRasterLayer(sys.argv[1], "forecast", "gdal")
provider = layer.dataProvider()
stats = provider.bandStatistics(1, QgsRasterBandStats.All)
extent = layer.extent()
print(json.dumps({"valid": layer.isValid(), "crs": layer.crs().authid(),
                  "extent": [extent.xMinimum(), extent.yMinimum(), extent.xMaximum(), extent.yMaximum()],
                  "nodata": provider.sourceHasNoDataValue(1), "min": stats.minimumValue,
                  "max": stats.maximumValue, "mean": stats.mean}), flush=True)
del provider, layer
app.exitQgis()
os._exit(0)  # QGIS 3.22's bindings can crash while Python tears down after exitQgis
'''


def _qgis_available() -> bool:
    if not Path("/usr/bin/python3").exists():
        return False
    probe = subprocess.run(["/usr/bin/python3", "-c", "import qgis.core"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _qgis_available(), reason="QGIS Python bindings (Debian python3-qgis) not installed; "
                    ".ci/run installs them when it runs as root")
def test_qgis_opens_the_forecast_on_the_source_grid(trained, tmp_path, run_cli):
    run_cli("predict", "--weights_path", trained / "ckpt" / "best.pth", "--input_dir", trained / "qs.zarr",
            "--output_dir", tmp_path, "--last", "--max_plots", "0")
    path = sorted(tmp_path.glob("*.tif"))[0]
    env = {"QT_QPA_PLATFORM": "offscreen", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
           "XDG_RUNTIME_DIR": str(tmp_path)}
    out = subprocess.run(["/usr/bin/python3", "-c", QGIS_CHECK, str(path)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout.strip().splitlines()[-1])
    with rasterio.open(path) as f:
        data = f.read(1, masked=True)
        bounds = f.bounds
    assert info["valid"] and info["crs"] == "EPSG:2154" and info["nodata"]
    np.testing.assert_allclose(info["extent"], [bounds.left, bounds.bottom, bounds.right, bounds.top])
    np.testing.assert_allclose([info["min"], info["max"], info["mean"]],
                               [float(data.min()), float(data.max()), float(data.mean())], rtol=1e-5, atol=1e-6)
    gdal = subprocess.run(["gdalinfo", "-json", "-stats", str(path)], capture_output=True, text=True)
    if gdal.returncode == 0:
        band = json.loads(gdal.stdout)["bands"][0]
        assert band["noDataValue"] == -9999  # gdalinfo prints statistics to 3 decimals
        assert abs(band["maximum"] - float(data.max())) <= 1e-3 * max(1.0, float(data.max()))


def test_tiles_with_forcings_equal_the_whole_grid(monkeypatch):
    """The forcings' box means reach farther than the recurrence: the tile margin covers them.
    Passes of fewer windows (a pixel budget per forward pass) change nothing either."""
    import numpy as np
    import torch

    from pipeline import model as model_module
    from pipeline.inference import forecast_batch

    torch.manual_seed(0)
    model = ConvLSTMForecaster(hidden_channels=4, leads=2, forcing_channels=2, predict_delta=False)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 1, 90, 130)).astype(np.float32)
    rain = rng.normal(size=(2, 2, 1, 90, 130)).astype(np.float32)
    whole = forecast_batch(model, x, torch.device("cpu"), tile=512, forcings=rain)
    tiled = forecast_batch(model, x, torch.device("cpu"), tile=85, forcings=rain)
    np.testing.assert_allclose(tiled, whole, rtol=1e-4, atol=1e-5)
    monkeypatch.setattr(model_module, "PASS_PIXELS", 85 * 85)  # one window per pass
    one_by_one = forecast_batch(model, x, torch.device("cpu"), tile=85, forcings=rain)
    np.testing.assert_allclose(one_by_one, whole, rtol=1e-4, atol=1e-5)
