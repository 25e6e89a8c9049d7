"""Finding rasters, parsing dates, reading GeoTIFF and PNG days."""

import datetime as dt

import numpy as np
import pytest
import rasterio

from pipeline.errors import RunoffError
from pipeline.rasters import (ReadOptions, find_rasters, georeferencing_key, list_days, parse_date, read_grid,
                              read_raster)
from pipeline.synth import write_series


@pytest.mark.parametrize("name, expected", [
    ("QS_20210314.tif", dt.date(2021, 3, 14)),
    ("qs-2021-03-14.TIFF", dt.date(2021, 3, 14)),
    ("qs_2021_03_14.png", dt.date(2021, 3, 14)),
    ("GLDAS_NOAH025_D.A2021073.tif", dt.date(2021, 3, 14)),
    ("QS_20211399.tif", None),
    ("runoff.tif", None),
])
def test_parse_date_patterns(name, expected):
    assert parse_date(name) == expected


def test_parse_date_with_format():
    assert parse_date("qs-14.03.2021.tif", "%d.%m.%Y") == dt.date(2021, 3, 14)
    assert parse_date("qs-14.03.2021.tif") is None


def test_find_rasters_any_case_and_skips_others(tmp_path):
    for name in ["a_20200101.TIF", "b_20200102.tiff", "c_20200103.PnG", "notes.txt", ".hidden_20200104.tif"]:
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in find_rasters(tmp_path)] == ["a_20200101.TIF", "b_20200102.tiff", "c_20200103.PnG"]


def test_date_from_tiff_tag_when_name_has_none(series_copy):
    src = series_copy / "QS_20190103.tif"
    src.rename(series_copy / "runoff_day.tif")
    days = list_days(series_copy)
    assert dt.date(2019, 1, 3) in [d.date for d in days]


def test_geotiff_nodata_becomes_nan(series_dir):
    path = series_dir / "QS_20190101.tif"
    values, grid, attrs = read_raster(path)
    with rasterio.open(path) as src:
        raw = src.read(1)
        assert grid.crs == src.crs and grid.affine == src.transform
    assert values.dtype == np.float32
    assert np.array_equal(np.isnan(values), raw == src.nodata)
    assert np.isnan(values).any() and attrs["units"] == "kg m-2"


def test_packed_geotiff_is_unpacked_by_its_scale_and_offset(series_dir, tmp_path):
    """int16 products store round(value / scale): the cube must hold the values, not the codes."""
    source = series_dir / "QS_20190101.tif"
    truth, grid, _ = read_raster(source)
    codes = np.where(np.isnan(truth), -32768, np.round((truth - 0.5) / 0.01)).astype("int16")
    with rasterio.open(source) as src:
        profile = dict(src.profile, dtype="int16", nodata=-32768)
    packed = tmp_path / "QS_20190101.tif"
    with rasterio.open(packed, "w", **profile) as dst:
        dst.write(codes, 1)
        dst.scales, dst.offsets = (0.01,), (0.5,)
    for known in (None, grid):
        values, _, _ = read_raster(packed, grid=known)
        assert np.array_equal(np.isnan(values), np.isnan(truth))
        assert np.nanmax(np.abs(values - truth)) <= 0.005 + 1e-4  # half a code


def test_png_scaled_with_world_file_and_crs(tmp_path, series_dir):
    write_series(tmp_path, days=2, height=32, width=40, seed=1, fmt="png", png_scale=200.0)
    png = tmp_path / "QS_20190101.png"
    assert png.with_suffix(".pgw").exists()
    with pytest.raises(RunoffError, match="--png_scale"):
        read_raster(png, ReadOptions(crs="EPSG:2154"))
    with pytest.raises(RunoffError, match="no CRS"):
        read_raster(png, ReadOptions(png_scale=200.0))
    values, grid, _ = read_raster(png, ReadOptions(png_scale=200.0, crs="EPSG:2154"))
    tif_values, tif_grid, _ = read_raster(series_dir / "QS_20190101.tif")
    assert grid.matches(tif_grid)
    assert np.array_equal(np.isnan(values), np.isnan(tif_values))
    assert np.nanmax(np.abs(values - tif_values)) <= 200.0 / 65535  # one PNG code


def test_colour_png_is_refused_as_a_picture_not_values(tmp_path):
    path = tmp_path / "QS_20190101.png"
    with pytest.warns(rasterio.errors.NotGeoreferencedWarning), \
            rasterio.open(path, "w", driver="PNG", height=8, width=8, count=3, dtype="uint8") as dst:
        dst.write(np.zeros((3, 8, 8), "uint8"))
    with pytest.raises(RunoffError, match="3 bands; choose one with --band N .*colours of a rendered map"):
        read_raster(path, ReadOptions(png_scale=1.0, crs="EPSG:2154"))


def test_png_without_world_file_needs_like(tmp_path, series_dir):
    write_series(tmp_path, days=1, height=32, width=40, seed=1, fmt="png")
    png = tmp_path / "QS_20190101.png"
    png.with_suffix(".pgw").unlink()
    with pytest.raises(RunoffError, match="not georeferenced"):
        read_grid(png, ReadOptions(png_scale=200.0, crs="EPSG:2154"))
    like = ReadOptions(png_scale=200.0, like=str(series_dir / "QS_20190101.tif"))
    assert read_grid(png, like).matches(read_grid(series_dir / "QS_20190101.tif"))


def _rewrite(source, target, **changes):
    """A copy of ``source`` with some of its profile changed (CRS, transform, size, BigTIFF)."""
    with rasterio.open(source) as src:
        profile, data = dict(src.profile), src.read(1)
    profile.update(changes)
    with rasterio.open(target, "w", **profile) as dst:
        dst.write(data[: profile["height"], : profile["width"]], 1)
    return target


def test_georeferencing_key_tells_grids_apart(series_dir, tmp_path):
    day1, day2 = series_dir / "QS_20190101.tif", series_dir / "QS_20190102.tif"
    key = georeferencing_key(day1)
    assert key is not None and georeferencing_key(day2) == key  # other values, same grid
    with rasterio.open(day1) as src:
        t = src.transform
    others = {
        "other CRS": _rewrite(day1, tmp_path / "crs.tif", crs="EPSG:3035"),
        "half-pixel shift": _rewrite(day1, tmp_path / "shift.tif",
                                     transform=rasterio.Affine(t.a, t.b, t.c + t.a / 2, t.d, t.e, t.f)),
        "other shape": _rewrite(day1, tmp_path / "shape.tif", height=20),
        "BigTIFF": _rewrite(day1, tmp_path / "big.tif", BIGTIFF="YES"),
    }
    for name, path in others.items():
        assert georeferencing_key(path) not in (None, key), name
    # where the tags alone do not decide the grid, there is no key
    (tmp_path / "text.tif").write_text("not a raster")
    # a BigTIFF header whose directory claims 2**62 entries
    (tmp_path / "damaged.tif").write_bytes(b"II+\x00\x08\x00\x00\x00" + (16).to_bytes(8, "little")
                                           + (2**62).to_bytes(8, "little"))
    aux = _rewrite(day1, tmp_path / "aux.tif")
    (tmp_path / "aux.tif.aux.xml").write_text("<PAMDataset><SRS>EPSG:4326</SRS></PAMDataset>")
    no_crs = _rewrite(day1, tmp_path / "no_crs.tif", crs=None)
    write_series(tmp_path / "png", days=1, height=32, width=40, fmt="png", png_scale=200.0)
    for path in (tmp_path / "text.tif", tmp_path / "damaged.tif", aux, no_crs, tmp_path / "png" / "QS_20190101.png", tmp_path / "absent.tif"):
        assert georeferencing_key(path) is None, path.name


def test_read_with_a_known_grid_equals_the_full_read(series_dir, tmp_path):
    for path in (series_dir / "QS_20190103.tif", _rewrite(series_dir / "QS_20190103.tif", tmp_path / "big.tif",
                                                          BIGTIFF="YES")):
        values, grid, attrs = read_raster(path)
        known = read_raster(path, grid=grid)
        assert np.array_equal(known[0], values, equal_nan=True) and known[1] is grid and known[2] == attrs
