"""`runoff ingest` on NetCDF files as land-surface models publish them: GLDAS-like 3-hourly
files, LIS-like hourly files with 2-D float32 lat/lon and a rate, one multi-year file in
float days since 0001-01-01; daily sums and means, the grid, missing steps, bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import netCDF4
import numpy as np
import pytest
import rioxarray  # noqa: F401
import xarray as xr
from rasterio.crs import CRS

from pipeline.synth import write_lsm_files

from .conftest import one_error_line, tree_digest


def _daily(steps, per_step: float = 1.0, how: str = "sum") -> dict[str, np.ndarray]:
    """numpy's daily totals (or means) of the steps, by the day their interval starts in."""
    days = steps.starts.astype("datetime64[D]")
    out = {}
    for day in np.unique(days):
        block = steps.values[days == day].astype(np.float64) * per_step
        out[str(day)] = block.sum(0) if how == "sum" else block.mean(0)
    return out


def _open(store: Path) -> xr.Dataset:
    return xr.open_zarr(store, decode_coords="all", consolidated=False)


def _assert_grid(ds: xr.Dataset, steps, resolution: float = 0.25) -> None:
    """The cube's transform is exactly the one the coordinates imply, north up."""
    transform = ds.qs.rio.transform()
    west, north = steps.lon[0] - resolution / 2, steps.lat[0] + resolution / 2
    assert tuple(transform)[:6] == (resolution, 0.0, west, 0.0, -resolution, north)
    assert ds.qs.rio.crs == CRS.from_epsg(4326)
    np.testing.assert_allclose(ds.y.values, steps.lat)
    np.testing.assert_allclose(ds.x.values, steps.lon)


def test_gldas_3_hourly_files_sum_to_days_on_the_grid_of_their_coordinates(tmp_path, run_cli):
    steps = write_lsm_files(tmp_path / "gldas", "gldas", days=3, seed=1)
    store = tmp_path / "qs.zarr"
    result = run_cli("ingest", tmp_path / "gldas", store, "--variable", "Qs_acc")
    assert result.status == 0, result.err
    assert "wrote 3 daily map(s)" in result.out and "EPSG:4326" in result.err  # no grid_mapping: said so
    ds = _open(store)
    _assert_grid(ds, steps)
    truth = _daily(steps)
    for day, expected in truth.items():
        np.testing.assert_allclose(ds.qs.sel(time=day).values, expected, rtol=1e-6, equal_nan=True)
    # the 03:00 file holds 00:00-03:00 and the next day's 00:00 file holds 21:00-24:00
    sources = ds.qs.attrs["source_files"]["2010-12-30"]
    assert sources.startswith("GLDAS_NOAH025_3H.A20101230.0300.021.nc4[0]")
    assert sources.endswith("GLDAS_NOAH025_3H.A20101231.0000.021.nc4[0]") and sources.count("nc4") == 8
    assert ds.qs.attrs["units"] == "kg m-2" and ds.qs.attrs["source_variable"] == "Qs_acc"
    assert ds.qs.attrs["aggregation"] == "sum of 8 steps of 3 h"
    assert ds.rio.crs == CRS.from_epsg(4326)  # the rio round trip: CRS and transform from the cube alone

    again = run_cli("ingest", tmp_path / "gldas", store, "--variable", "Qs_acc")
    assert again.status == 0 and "wrote 0 daily map(s), 3 already present" in again.out


def test_a_day_with_a_missing_step_is_a_missing_day_with_its_reason(tmp_path, run_cli):
    steps = write_lsm_files(tmp_path / "gldas", "gldas", days=3, seed=2)
    lost = steps.paths[8 + 5]  # the sixth 3-hour step of 2010-12-31
    lost.unlink()
    store = tmp_path / "qs.zarr"
    result = run_cli("ingest", tmp_path / "gldas", store)
    assert result.status == 0, result.err
    assert lost.name == "GLDAS_NOAH025_3H.A20101231.1800.021.nc4"
    assert "2010-12-31: 7 of 8 3-hourly steps (missing 2010-12-31T18:00)" in result.err
    ds = _open(store)
    assert ds.attrs["missing_dates"] == ["2010-12-31"]
    assert ds.qs.attrs["missing_reasons"]["2010-12-31"].startswith("7 of 8 3-hourly steps (missing 2010-12-31T18:00")
    assert np.isnan(ds.qs.sel(time="2010-12-31").values).all()
    np.testing.assert_allclose(ds.qs.sel(time="2011-01-01").values, _daily(steps)["2011-01-01"], rtol=1e-6)

    write_lsm_files(tmp_path / "again", "gldas", days=3, seed=2)  # the step arrives later: the day is filled
    shutil.copy(tmp_path / "again" / lost.name, lost)
    filled = run_cli("ingest", tmp_path / "gldas", store)
    assert filled.status == 0 and "wrote 1 daily map(s)" in filled.out
    ds = _open(store)
    assert ds.attrs["missing_dates"] == [] and ds.qs.attrs["missing_reasons"] == {}
    np.testing.assert_allclose(ds.qs.sel(time="2010-12-31").values, _daily(steps)["2010-12-31"], rtol=1e-6,
                               equal_nan=True)


def test_lis_hourly_rates_with_2d_float32_lat_lon_average_to_kg_per_day(tmp_path, run_cli):
    steps = write_lsm_files(tmp_path / "lis", "lis", days=2, seed=3, resolution=0.01, origin=(-97.13, 38.52))
    with netCDF4.Dataset(steps.paths[0]) as ds:  # float32 coordinates do wobble
        assert np.abs(ds["lon"][0].astype(np.float64) - steps.lon).max() > 1e-7
    store = tmp_path / "qs.zarr"
    result = run_cli("ingest", tmp_path / "lis", store, "--units", "kg m-2")
    assert result.status == 0, result.err
    ds = _open(store)
    _assert_grid(ds, steps, resolution=0.01)
    # a mean rate in kg m-2 s-1 times 86400 s is the day's amount in kg m-2
    for day, expected in _daily(steps, per_step=86400.0, how="mean").items():
        np.testing.assert_allclose(ds.qs.sel(time=day).values, expected, rtol=1e-5, equal_nan=True)
    assert ds.qs.attrs["units"] == "kg m-2" and ds.qs.attrs["aggregation"] == "mean of 24 steps of 1 h"

    kept = tmp_path / "kept.zarr"  # without --units the rate is averaged and kept as a rate
    assert run_cli("ingest", tmp_path / "lis", kept).status == 0
    rate = _open(kept)
    assert rate.qs.attrs["units"] == "kg m-2 s-1"
    np.testing.assert_allclose(rate.qs.values * 86400, ds.qs.values, rtol=1e-5)


@pytest.mark.parametrize("calendar", ["proleptic_gregorian", "standard"])
def test_a_multi_year_file_in_days_since_year_1_matches_xarray(tmp_path, run_cli, calendar):
    steps = write_lsm_files(tmp_path / "run", "multi", days=5, seed=4, start="2003-02-26")
    with netCDF4.Dataset(steps.paths[0], "r+") as ds:  # the calendar decides which dates those are
        ds["time"].calendar = ds["time_bnds"].calendar = calendar
    store = tmp_path / "qs.zarr"
    result = run_cli("ingest", steps.paths[0], store, "--day_start", "0")
    assert result.status == 0, result.err
    cube = _open(store)
    expected = xr.open_dataset(steps.paths[0]).runoff.resample(time="1D").sum(skipna=False)
    assert [str(d)[:10] for d in cube.time.values] == [str(d)[:10] for d in expected.time.values]
    if calendar == "standard":  # the mixed Julian/Gregorian calendar puts year 1 two days apart
        assert str(cube.time.values[0])[:10] == "2003-02-24"
    np.testing.assert_allclose(cube.qs.values, expected.values, rtol=1e-6, equal_nan=True)
    assert cube.qs.attrs["source_files"][str(cube.time.values[1])[:10]] == "run_2003.nc[4:8]"
    _assert_grid(cube, steps)


def test_subfolders_per_variable_and_a_day_start(tmp_path, run_cli):
    write_lsm_files(tmp_path / "in" / "Qs", "gldas", days=3, seed=5)
    rain = write_lsm_files(tmp_path / "in" / "Rainf", "gldas", days=3, seed=6)
    store = tmp_path / "qs.zarr"
    result = run_cli("ingest", tmp_path / "in", store, "--day_start", "6")
    assert result.status == 0, result.err
    ds = _open(store)
    assert set(ds.data_vars) == {"qs", "rainf"}
    # days from 06 to 06 UTC: the first day lacks its first two steps, the last its last six
    assert ds.attrs["missing_dates"] == ["2010-12-29", "2011-01-01"]
    starts = rain.starts - np.timedelta64(6, "h")
    day = starts.astype("datetime64[D]") == np.datetime64("2010-12-30")
    np.testing.assert_allclose(ds.rainf.sel(time="2010-12-30").values, rain.values[day].sum(0), rtol=1e-6,
                               equal_nan=True)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _change_grid(path: Path) -> None:
    with netCDF4.Dataset(path, "r+") as ds:
        ds["lon"][:] = ds["lon"][:] + 0.5


def _irregular(path: Path) -> None:
    with netCDF4.Dataset(path, "r+") as ds:
        lat = ds["lat"][:]
        lat[-1] += 0.1
        ds["lat"][:] = lat


def _bad_time(path: Path) -> None:
    with netCDF4.Dataset(path, "r+") as ds:
        ds["time"].units = "fortnights since the flood"


def _duplicate_hour(path: Path) -> None:
    copy = path.with_name(path.name.replace(".021.", ".022."))
    shutil.copy(path, copy)
    with netCDF4.Dataset(copy, "r+") as ds:
        ds["Qs_acc"][0, 5, 5] = 123.0


def _drop_variable(path: Path) -> None:
    with netCDF4.Dataset(path, "r+") as ds:
        ds.renameVariable("Qs_acc", "Qsb_acc")


@pytest.mark.parametrize("damage, option, words", [
    (_truncate, (), "not a readable NetCDF/HDF5 file"),
    (_drop_variable, (), "no variable 'Qs_acc'"),
    (_change_grid, (), "differs from the first file"),
    (_irregular, (), "not regularly spaced"),
    (_bad_time, (), "time coordinate cannot be decoded"),
    (_duplicate_hour, (), "differs from the same step in"),
    (None, ("--variable", "Rainf"), "no variable 'Rainf'"),
    (None, ("--units", "furlongs"), "--units 'furlongs'"),
])
def test_bad_netcdf_input_is_one_line_naming_it_and_the_cube_is_unchanged(tmp_path, run_cli, damage, option, words):
    steps = write_lsm_files(tmp_path / "in", "gldas", days=2, seed=7)
    store = tmp_path / "qs.zarr"
    first = write_lsm_files(tmp_path / "first", "gldas", days=2, seed=7, start="2010-12-20")
    assert run_cli("ingest", tmp_path / "first", store).status == 0
    before = tree_digest(store)
    victim = steps.paths[3]
    if damage is not None:
        damage(victim)
    result = run_cli("ingest", tmp_path / "in", store, *option)
    assert result.status == 2
    line = one_error_line("\n".join(x for x in result.err.splitlines() if "warning" not in x))
    assert words in line, line
    if damage is not None:
        assert victim.name in line
    assert tree_digest(store) == before
    assert first.paths  # the cube still holds the first batch only


def test_an_undeclared_fill_value_is_refused_and_nodata_masks_it(tmp_path, run_cli):
    steps = write_lsm_files(tmp_path / "in", "gldas", days=2, seed=3)
    assert run_cli("ingest", tmp_path / "in", tmp_path / "clean.zarr").status == 0
    clean = _open(tmp_path / "clean.zarr").qs.values
    row, col = np.argwhere(np.isfinite(steps.values[3]))[0]
    with netCDF4.Dataset(steps.paths[3], "r+") as ds:
        ds["Qs_acc"][0, row, col] = 1e20  # a fill value, not the variable's _FillValue
    store = tmp_path / "qs.zarr"
    refused = run_cli("ingest", tmp_path / "in", store)
    assert refused.status == 2 and not store.exists()
    line = one_error_line("\n".join(x for x in refused.err.splitlines() if "warning" not in x))
    assert steps.paths[3].name in line and "1 cell(s) hold 1e+20" in line and "--nodata 1e+20" in line, line
    assert run_cli("ingest", tmp_path / "in", store, "--nodata", "1e+20").status == 0
    masked = _open(store).qs.values
    changed = np.argwhere(np.isnan(masked) != np.isnan(clean))
    assert len(changed) == 1  # that cell of its day, and nothing else
    np.testing.assert_array_equal(np.where(np.isnan(masked), np.nan, clean), masked)


def test_the_only_candidate_variable_is_chosen_and_several_are_listed(tmp_path, run_cli):
    steps = write_lsm_files(tmp_path / "in", "multi", days=2, seed=8)
    with netCDF4.Dataset(steps.paths[0], "r+") as ds:
        extra = ds.createVariable("Rainf", "f4", ("time", "lat", "lon"))
        extra[:] = np.ones(extra.shape, np.float32)
    result = run_cli("ingest", tmp_path / "in", tmp_path / "qs.zarr")
    assert result.status == 2
    assert "--variable NAME (candidates: runoff, Rainf)" in one_error_line(result.err)
    both = run_cli("ingest", tmp_path / "in", tmp_path / "qs.zarr", "--variable", "qs=runoff,rainf=Rainf")
    assert both.status == 0, both.err
    assert set(_open(tmp_path / "qs.zarr").data_vars) == {"qs", "rainf"}


def test_one_file_per_variable_without_variable_asks_for_their_names(tmp_path, run_cli):
    steps = write_lsm_files(tmp_path / "in", "multi", days=2, seed=8)  # run_2010.nc: runoff
    rain = xr.open_dataset(steps.paths[0]).rename(runoff="Rainf")
    rain.to_netcdf(tmp_path / "in" / "prec_2010.nc")  # read first: the rain alone, as CWatM writes it
    result = run_cli("ingest", tmp_path / "in", tmp_path / "qs.zarr")
    assert result.status == 2
    line = one_error_line(result.err)
    assert "run_2010.nc: no variable 'Rainf' (taken as qs from the first file, prec_2010.nc" in line
    assert "--variable qs=NAME" in line and not (tmp_path / "qs.zarr").exists()
    both = run_cli("ingest", tmp_path / "in", tmp_path / "qs.zarr", "--variable", "qs=runoff,rainf=Rainf")
    assert both.status == 0, both.err


def test_aggregate_on_daily_data_is_a_note_not_an_error(tmp_path, run_cli):
    steps = write_lsm_files(tmp_path / "in", "multi", days=4, seed=9)
    daily = tmp_path / "daily.nc"
    xr.open_dataset(steps.paths[0]).drop_vars("time_bnds").runoff.resample(time="1D").sum(skipna=False) \
        .to_dataset().to_netcdf(daily)
    result = run_cli("ingest", daily, tmp_path / "qs.zarr", "--aggregate", "sum")
    assert result.status == 0, result.err
    assert "already daily; --aggregate sum has no effect" in result.err
    cube = _open(tmp_path / "qs.zarr")
    assert cube.sizes["time"] == 4 and cube.qs.attrs["aggregation"] == "daily values as published"


def test_nldas_hours_are_stamped_at_their_start_and_stamp_overrides(tmp_path, run_cli):
    steps = write_lsm_files(tmp_path / "in", "nldas", days=2, seed=10)
    assert steps.paths[0].name == "NLDAS_NOAH0125_H.A20101230.0000.002.nc"
    result = run_cli("ingest", tmp_path / "in", tmp_path / "qs.zarr")
    assert result.status == 0, result.err
    cube = _open(tmp_path / "qs.zarr")
    for day, expected in _daily(steps).items():
        np.testing.assert_allclose(cube.qs.sel(time=day).values, expected, rtol=1e-6, equal_nan=True)
    # read as stamped at the end, the 00:00 file belongs to the day before, which is then incomplete
    shifted = run_cli("ingest", tmp_path / "in", tmp_path / "end.zarr", "--stamp", "end")
    assert shifted.status == 0 and "2010-12-29: 1 of 24 1-hourly steps" in shifted.err


@pytest.mark.parametrize("unit, per_metre", [("m", 1.0), ("km", 0.001)])
def test_projected_x_y_with_a_cf_grid_mapping_and_packed_integers(tmp_path, run_cli, unit, per_metre):
    """Coordinates in metres or in km (as regional models write them) give the same grid."""
    import pyproj

    path = tmp_path / "utm.nc"
    x = 500_000 + 250.0 * (np.arange(6) + 0.5)
    y = 5_200_000 + 250.0 * (np.arange(5) + 0.5)  # ascending northings: the cube flips them north up
    values = np.random.default_rng(11).uniform(0, 30, (2, 5, 6))
    with netCDF4.Dataset(path, "w") as ds:
        ds.createDimension("time", 2)
        ds.createDimension("y", 5)
        ds.createDimension("x", 6)
        t = ds.createVariable("time", "i4", ("time",))
        t.units, t.calendar = "days since 2020-06-01", "standard"
        t[:] = [0, 1]
        for name, coords in (("y", y), ("x", x)):
            var = ds.createVariable(name, "f8", (name,))
            var.units, var.standard_name = unit, f"projection_{name}_coordinate"
            var[:] = coords * per_metre
        crs = ds.createVariable("transverse_mercator", "i4")
        cf = pyproj.CRS.from_epsg(32633).to_cf()
        cf.pop("crs_wkt")  # the CF parameters alone must do
        crs.setncatts(cf)
        qs = ds.createVariable("qs", "i2", ("time", "y", "x"), fill_value=np.int16(-32767))
        qs.scale_factor, qs.add_offset, qs.units = 0.01, 0.0, "kg m-2"
        qs.grid_mapping = "transverse_mercator"
        qs[:] = values
        qs[0, 0, 0] = np.ma.masked
    store = tmp_path / "qs.zarr"
    result = run_cli("ingest", path, store)
    assert result.status == 0, result.err
    cube = _open(store)
    assert cube.qs.rio.crs.to_epsg() == 32633
    assert tuple(cube.qs.rio.transform())[:6] == (250.0, 0.0, 500_000.0, 0.0, -250.0, 5_201_250.0)
    expected = np.round(values[:, ::-1] / 0.01) * 0.01
    expected[0, -1, 0] = np.nan  # the masked cell, at the bottom once north up
    np.testing.assert_allclose(cube.qs.values, expected, atol=1e-5)


_LAMBERT = "+proj=lcc +lat_1=30 +lat_2=60 +lat_0=38.5 +lon_0=-97.5 +R=6370000 +units=m +no_defs"


def _lambert_lis_files(folder: Path, declare: bool) -> tuple[np.ndarray, np.ndarray]:
    """A day of LIS-like hourly files on a 3 km Lambert conformal grid: 2-D float32 lat/lon
    (rows south to north), a rate whose southern row is marked; with ``declare``, LIS's
    global attributes name the projection. Returns the files' lat and lon."""
    import pyproj

    crs = pyproj.CRS.from_proj4(_LAMBERT)
    x, y = np.meshgrid(-600_000 + 3000.0 * np.arange(9), -300_000 + 3000.0 * np.arange(7))
    lon, lat = pyproj.Transformer.from_crs(crs, crs.geodetic_crs, always_xy=True).transform(x, y)
    folder.mkdir()
    for hour in range(1, 25):
        with netCDF4.Dataset(folder / f"LIS_HIST_20101231{hour:02d}00.d01.nc" if hour < 24
                             else folder / "LIS_HIST_201101010000.d01.nc", "w") as ds:
            ds.createDimension("north_south", 7)
            ds.createDimension("east_west", 9)
            for name, values, units in (("lat", lat, "degrees_north"), ("lon", lon, "degrees_east")):
                var = ds.createVariable(name, "f4", ("north_south", "east_west"))
                var[:], var.units = values, units
            qs = ds.createVariable("Qs_tavg", "f4", ("north_south", "east_west"), fill_value=np.float32(-9999))
            qs.units = "kg m-2 s-1"
            qs[:] = np.where(np.arange(7)[:, None] == 0, 1e-4, 1e-5) * np.ones((7, 9))
            if declare:
                ds.setncatts({"MAP_PROJECTION": "LAMBERT CONFORMAL", "TRUELAT1": 30.0, "TRUELAT2": 60.0,
                              "STANDARD_LON": -97.5, "DX": 3.0, "DY": 3.0})
    return lat, lon


@pytest.mark.parametrize("declare", [False, True])
def test_a_lambert_grid_of_2d_lat_lon_is_placed_by_its_projection(tmp_path, run_cli, declare):
    import pyproj

    lat, lon = _lambert_lis_files(tmp_path / "lis", declare)
    store = tmp_path / "qs.zarr"
    args = ("ingest", tmp_path / "lis", store, "--units", "kg m-2")
    if not declare:
        refused = run_cli(*args)
        assert refused.status == 2 and "pass --crs with the projection" in one_error_line(refused.err)
        wrong = run_cli(*args, "--crs", "EPSG:32614")
        assert wrong.status == 2 and "do not form a regular grid in 'EPSG:32614' either" in one_error_line(wrong.err)
    result = run_cli(*args) if declare else run_cli(*args, "--crs", _LAMBERT)
    assert result.status == 0, result.err
    cube = _open(store)
    # 3 km cells (to float32 lat/lon's precision), north up; with LIS's attributes, DX sets the sphere
    assert cube.rio.transform().a == pytest.approx(3000.0, abs=0.05)
    assert cube.rio.transform().e == pytest.approx(-3000.0, abs=0.05)
    # every cell, taken back to lat/lon through the cube's own CRS, is the file's cell (north up)
    crs = pyproj.CRS.from_wkt(cube.rio.crs.to_wkt())
    x, y = np.meshgrid(cube.x.values, cube.y.values)
    back_lon, back_lat = pyproj.Transformer.from_crs(crs, crs.geodetic_crs, always_xy=True).transform(x, y)
    np.testing.assert_allclose(back_lat, lat[::-1], atol=1e-4)
    np.testing.assert_allclose(back_lon, lon[::-1], atol=1e-4)
    day = cube.qs.sel(time="2010-12-31").values  # the mean rate x 86400
    np.testing.assert_allclose(day[-1], 8.64, rtol=1e-5)
    np.testing.assert_allclose(day[:-1], 0.864, rtol=1e-5)


def test_a_time_coordinate_that_disagrees_with_the_file_name_is_named_in_a_warning(tmp_path, run_cli):
    steps = write_lsm_files(tmp_path / "in", "gldas", days=1, seed=12)
    with netCDF4.Dataset(steps.paths[2], "r+") as ds:  # a wrong reference date in one file
        ds["time"].units = "hours since 2000-01-03"
    result = run_cli("ingest", tmp_path / "in", tmp_path / "qs.zarr")
    assert f"{steps.paths[2]}: its time coordinate decodes to" in result.err and "check the file's time units" \
        in result.err


def test_a_forcing_on_a_coarser_grid_is_resampled_onto_the_runoff_grid_or_refused(tmp_path, run_cli):
    write_lsm_files(tmp_path / "in" / "Qs", "gldas", days=2, seed=13, height=12, width=16, resolution=0.25)
    rain = write_lsm_files(tmp_path / "in" / "Rainf", "gldas", days=2, seed=14, height=6, width=8, resolution=0.5)
    refused = run_cli("ingest", tmp_path / "in", tmp_path / "no.zarr")
    assert refused.status == 2 and "differs from the first file" in one_error_line(
        "\n".join(x for x in refused.err.splitlines() if "warning" not in x))
    assert not (tmp_path / "no.zarr").exists()
    result = run_cli("ingest", tmp_path / "in", tmp_path / "qs.zarr", "--resample", "nearest")
    assert result.status == 0, result.err
    cube = _open(tmp_path / "qs.zarr")
    assert cube.rainf.shape == cube.qs.shape == (2, 12, 16)
    # nearest: each 0.5-degree cell covers 2x2 cells of the 0.25-degree grid
    coarse_day = _daily(rain)["2010-12-30"]
    np.testing.assert_allclose(cube.rainf.sel(time="2010-12-30").values, np.kron(coarse_day, np.ones((2, 2))),
                               rtol=1e-6, equal_nan=True)
