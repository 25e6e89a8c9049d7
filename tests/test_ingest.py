"""`runoff ingest`: the cube contract, appends, resume after SIGKILL, lock, bad input."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import xarray as xr
import zarr

from pipeline.cube import open_cube
from pipeline.errors import RunoffError
from pipeline.ingest import ensure_cube, ingest, store_lock
from pipeline.synth import write_series

from .conftest import one_error_line, tree_digest


def _day(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        raw = src.read(1)
        return np.where(raw == src.nodata, np.nan, raw).astype(np.float32)


def _assert_same_cube(a: Path, b: Path) -> None:
    da, db = (xr.open_zarr(p, decode_coords="all", consolidated=False) for p in (a, b))
    xr.testing.assert_identical(da.load(), db.load())
    assert da.attrs == db.attrs
    for name in da.variables:
        assert da[name].attrs == db[name].attrs, name


def test_round_trip_keeps_crs_transform_values_and_metadata(series_dir, tmp_path, run_cli):
    store = tmp_path / "qs.zarr"
    result = run_cli("ingest", series_dir, store)
    assert result.status == 0, result.err
    ds = xr.open_zarr(store, decode_coords="all")
    with rasterio.open(series_dir / "QS_20190105.tif") as src:
        assert ds.rio.crs == src.crs
        assert ds.rio.transform() == src.transform  # exact, not approximately
        assert ds.qs.rio.shape == src.shape
    assert ds.qs.dtype == np.float32 and ds.qs.dims == ("time", "y", "x")
    assert ds.qs.encoding["grid_mapping"] == "spatial_ref"
    assert ds.qs.attrs["units"] == "kg m-2" and ds.qs.attrs["long_name"]
    assert ds.qs.attrs["source_files"]["2019-01-05"] == "QS_20190105.tif"
    assert ds.sizes["time"] == 40 and (np.diff(ds.time.values) == np.timedelta64(1, "D")).all()
    np.testing.assert_array_equal(ds.qs.sel(time="2019-01-05").values, _day(series_dir / "QS_20190105.tif"))
    assert ds.attrs["missing_dates"] == []
    assert ds.qs.encoding["compressors"]  # compressed
    assert ds.y.values[0] > ds.y.values[-1]  # north-up, not flipped
    plain = xr.open_zarr(store)  # as a GIS user opens it, without decode_coords="all" (DESIGN.md's contract)
    with rasterio.open(series_dir / "QS_20190105.tif") as src:
        assert plain.rio.crs == src.crs and plain.qs.rio.crs == src.crs
        assert plain.rio.transform() == src.transform


def test_a_cube_that_xarray_appended_to_without_consolidating_opens(series_dir, tmp_path, run_cli):
    """``to_zarr(mode="a", consolidated=False)`` (a forecast added beside the rain with xarray)
    rewrites the group without its arrays' metadata: the cube still opens, the new variable in it."""
    store = tmp_path / "qs.zarr"
    assert run_cli("ingest", series_dir, store).status == 0
    ds = xr.open_zarr(store, decode_coords="all")
    doubled = (2 * ds.qs).to_dataset(name="doubled").drop_vars("spatial_ref")
    doubled.doubled.attrs = {"units": "kg m-2"}
    doubled.to_zarr(store, mode="a", consolidated=False)
    assert zarr.open_group(store, mode="r", use_consolidated=False).metadata.consolidated_metadata is None
    info = run_cli("info", store)
    assert info.status == 0 and "doubled float32" in info.out, info.err
    reopened = open_cube(store)
    np.testing.assert_array_equal(reopened.doubled[3].values, 2 * reopened.qs[3].values)


def test_cli_spellings_chunks_and_info(series_dir, tmp_path, run_cli):
    store = tmp_path / "qs.zarr"
    assert run_cli("ingest", series_dir, store, "--chunks", "time=8,y=16,x=16", "--long-name", "QS").status == 0
    ds = open_cube(store)
    assert ds.qs.encoding["chunks"] == (8, 16, 16) and ds.qs.attrs["long_name"] == "QS"
    info = run_cli("info", store)
    assert info.status == 0
    for word in ("time=40", "2019-01-01 .. 2019-02-09", "EPSG:2154", "missing     0", "chunks", "MB", "p99"):
        assert word in info.out


def test_info_p99_is_the_percentile_over_every_day_or_over_evenly_spaced_days_of_a_large_cube(
        series_dir, tmp_path, monkeypatch):
    """It once printed the maximum as the p99 of cubes over 5e7 cells."""
    from pipeline import cube

    store = tmp_path / "qs.zarr"
    ingest(series_dir, store)
    values = open_cube(store).qs.values

    def p99_line() -> str:
        return cube.describe_cube(store).splitlines()[-1]

    assert f"p99 {np.nanquantile(values, 0.99):.3g} " in p99_line()
    monkeypatch.setattr(cube, "P99_CELLS", 4 * values[0].size)  # a "large" cube: four days of forty
    line = p99_line()
    assert f"p99 (of 4 days) {np.nanquantile(values[[0, 13, 26, 39]], 0.99):.3g} " in line
    assert f"max {np.nanmax(values):.3g} " in line


def test_an_abbreviated_option_is_unknown_not_ambiguous(series_dir, tmp_path, run_cli):
    """``--long`` would be "ambiguous" between ``--long_name`` and ``--long-name``, one option."""
    result = run_cli("ingest", series_dir, tmp_path / "qs.zarr", "--long", "QS")
    assert result.status == 2 and "unrecognized arguments: --long QS" in one_error_line(result.err)
    assert not (tmp_path / "qs.zarr").exists()


def test_missing_days_are_nan_listed_and_warned(series_copy, tmp_path, run_cli):
    for day in ("20190110", "20190111"):
        (series_copy / f"QS_{day}.tif").unlink()
    result = run_cli("ingest", series_copy, tmp_path / "qs.zarr")
    assert result.status == 0
    assert "2 day(s) without a qs file" in result.err and "2019-01-10, 2019-01-11" in result.err
    ds = open_cube(tmp_path / "qs.zarr")
    assert ds.sizes["time"] == 40 and ds.attrs["missing_dates"] == ["2019-01-10", "2019-01-11"]
    assert np.isnan(ds.qs.sel(time="2019-01-10").values).all()


def test_a_forcings_missing_days_are_counted_warned_and_listed_by_info(tmp_path, run_cli):
    write_series(tmp_path / "in", days=12, height=16, width=16, seed=1, covariates=["rainf"])
    (tmp_path / "in" / "Rainf" / "RAINF_20190105.tif").unlink()
    result = run_cli("ingest", tmp_path / "in", tmp_path / "qs.zarr")
    assert result.status == 0, result.err
    assert "wrote 23 daily map(s)" in result.out and "0 missing (rainf 1 missing)" in result.out
    assert "1 day(s) without a rainf file" in result.err and "2019-01-05" in result.err
    info = run_cli("info", tmp_path / "qs.zarr").out
    assert "missing     0 day(s); rainf 1 day(s): 2019-01-05" in info


def test_appending_to_a_cube_written_before_variables_listed_spatial_ref_lets_it_open_plainly(
        series_dir, tmp_path, run_cli):
    staged, store = tmp_path / "staged", tmp_path / "qs.zarr"
    staged.mkdir()
    files = sorted(series_dir.glob("*.tif"))
    for f in files[:20]:
        shutil.copy(f, staged / f.name)
    assert run_cli("ingest", staged, store).status == 0
    del zarr.open_group(store, mode="r+")["qs"].attrs["coordinates"]  # as ingest wrote cubes until 2026-12-03
    zarr.consolidate_metadata(store)
    assert xr.open_zarr(store).rio.crs is None
    for f in files[20:]:
        shutil.copy(f, staged / f.name)
    assert run_cli("ingest", staged, store).status == 0
    with rasterio.open(files[0]) as src:
        assert xr.open_zarr(store).rio.crs == src.crs


def test_append_gap_fill_prepend_and_conflicts(series_dir, tmp_path, run_cli):
    full, part = tmp_path / "full.zarr", tmp_path / "part.zarr"
    assert run_cli("ingest", series_dir, full).status == 0
    staged = tmp_path / "staged"
    staged.mkdir()
    files = sorted(series_dir.glob("*.tif"))
    # middle days first, then later days with a gap, then the gap and earlier days
    for batch in (files[10:20], files[25:40], files[:10] + files[20:25]):
        for f in batch:
            shutil.copy(f, staged / f.name)
        result = run_cli("ingest", staged, part)
        assert result.status == 0, result.err
    assert "wrote 15 daily map(s), 25 already present" in result.out
    _assert_same_cube(full, part)

    again = run_cli("ingest", staged, part)
    assert "wrote 0 daily map(s), 40 already present" in again.out

    before = tree_digest(part)
    changed = staged / files[5].name
    with rasterio.open(changed, "r+") as dst:
        data = dst.read(1)
        data[data == 0] = 1.5
        dst.write(data, 1)
    conflict = run_cli("ingest", staged, part)
    assert conflict.status == 2 and "differ" in one_error_line(conflict.err) and "--overwrite" in conflict.err
    assert tree_digest(part) == before
    assert run_cli("ingest", staged, part, "--overwrite").status == 0
    np.testing.assert_array_equal(open_cube(part).qs.isel(time=5).values, _day(changed))


def test_several_variables_from_sub_folders(tmp_path, run_cli):
    write_series(tmp_path / "in", days=12, height=16, width=20, covariates=["rainf", "soilm"])
    result = run_cli("ingest", tmp_path / "in", tmp_path / "qs.zarr")
    assert result.status == 0, result.err
    ds = open_cube(tmp_path / "qs.zarr")
    assert set(ds.data_vars) == {"qs", "rainf", "soilm"}
    for name in ("qs", "rainf", "soilm"):
        assert ds[name].dims == ("time", "y", "x") and ds[name].encoding["grid_mapping"] == "spatial_ref"
    assert float(ds.rainf.max()) > float(ds.qs.max()) > 0


def _ingest_cmd(src: Path, store: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "ingest", str(src), str(store), "--chunks", "time=2"]


def test_sigkill_mid_ingest_then_resume_equals_uninterrupted(tmp_path):
    src = tmp_path / "in"
    write_series(src, days=300, height=96, width=120, seed=2)
    reference = tmp_path / "reference.zarr"
    assert subprocess.run(_ingest_cmd(src, reference), capture_output=True).returncode == 0

    store = tmp_path / "killed.zarr"
    start = time.monotonic()
    subprocess.run(_ingest_cmd(src, tmp_path / "timing.zarr"), capture_output=True, check=True)
    duration = time.monotonic() - start
    kills = 0
    for fraction in (0.55, 0.7, 0.85):  # kill repeatedly at different moments, resuming each time
        proc = subprocess.Popen(_ingest_cmd(src, store), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(duration * fraction)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 1, "ingest finished before any kill; the test did not interrupt it"
    final = subprocess.run(_ingest_cmd(src, store), capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    assert not list(tmp_path.glob("*.partial")) and not list(store.rglob("*.partial"))
    _assert_same_cube(reference, store)


def test_resumed_half_built_cube_drops_the_temp_files_of_cut_chunk_writes(series_dir, tmp_path, run_cli):
    # A kill during a fresh build leaves STORE.partial with the temp file of a chunk write that
    # zarr never renamed; the resumed run renames that folder into place, so it must clean it first.
    first_half = tmp_path / "first_half"
    first_half.mkdir()
    for path in sorted(series_dir.glob("*.tif"))[:20]:
        shutil.copy(path, first_half)
    store = tmp_path / "qs.zarr"
    assert run_cli("ingest", first_half, tmp_path / "built.zarr").status == 0
    half_built = tmp_path / "qs.zarr.partial"
    os.rename(tmp_path / "built.zarr", half_built)
    chunk = next(p for p in (half_built / "qs" / "c").rglob("*") if p.is_file())
    stray = chunk.with_name(f"{chunk.name}.5d41402abc4b2a76b9719d911017c592.partial")  # zarr's temp name
    stray.write_bytes(b"half a chunk")

    result = run_cli("ingest", series_dir, store)
    assert result.status == 0, result.err
    assert not half_built.exists() and not list(store.rglob("*.partial"))
    assert run_cli("ingest", series_dir, tmp_path / "reference.zarr").status == 0
    _assert_same_cube(tmp_path / "reference.zarr", store)


def test_second_writer_is_refused_by_the_lock(series_dir, tmp_path, run_cli):
    store = tmp_path / "qs.zarr"
    assert run_cli("ingest", series_dir, store).status == 0
    before = tree_digest(store)
    with store_lock(str(store)):
        result = run_cli("ingest", series_dir, store)
    assert result.status == 2 and "another ingest" in one_error_line(result.err)
    assert tree_digest(store) == before


def test_all_nan_day_is_kept_with_a_warning(series_copy, tmp_path, run_cli):
    path = series_copy / "QS_20190103.tif"
    with rasterio.open(path, "r+") as dst:
        dst.write(np.full(dst.shape, dst.nodata, np.float32), 1)
    result = run_cli("ingest", series_copy, tmp_path / "qs.zarr")
    assert result.status == 0 and "2019-01-03" in result.err and "no valid pixel" in result.err
    assert np.isnan(open_cube(tmp_path / "qs.zarr").qs.sel(time="2019-01-03").values).all()


def _profile(path: Path) -> dict:
    with rasterio.open(path) as src:
        return dict(src.profile), src.read(1)


def reference_nodata(path: Path) -> float:
    with rasterio.open(path) as src:
        return src.nodata


def test_nodata_option_masks_an_undeclared_fill_value(series_copy, tmp_path, run_cli):
    """A fill value the files do not declare is refused (above); ``--nodata`` names it."""
    fill = reference_nodata(series_copy / "QS_20190101.tif")
    for path in series_copy.glob("*.tif"):
        profile, data = _profile(path)
        with rasterio.open(path, "w", **{**profile, "nodata": None}) as dst:
            dst.write(np.where(data == fill, -9999, data), 1)
    result = run_cli("ingest", series_copy, tmp_path / "qs.zarr", "--nodata", "-9999")
    assert result.status == 0, result.err
    cube = open_cube(tmp_path / "qs.zarr").qs.sel(time="2019-01-01").values
    _, original = _profile(series_copy / "QS_20190101.tif")
    assert np.array_equal(np.isnan(cube), original == -9999) and np.isnan(cube).any()


def _bad_inputs(folder: Path, reference: Path) -> dict:
    """Each entry: a function that spoils ``folder`` and the words its error must contain."""
    def text_file():
        (folder / "QS_20190201.tif").write_text("not a raster")

    def truncated():
        data = reference.read_bytes()
        (folder / "QS_20190201.tif").write_bytes(data[: len(data) // 3])

    def write(name, **changes):
        profile, data = _profile(reference)
        profile.update(changes)
        count = profile["count"]
        with rasterio.open(folder / name, "w", **profile) as dst:
            dst.write(np.stack([data[: profile["height"], : profile["width"]]] * count))

    def shifted():
        profile, _ = _profile(reference)
        t = profile["transform"]
        write("QS_20190201.tif", transform=rasterio.Affine(t.a, t.b, t.c + t.a / 2, t.d, t.e, t.f))

    def undeclared_fill():
        profile, data = _profile(reference)
        profile.update(nodata=None)
        with rasterio.open(folder / "QS_20190201.tif", "w", **profile) as dst:
            dst.write(np.where(data == reference_nodata(reference), -9999, data), 1)

    return {
        "undeclared fill value": (undeclared_fill, ["QS_20190201.tif", "-9999, a fill value", "--nodata -9999"]),
        "text file named .tif": (text_file, ["QS_20190201.tif", "not a readable raster"]),
        "truncated TIFF": (truncated, ["QS_20190201.tif"]),
        "multi-band": (lambda: write("QS_20190201.tif", count=3), ["3 bands", "--band"]),
        "other CRS": (lambda: write("QS_20190201.tif", crs="EPSG:3035"), ["QS_20190201.tif", "EPSG:3035", "EPSG:2154"]),
        "other shape": (lambda: write("QS_20190201.tif", height=20), ["QS_20190201.tif", "20x40"]),
        "half-pixel shift": (shifted, ["QS_20190201.tif", "origin (600500"]),
        "no date": (lambda: write("runoff.tif"), ["runoff.tif", "no date"]),  # no TIFFTAG_DATETIME either
        "duplicate date": (lambda: shutil.copy(reference, folder / "QS_2019-01-05.tif"),
                           ["QS_20190105.tif", "QS_2019-01-05.tif", "2019-01-05"]),
        "PNG without georeferencing": (
            lambda: (write_series(folder / "png", days=1, height=32, width=40, start="2019-03-01", fmt="png"),
                     shutil.move(folder / "png" / "QS_20190301.png", folder / "QS_20190301.png"),
                     shutil.rmtree(folder / "png")),
            ["QS_20190301.png", "not georeferenced"]),
    }


@pytest.mark.parametrize("case", ["other CRS", "half-pixel shift", "side-car .aux.xml with another CRS",
                                  "text file named .tif", "truncated TIFF"])
def test_a_new_cube_refuses_an_unreadable_file_or_one_off_the_first_files_grid(case, series_copy, tmp_path, run_cli):
    reference = series_copy / "QS_20190105.tif"
    cases = _bad_inputs(series_copy, reference)
    cases["side-car .aux.xml with another CRS"] = (
        lambda: (series_copy / "QS_20190105.tif.aux.xml").write_text("<PAMDataset><SRS>EPSG:3035</SRS></PAMDataset>"),
        ["QS_20190105.tif", "EPSG:3035", "the first file"])
    spoil, words = cases[case]
    spoil()
    store = tmp_path / "qs.zarr"
    result = run_cli("ingest", series_copy, store)
    assert result.status == 2
    line = one_error_line(result.err)
    for word in words:
        assert word in line, (word, line)
    assert not store.exists() and not Path(f"{store}.partial").exists()


@pytest.mark.parametrize("case", list(_bad_inputs(Path("."), Path(".")).keys()))
def test_bad_input_is_one_line_exit_2_and_cube_unchanged(case, series_copy, tmp_path, run_cli):
    store = tmp_path / "qs.zarr"
    assert run_cli("ingest", series_copy, store).status == 0
    before = tree_digest(store)
    spoil, words = _bad_inputs(series_copy, series_copy / "QS_20190105.tif")[case]
    spoil()
    result = run_cli("ingest", series_copy, store, "--png_scale", "200")
    assert result.status == 2
    line = one_error_line(result.err)
    for word in words:
        assert word in line, (word, line)
    assert tree_digest(store) == before


def test_empty_folder_and_non_cube_store(tmp_path, series_dir, run_cli):
    (tmp_path / "empty").mkdir()
    result = run_cli("ingest", tmp_path / "empty", tmp_path / "qs.zarr")
    assert result.status == 2 and "no rasters or NetCDF/HDF5 files" in one_error_line(result.err)
    assert not (tmp_path / "qs.zarr").exists()

    not_cube = tmp_path / "notes"
    not_cube.mkdir()
    (not_cube / "keep.txt").write_text("mine")
    result = run_cli("ingest", series_dir, not_cube)
    assert result.status == 2 and "not a Zarr cube" in one_error_line(result.err)
    assert (not_cube / "keep.txt").read_text() == "mine" and len(list(not_cube.iterdir())) == 1

    result = run_cli("info", tmp_path / "nothing.zarr")
    assert result.status == 2 and "no such cube" in one_error_line(result.err)
    # input data given to info: the ingest command that makes a cube of it
    for given in (series_dir, series_dir / "QS_20190101.tif"):
        result = run_cli("info", given)
        assert result.status == 2
        assert f"make a cube of it: runoff ingest {series_dir} stores/input.zarr" in one_error_line(result.err)

    # NetCDF settings that rasters would silently ignore
    result = run_cli("ingest", series_dir, tmp_path / "qs.zarr", "--variable", "qs=Qs_acc", "--day_start", "6")
    assert result.status == 2 and "--variable, --day_start: NetCDF/HDF5 settings" in one_error_line(result.err)
    assert not (tmp_path / "qs.zarr").exists()


def test_multi_band_with_band_option(tmp_path, series_dir, run_cli):
    folder = tmp_path / "in"
    folder.mkdir()
    profile, data = _profile(series_dir / "QS_20190105.tif")
    profile.update(count=2)
    with rasterio.open(folder / "QS_20190105.tif", "w", **profile) as dst:
        dst.write(np.stack([data, data * 0 + 7]))
    assert run_cli("ingest", folder, tmp_path / "qs.zarr", "--band", "2").status == 0
    values = open_cube(tmp_path / "qs.zarr").qs.isel(time=0).values
    assert np.nanmax(values) == 7


def test_png_series_ingests_like_the_geotiffs(tmp_path, series_dir, run_cli):
    write_series(tmp_path / "png", days=40, height=32, width=40, seed=1, fmt="png")
    result = run_cli("ingest", tmp_path / "png", tmp_path / "png.zarr", "--crs", "EPSG:2154", "--png_scale", "200")
    assert result.status == 0, result.err
    assert run_cli("ingest", series_dir, tmp_path / "tif.zarr").status == 0
    png, tif = open_cube(tmp_path / "png.zarr"), open_cube(tmp_path / "tif.zarr")
    assert png.rio.transform() == tif.rio.transform() and png.rio.crs == tif.rio.crs
    assert float(abs(png.qs - tif.qs).max()) <= 200.0 / 65535


def test_python_api_returns_a_report(series_dir, tmp_path):
    report = ingest(series_dir, tmp_path / "qs.zarr")
    assert (report.written, report.skipped, report.variables) == (40, 0, ["qs"])
    assert os.path.isdir(tmp_path / "qs.zarr")


def test_fsspec_url_store_equals_local_store(series_dir, tmp_path):
    url = f"memory://{tmp_path.name}/qs.zarr"  # fsspec's in-process file system
    assert ingest(series_dir, url).written == 40
    assert ingest(series_dir, url).skipped == 40  # idempotent there too
    ingest(series_dir, tmp_path / "local.zarr")
    remote, local = open_cube(url), open_cube(tmp_path / "local.zarr")
    xr.testing.assert_identical(remote.load(), local.load())
    assert remote.rio.crs == local.rio.crs and remote.rio.transform() == local.rio.transform()


def _coarse_rain(folder, days, values):
    """Rain GeoTIFFs at twice the pixel size of the synthetic series' grid (same origin)."""
    from rasterio.transform import from_origin

    folder.mkdir(parents=True)
    for k, day in enumerate(days):
        with rasterio.open(folder / f"RAINF_{day:%Y%m%d}.tif", "w", driver="GTiff", height=values.shape[1],
                           width=values.shape[2], count=1, dtype="float32", crs="EPSG:2154", nodata=-9999.0,
                           transform=from_origin(600_000.0, 6_800_000.0, 2000.0, 2000.0)) as dst:
            dst.write(values[k], 1)


def test_resample_brings_a_coarser_forcing_onto_the_runoff_grid(tmp_path, run_cli):
    import datetime as dt

    write_series(tmp_path / "in" / "Qs", days=3, height=16, width=20, seed=2)
    days = [dt.date(2019, 1, 1) + dt.timedelta(days=i) for i in range(3)]
    coarse = np.arange(3 * 8 * 10, dtype=np.float32).reshape(3, 8, 10)
    _coarse_rain(tmp_path / "in" / "Rainf", days, coarse)
    refused = run_cli("ingest", tmp_path / "in", tmp_path / "no.zarr")
    assert refused.status == 2 and "RAINF_2019010" in one_error_line(refused.err)
    assert not (tmp_path / "no.zarr").exists()
    bad = run_cli("ingest", tmp_path / "in", tmp_path / "bad.zarr", "--resample", "cubic")
    assert bad.status == 2 and "--resample" in one_error_line(bad.err)
    done = run_cli("ingest", tmp_path / "in", tmp_path / "qs.zarr", "--resample", "nearest")
    assert done.status == 0, done.err
    ds = open_cube(tmp_path / "qs.zarr")
    rain = ds.rainf.values
    assert rain.shape == (3, 16, 20)
    np.testing.assert_array_equal(rain, np.repeat(np.repeat(coarse, 2, axis=1), 2, axis=2))
    assert ds.rainf.rio.transform() == ds.qs.rio.transform()


def test_a_pcraster_map_stack_is_dated_from_start_and_keeps_its_grid(tmp_path, run_cli):
    from rasterio.transform import from_origin

    stack = tmp_path / "stack"
    stack.mkdir()
    days = np.random.default_rng(0).gamma(0.5, 2.0, (3, 6, 8)).astype(np.float32)
    names = ["IW000000.001", "IW000000.002", "IW000000.003"]
    for name, values in zip(names, days):
        with rasterio.open(stack / name, "w", driver="PCRaster", height=6, width=8, count=1, dtype="float32",
                           transform=from_origin(500000, 4800000, 1000, 1000), PCRASTER_VALUESCALE="VS_SCALAR") as dst:
            dst.write(values, 1)
    store = tmp_path / "qs.zarr"
    undated = run_cli("ingest", stack, store, "--crs", "EPSG:32631")
    assert undated.status == 2 and "--start YYYY-MM-DD" in one_error_line(undated.err)
    assert not store.exists()
    result = run_cli("ingest", stack, store, "--crs", "EPSG:32631", "--start", "2001-03-01")
    assert result.status == 0, result.err
    ds = xr.open_zarr(store, decode_coords="all", consolidated=False)
    assert [str(d)[:10] for d in ds.time.values] == ["2001-03-01", "2001-03-02", "2001-03-03"]
    np.testing.assert_array_equal(ds.qs.values, days)
    assert tuple(ds.qs.rio.transform())[:6] == (1000.0, 0.0, 500000.0, 0.0, -1000.0, 4800000.0)
    assert ds.qs.rio.crs.to_epsg() == 32631 and ds.qs.attrs["source_files"]["2001-03-02"] == "IW000000.002"


@pytest.mark.parametrize("options, words", [(["--png_scale", "-1"], "--png_scale -1: the value of the largest"),
                                            (["--png_scale", "0"], "--png_scale 0:"),
                                            (["--band", "0"], "--band 0: bands count from 1")])
def test_impossible_read_options_are_one_line_and_write_nothing(options, words, series_dir, tmp_path, run_cli):
    result = run_cli("ingest", series_dir, tmp_path / "qs.zarr", *options)
    assert result.status == 2 and words in one_error_line(result.err)
    assert not (tmp_path / "qs.zarr").exists()


def test_a_folder_given_as_data_dir_gets_a_cube_no_other_folder_of_its_name_shares(tmp_path):
    write_series(tmp_path / "a" / "data", days=8, height=16, width=16, seed=1)
    write_series(tmp_path / "b" / "data", days=8, height=16, width=16, seed=2, start="2019-03-01")
    store = ensure_cube(tmp_path / "a" / "data", stores_dir=tmp_path / "stores")
    assert store == str(tmp_path / "stores" / "data.zarr")
    before = tree_digest(store)
    with pytest.raises(RunoffError, match=f"holds the days of {tmp_path / 'a' / 'data'}"):
        ensure_cube(tmp_path / "b" / "data", stores_dir=tmp_path / "stores")
    assert tree_digest(store) == before
    write_series(tmp_path / "more", days=9, height=16, width=16, seed=1)  # the next day arrives
    shutil.copy(tmp_path / "more" / "QS_20190109.tif", tmp_path / "a" / "data")
    assert ensure_cube(tmp_path / "a" / "data", stores_dir=tmp_path / "stores") == store
    assert open_cube(store).sizes["time"] == 9
