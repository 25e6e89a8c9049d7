"""Static maps: (y, x) layers of the cube that hold on every day (a DEM's flow accumulation).
Ingested from one raster or from a folder's static/ sub-folder, read by --covariates on every
input day, recorded in the checkpoint, and needed again by predict."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import xarray as xr
from rasterio.transform import from_origin

from pipeline.checkpoint import load_checkpoint
from pipeline.cube import open_cube, read_cube_info
from pipeline.ingest import ingest_static
from pipeline.synth import upstream_area, write_series

from .conftest import one_error_line, predict_and_evaluate, tree_digest

H, W, SEED = 24, 32, 3


@pytest.fixture(scope="module")
def area_run(tmp_path_factory):
    """70 days of the river regime with its rain and upstream area (static/upstream_area.tif),
    ingested in one command, and a model trained for one epoch on both."""
    from pipeline.cli import main

    root = tmp_path_factory.mktemp("static")
    write_series(root / "in", days=70, height=H, width=W, seed=SEED, regime="river",
                 covariates=["rainf", "upstream_area"])
    assert main(["ingest", str(root / "in"), str(root / "qs.zarr")]) == 0
    assert main(["train", "--data_dir", str(root / "qs.zarr"), "--epochs", "1", "--batch_size", "4",
                 "--hidden_channels", "4", "--patch", "16", "--forcings", "rainf", "--covariates", "upstream_area",
                 "--checkpoint_dir", str(root / "ckpt"), "--output_dir", str(root / "out"), "--device", "cpu"]) == 0
    return root


def _write_map(path, values, transform=from_origin(600_000.0, 6_800_000.0, 1000.0, 1000.0)):
    with rasterio.open(path, "w", driver="GTiff", height=values.shape[0], width=values.shape[1], count=1,
                       dtype="float32", crs="EPSG:2154", transform=transform, nodata=-9999.0) as dst:
        dst.write(np.where(np.isnan(values), -9999.0, values).astype(np.float32), 1)


def test_a_folder_static_subfolder_becomes_a_static_map_on_the_grid(area_run):
    ds = open_cube(area_run / "qs.zarr")
    assert ds["upstream_area"].dims == ("y", "x") and ds["qs"].dims == ("time", "y", "x")
    np.testing.assert_array_equal(ds["upstream_area"].values, upstream_area(H, W, SEED))
    assert ds["upstream_area"].rio.crs == ds["qs"].rio.crs
    assert ds["upstream_area"].rio.transform() == ds["qs"].rio.transform()
    assert ds["upstream_area"].attrs["source_file"] == "upstream_area.tif"
    assert read_cube_info(area_run / "qs.zarr").static == ["upstream_area"]
    # a plain xarray reader sees it too, georeferenced
    plain = xr.open_zarr(area_run / "qs.zarr", decode_coords="all")
    assert plain["upstream_area"].rio.crs is not None


def test_the_model_reads_the_static_map_as_a_covariate_and_predict_needs_it(area_run, tmp_path, run_cli):
    state = load_checkpoint(area_run / "ckpt" / "best.pth")
    assert state["variables"] == ["qs", "upstream_area"]
    assert state["norm_stats"]["upstream_area"]["std"] > 0.5  # log1p of 1 .. hundreds of cells
    result = run_cli("predict", "--weights_path", area_run / "ckpt" / "best.pth", "--input_dir",
                     area_run / "qs.zarr", "--output_dir", tmp_path / "pred", "--dates", "2019-03-10", "--max_plots", "0")
    assert result.status == 0, result.err
    assert len(list((tmp_path / "pred").glob("QS_*_lead1.tif"))) == 1
    # the same days without the static map: one line naming it
    write_series(tmp_path / "bare", days=70, height=H, width=W, seed=SEED, regime="river", covariates=["rainf"])
    assert run_cli("ingest", tmp_path / "bare", tmp_path / "bare.zarr").status == 0
    result = run_cli("predict", "--weights_path", area_run / "ckpt" / "best.pth", "--input_dir",
                     tmp_path / "bare.zarr", "--output_dir", tmp_path / "pred2", "--dates", "2019-03-10")
    assert result.status == 2 and "upstream_area" in one_error_line(result.err)
    assert not list(tmp_path.glob("pred2/*"))


def test_windows_repeat_the_static_map_on_every_input_day(area_run):
    from pipeline.sampler import WindowSampler, WindowSpec, window_issues
    from pipeline.cube import make_splits, cube_dates

    store = str(area_run / "qs.zarr")
    ds = open_cube(store)
    dates = cube_dates(ds)
    spec = WindowSpec(6, (1,), ("qs", "upstream_area"), ("rainf",))
    issues = window_issues(ds, make_splits(dates[0], dates[-1])["train"], spec)
    sampler = WindowSampler(store, issues, spec, {})
    stats = sampler.fit_stats(make_splits(dates[0], dates[-1])["train"])
    window = next(iter(sampler))
    static = window.x[:, 1].numpy()
    assert np.array_equal(static, np.broadcast_to(static[0], static.shape))
    area = upstream_area(H, W, SEED)
    expected = (np.log1p(area) - stats["upstream_area"]["mean"]) / stats["upstream_area"]["std"]
    np.testing.assert_allclose(static[0], np.nan_to_num(expected), rtol=1e-5, atol=1e-5)


def test_ingest_static_is_idempotent_and_refuses_other_values_without_overwrite(area_run, tmp_path, run_cli):
    import shutil

    cube = tmp_path / "qs.zarr"
    shutil.copytree(area_run / "qs.zarr", cube)
    soil = np.full((H, W), 1.5, np.float32)
    _write_map(tmp_path / "soil_depth.tif", soil)
    result = run_cli("ingest", tmp_path / "soil_depth.tif", cube, "--static", "soil_depth", "--units", "m")
    assert result.status == 0 and "wrote the static map soil_depth" in result.out
    assert open_cube(cube)["soil_depth"].attrs["units"] == "m"
    before = tree_digest(cube)
    result = run_cli("ingest", tmp_path / "soil_depth.tif", cube, "--static", "soil_depth")
    assert result.status == 0 and "already holds" in result.out and tree_digest(cube) == before
    _write_map(tmp_path / "soil_depth.tif", soil * 2)
    result = run_cli("ingest", tmp_path / "soil_depth.tif", cube, "--static", "soil_depth")
    assert result.status == 2 and "--overwrite" in one_error_line(result.err) and tree_digest(cube) == before
    assert run_cli("ingest", tmp_path / "soil_depth.tif", cube, "--static", "soil_depth", "--overwrite").status == 0
    np.testing.assert_array_equal(open_cube(cube)["soil_depth"].values, soil * 2)


def test_a_static_map_on_another_grid_is_resampled_only_when_asked(area_run, tmp_path):
    import shutil

    from pipeline.errors import RunoffError
    from pipeline.rasters import ReadOptions

    cube = tmp_path / "qs.zarr"
    shutil.copytree(area_run / "qs.zarr", cube)
    coarse = np.arange(H // 2 * W // 2, dtype=np.float32).reshape(H // 2, W // 2)
    _write_map(tmp_path / "coarse.tif", coarse, from_origin(600_000.0, 6_800_000.0, 2000.0, 2000.0))
    before = tree_digest(cube)
    with pytest.raises(RunoffError, match="pass --resample"):
        ingest_static(tmp_path / "coarse.tif", cube, "coarse")
    assert tree_digest(cube) == before
    assert ingest_static(tmp_path / "coarse.tif", cube, "coarse", options=ReadOptions(), resample="nearest")
    values = open_cube(cube)["coarse"].values
    np.testing.assert_array_equal(values, np.repeat(np.repeat(coarse, 2, axis=0), 2, axis=1))


def test_a_rebuilt_cube_keeps_its_static_maps(area_run, tmp_path, run_cli):
    """New days before the first one rebuild the cube aside; its static maps come along."""
    write_series(tmp_path / "later", days=20, height=H, width=W, seed=SEED, start="2019-02-01", regime="river",
                 covariates=["upstream_area"])
    assert run_cli("ingest", tmp_path / "later", tmp_path / "qs.zarr").status == 0
    write_series(tmp_path / "earlier", days=10, height=H, width=W, seed=SEED, start="2019-01-01", regime="river")
    assert run_cli("ingest", tmp_path / "earlier", tmp_path / "qs.zarr").status == 0
    info = read_cube_info(tmp_path / "qs.zarr")
    assert str(info.start) == "2019-01-01" and info.static == ["upstream_area"]
    np.testing.assert_array_equal(open_cube(tmp_path / "qs.zarr")["upstream_area"].values, upstream_area(H, W, SEED))


@pytest.mark.parametrize("args, needle", [
    (["--static", "bad-name"], "letters, digits and _"),
    (["--static", "qs"], "daily variable"),
    (["--static", "area", "--date_format", "%Y%m%d"], "--date_format"),
])
def test_bad_static_options_are_one_line_and_write_nothing(area_run, tmp_path, run_cli, args, needle):
    import shutil

    cube = tmp_path / "qs.zarr"
    shutil.copytree(area_run / "qs.zarr", cube)
    _write_map(tmp_path / "m.tif", np.ones((H, W), np.float32))
    before = tree_digest(cube)
    result = run_cli("ingest", tmp_path / "m.tif", cube, *args)
    assert result.status == 2 and needle in one_error_line(result.err)
    assert tree_digest(cube) == before


def test_a_static_map_as_a_forcing_is_one_line(area_run, tmp_path, run_cli):
    result = run_cli("train", "--data_dir", area_run / "qs.zarr", "--epochs", "1", "--forcings", "upstream_area",
                     "--checkpoint_dir", tmp_path / "ckpt", "--output_dir", tmp_path / "out")
    assert result.status == 2 and "--covariates" in one_error_line(result.err)


def test_runoff_info_lists_the_static_map(area_run, run_cli):
    result = run_cli("info", area_run / "qs.zarr")
    assert result.status == 0 and "upstream_area float32 ('y', 'x')" in result.out


def test_synth_writes_the_upstream_area_for_the_river_regime_only(tmp_path, run_cli):
    result = run_cli("synth", tmp_path / "cells", "--days", "3", "--height", "16", "--width", "16",
                     "--covariates", "upstream_area")
    assert result.status == 2 and "--regime river" in one_error_line(result.err)
    assert not (tmp_path / "cells").exists()
    result = run_cli("synth", tmp_path / "river", "--days", "3", "--height", "16", "--width", "16",
                     "--regime", "river", "--covariates", "upstream_area")
    assert result.status == 0
    assert (tmp_path / "river" / "static" / "upstream_area.tif").exists()
    assert len(list((tmp_path / "river" / "Qs").glob("QS_*.tif"))) == 3


@pytest.fixture(scope="module")
def climatology_run(area_run, tmp_path_factory):
    """A model trained for one epoch with --climatology_map on the static run's cube."""
    from pipeline.cli import main

    root = tmp_path_factory.mktemp("climatology")
    assert main(["train", "--data_dir", str(area_run / "qs.zarr"), "--epochs", "1", "--batch_size", "4",
                 "--hidden_channels", "4", "--patch", "16", "--leads", "1-2", "--climatology_map",
                 "--checkpoint_dir", str(root / "ckpt"), "--output_dir", str(root / "out"), "--device", "cpu"]) == 0
    return root


def test_the_checkpoint_carries_the_training_days_climatology_map(area_run, climatology_run):
    from pipeline.checkpoint import read_checkpoint

    ckpt = read_checkpoint(climatology_run / "ckpt" / "best.pth")
    assert ckpt.variables == ["qs", "qs_climatology"]
    ds = open_cube(area_run / "qs.zarr")
    train = ckpt.splits["train"]
    days = ds["qs"].sel(time=slice(str(train.start), str(train.end))).values
    with np.errstate(invalid="ignore"), pytest.warns(RuntimeWarning, match="Mean of empty slice"):
        expected = np.nanmean(np.log1p(np.maximum(days, 0)), axis=0)
    np.testing.assert_allclose(ckpt.maps["qs_climatology"], expected, rtol=1e-5)
    assert np.isnan(ckpt.maps["qs_climatology"]).sum() == np.isnan(days[0]).sum()  # the sea
    assert ckpt.build_model().config.in_channels == 2


def test_predict_and_evaluate_take_the_map_from_the_checkpoint(area_run, climatology_run, tmp_path, run_cli):
    written, metrics = predict_and_evaluate(run_cli, climatology_run / "ckpt" / "best.pth", area_run / "qs.zarr",
                                            tmp_path)
    assert written == 2 and "covariates: qs_climatology" in metrics


def test_a_resumed_run_keeps_its_climatology_map(area_run, climatology_run, tmp_path, run_cli):
    from pipeline.checkpoint import read_checkpoint

    first = read_checkpoint(climatology_run / "ckpt" / "best.pth")
    result = run_cli("train", "--resume", climatology_run / "ckpt" / "model_epoch1.pth", "--epochs", "2",
                     "--checkpoint_dir", tmp_path / "ckpt", "--output_dir", tmp_path / "out")
    assert result.status == 0, result.err
    resumed = read_checkpoint(tmp_path / "ckpt" / "model_epoch2.pth")
    np.testing.assert_array_equal(resumed.maps["qs_climatology"], first.maps["qs_climatology"])
    assert resumed.state["train_config"]["climatology_map"] is True


def test_map_statistics_are_the_same_from_one_block_or_many(area_run):
    """A cube read in one block gives the statistics from that read; a larger one from
    normalisation_stats and map_stats: the same figures either way, maps in memory included."""
    from pipeline.cube import climatology_map, cube_dates, make_splits
    from pipeline.sampler import WindowSampler, WindowSpec, window_issues

    store = str(area_run / "qs.zarr")
    ds = open_cube(store)
    dates = cube_dates(ds)
    train = make_splits(dates[0], dates[-1])["train"]
    maps = {"qs_climatology": climatology_map(ds, train)}
    spec = WindowSpec(6, (1,), ("qs", "upstream_area", "qs_climatology"))
    issues = window_issues(ds, train, spec)
    one_block = WindowSampler(store, issues, spec, {}, maps=maps).fit_stats(train)
    many_blocks = WindowSampler(store, issues, spec, {}, maps=maps, block_bytes=2**16).fit_stats(train)
    for name in spec.inputs:
        for key in ("mean", "std", "rms"):
            assert one_block[name][key] == pytest.approx(many_blocks[name][key], rel=1e-4), (name, key)
