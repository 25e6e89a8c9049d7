"""Synthetic but physically plausible daily surface-runoff (QS) series.

The generator is a small land-surface model driven by moving rain cells:

* rain cells (Gaussian blobs) are born each day at a seasonal rate, live a few days,
  grow and decay, and drift with a prevailing wind, so rain has memory and motion;
* a soil store whose capacity varies smoothly in space fills with infiltrated rain
  and empties by evapotranspiration (stronger in summer) and drainage;
* runoff is the sum of infiltration excess (rain faster than the soil can take it)
  and saturation excess (rain on a full store).

So QS is zero on most pixels of most days, heavily skewed, spatially coherent and
persistent where soils stay wet, which is what a forecaster has to learn. Units are
kg m-2 per day (= mm per day). A smooth coastline masks a sea area as nodata.

Example
-------
>>> from pipeline.synth import write_series
>>> paths = write_series("data/input", days=30, height=64, width=80)  # doctest: +SKIP
"""

from __future__ import annotations

import datetime as dt
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import from_origin
from scipy.ndimage import gaussian_filter

from .errors import RunoffError
from .rasters import check_png_scale
from .storage import atomic_output

NODATA = -9999.0
PNG_NODATA = 65535
DEFAULT_PNG_SCALE = 200.0  # kg m-2 per day represented by the largest PNG code
COVARIATES = {"rainf": "Rainf", "rainf_fc": "Rainf_fc", "soilm": "SoilM"}
STATIC_MAPS = ("upstream_area",)  # river regime; written to static/, which runoff ingest reads as static maps
UNITS = {"qs": "kg m-2", "rainf": "kg m-2", "rainf_fc": "kg m-2", "soilm": "kg m-2", "upstream_area": "1"}
LONG_NAMES = {
    "qs": "storm surface runoff, daily accumulation",
    "rainf": "rainfall, daily accumulation",
    "rainf_fc": "rainfall forecast (the rain with a log-normal error, sigma 0.5), daily accumulation",
    "soilm": "soil moisture store",
    "upstream_area": "upstream area, cells draining through the cell (itself included)",
}
FORECAST_ERROR = 0.5  # sigma of the log-normal error of rainf_fc


@dataclass(frozen=True)
class Day:
    """One simulated day: runoff, rain, soil moisture and an imperfect forecast of the rain,
    NaN over the sea."""

    date: dt.date
    qs: np.ndarray
    rainf: np.ndarray
    soilm: np.ndarray
    rainf_fc: np.ndarray


def _smooth01(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    field = gaussian_filter(rng.standard_normal(shape), sigma=scale, mode="wrap")
    field -= field.min()
    return field / max(field.max(), 1e-12)


REGIMES = ("cells", "river")


def _drainage(rng: np.random.Generator, shape: tuple[int, int], scale: float, sea: np.ndarray):
    """A river network on a random terrain tilted towards the east: the sparse operator that
    sums each cell's own and every upstream cell's water (D8 flow on a pit-filled surface,
    priority flood from the edges and the sea), and the upstream area of each cell."""
    import heapq

    from scipy.sparse import csc_matrix, identity
    from scipy.sparse.linalg import splu

    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    terrain = 0.6 * _smooth01(rng, shape, scale) + 0.4 * _smooth01(rng, shape, scale / 3) + 0.8 * (1 - xx / w)
    filled = np.full(shape, np.inf)
    queue = []
    for y, x in zip(*np.nonzero(sea | (xx == w - 1) | (yy == 0) | (yy == h - 1))):
        filled[y, x] = terrain[y, x]
        heapq.heappush(queue, (terrain[y, x], int(y), int(x)))
    down = np.full(h * w, -1)
    while queue:  # every cell drains to the neighbour it was reached from: a tree, no pits
        z, y, x = heapq.heappop(queue)
        for dy, dx in ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)):
            ny, nx = y + dy, x + dx
            if 0 <= ny < h and 0 <= nx < w and filled[ny, nx] == np.inf:
                filled[ny, nx] = max(terrain[ny, nx], z + 1e-6)
                down[ny * w + nx] = y * w + x
                heapq.heappush(queue, (filled[ny, nx], ny, nx))
    cells = np.flatnonzero(down >= 0)
    links = csc_matrix((np.ones(cells.size), (down[cells], cells)), shape=(h * w, h * w))
    accumulate = splu(csc_matrix(identity(h * w) - links))  # (I - D) acc = local water
    area = accumulate.solve(np.ones(h * w)).reshape(shape)
    return accumulate, area


@dataclass(frozen=True)
class _Landscape:
    sea: np.ndarray  # bool: masked as nodata
    capacity: np.ndarray  # mm, of the soil store
    infiltration: np.ndarray  # mm/day
    accumulate: object = None  # river regime: the factorised operator of _drainage
    area: np.ndarray | None = None  # river regime: upstream area in cells, the cell included


def _landscape(rng: np.random.Generator, shape: tuple[int, int], regime: str) -> _Landscape:
    """The fixed maps of a simulation, the first draws of its random stream."""
    height, width = shape
    scale = max(height, width) / 12
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    coast = xx / width + 0.35 * _smooth01(rng, shape, scale) - 0.12 * yy / height
    sea = coast < np.quantile(coast, 0.12)  # a smooth western coastline, 12% of the grid
    capacity = (40 + 110 * _smooth01(rng, shape, scale)).astype(np.float32)   # mm
    infiltration = (12 + 30 * _smooth01(rng, shape, scale)).astype(np.float32)  # mm/day
    if regime != "river":
        return _Landscape(sea, capacity, infiltration)
    return _Landscape(sea, capacity, infiltration, *_drainage(rng, shape, scale, sea))


def upstream_area(height: int = 128, width: int = 160, seed: int = 0) -> np.ndarray:
    """The river regime's upstream area (cells draining through each cell, itself included;
    NaN over the sea): the flow accumulation a GIS derives from a DEM, as a static map of
    :func:`simulate`'s landscape for the same grid and ``seed``.

    >>> area = upstream_area(48, 64)
    >>> bool(np.nanmin(area) >= 1), bool(np.nanmax(area) > 100)
    (True, True)
    """
    land = _landscape(np.random.default_rng(seed), (height, width), "river")
    return np.where(land.sea, np.nan, land.area).astype(np.float32)


def simulate(days: int = 730, height: int = 128, width: int = 160, seed: int = 0,
             start: dt.date = dt.date(2019, 1, 1), spin_up: int = 60, regime: str = "cells") -> Iterator[Day]:
    """Yield ``days`` consecutive simulated days, deterministically for ``seed``.

    ``regime="cells"``: runoff where the rain falls (infiltration and saturation excess).
    ``regime="river"``: that runoff, plus the water of every upstream cell, drains along a
    river network through a slow linear store (recession 0.9 a day), so that the rivers
    carry 100x the hillslopes' runoff, maps persist from day to day, most cells stay dry,
    and each day still answers to that day's rain.

    ``rainf_fc`` is what a weather model might have forecast: the rain times a smooth
    log-normal error field (sigma ``FORECAST_ERROR``, mean 1), drawn from its own random
    stream so that the other variables do not depend on it.
    """
    _check_series(days, height, width, regime)
    rng, forecast_rng = np.random.default_rng(seed), np.random.default_rng([seed, 1])
    shape = (height, width)
    scale = max(height, width) / 12
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    land = _landscape(rng, shape, regime)
    sea, capacity, infiltration = land.sea, land.capacity, land.infiltration
    store = 0.5 * capacity
    if regime == "river":
        accumulate, area = land.accumulate, land.area
        river = area >= 30  # cells draining at least 30 others
        channel = np.zeros(shape, np.float32)  # water in the river store, per cell
    wind = np.array([0.6, 2.5]) * max(height, width) / 160  # (dy, dx) pixels per day
    cells: list[np.ndarray] = []  # y, x, radius, peak, age, lifetime, vy, vx
    for i in range(-spin_up, days):
        date = start + dt.timedelta(days=i)
        season = np.cos(2 * np.pi * (date.timetuple().tm_yday - 330) / 365.25)
        for _ in range(rng.poisson(0.8 * (1 + 0.7 * season))):
            # born anywhere, or upwind of the domain so that weather drifts in
            y0 = rng.uniform(-0.2, 1.0) * height
            x0 = rng.uniform(-0.4, 1.0) * width
            cells.append(np.array([
                y0, x0, rng.uniform(0.04, 0.13) * max(height, width), rng.gamma(2.0, 11.0),
                0, 1 + rng.poisson(2.5), wind[0] + rng.normal(0, 0.8), wind[1] + rng.normal(0, 1.0)]))
        rain = np.zeros(shape, np.float32)
        alive = []
        for c in cells:
            y, x, radius, peak, age, life, vy, vx = c
            strength = peak * np.sin(np.pi * (age + 0.5) / (life + 1))
            r = radius * (1 + 0.15 * age)
            rain += (strength * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * r * r))).astype(np.float32)
            c[0] += vy
            c[1] += vx
            c[4] += 1
            if c[4] <= c[5]:
                alive.append(c)
        cells = alive
        rain[rain < 0.5] = 0.0
        infiltration_excess = np.maximum(rain - infiltration, 0)
        store = store + (rain - infiltration_excess)
        saturation_excess = np.maximum(store - capacity, 0)
        store = store - saturation_excess
        evap = (1.0 + 2.5 * (1 - season) / 2) * store / capacity
        store = np.maximum(store - evap - 0.02 * store, 0)
        runoff = infiltration_excess + saturation_excess
        if regime == "river":
            inflow = accumulate.solve(np.where(sea, 0.0, runoff).ravel().astype(np.float64)).reshape(shape)
            channel = 0.9 * channel + 0.1 * inflow  # linear store: recession 0.9 a day
            runoff = np.where(river, channel / area ** 0.3, runoff)  # rivers carry a share of their basin
        if i < 0:
            continue
        error = gaussian_filter(forecast_rng.standard_normal(shape), sigma=scale / 2, mode="wrap")
        error *= FORECAST_ERROR / max(error.std(), 1e-12)
        forecast = rain * np.exp(error - FORECAST_ERROR ** 2 / 2)
        yield Day(date, *(np.where(sea, np.nan, a).astype(np.float32) for a in (runoff, rain, store, forecast)))


def _check_series(days: int, height: int, width: int, regime: str) -> None:
    """One clear error for a series that cannot be simulated."""
    if days < 1 or height < 8 or width < 8:
        raise RunoffError("synth: need --days >= 1 and a grid of at least 8x8 pixels")
    if regime not in REGIMES:
        raise RunoffError(f"--regime {regime!r}: choose {' or '.join(REGIMES)}")


def default_transform(crs: CRS, height: int, width: int):
    """A plausible north-up grid: 1 km cells in France for projected CRSs, 0.01 deg otherwise."""
    if crs.is_geographic:
        return from_origin(-1.5, 48.5, 0.01, 0.01)
    return from_origin(600_000.0, 6_800_000.0, 1000.0, 1000.0)


def _write_tif(path: Path, values: np.ndarray, crs: CRS, transform, name: str, date: dt.date | None) -> None:
    data = np.where(np.isnan(values), NODATA, values).astype(np.float32)
    profile = dict(driver="GTiff", height=data.shape[0], width=data.shape[1], count=1,
                   dtype="float32", crs=crs, transform=transform, nodata=NODATA,
                   compress="deflate", predictor=3, tiled=True, blockxsize=256, blockysize=256)
    if data.shape[0] < 256 or data.shape[1] < 256:
        profile.update(tiled=False, blockysize=min(16, data.shape[0]))
        del profile["blockxsize"]
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data, 1)
        dst.update_tags(units=UNITS[name], long_name=LONG_NAMES[name],
                        **({} if date is None else {"TIFFTAG_DATETIME": date.strftime("%Y:%m:%d 00:00:00")}))
        dst.set_band_description(1, name)
        dst.units = (UNITS[name],)


def _write_png(path: Path, world_path: Path, values: np.ndarray, transform, png_scale: float) -> None:
    codes = np.clip(np.round(values / png_scale * 65535), 0, 65534)
    codes = np.where(np.isnan(values), PNG_NODATA, codes).astype(np.uint16)
    with rasterio.Env(GDAL_PAM_ENABLED="NO"), warnings.catch_warnings():
        # georeferencing goes into the world file only, so rasterio's warning is expected
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", driver="PNG", height=codes.shape[0], width=codes.shape[1],
                           count=1, dtype="uint16", nodata=PNG_NODATA) as dst:
            dst.write(codes, 1)
    a, _, c, _, e, f = tuple(transform)[:6]
    # world file: pixel size x, rotations, pixel size y, centre of the top-left pixel
    world_path.write_text(f"{a!r}\n0.0\n0.0\n{e!r}\n{c + a / 2!r}\n{f + e / 2!r}\n")


def write_series(out_dir: str | Path, days: int = 730, height: int = 128, width: int = 160,
                 crs: str = "EPSG:2154", seed: int = 0, start: str | dt.date = "2019-01-01",
                 fmt: str = "tif", covariates: Sequence[str] = (),
                 png_scale: float = DEFAULT_PNG_SCALE, progress: bool = False, regime: str = "cells") -> list[Path]:
    """Write one raster per day, ``QS_YYYYMMDD.tif`` (or ``.png`` with a ``.pgw`` world file).

    With ``covariates`` (``rainf``, ``rainf_fc``, ``soilm``) each variable gets its own
    sub-folder (``Qs/``, ``Rainf/``, ``Rainf_fc/``, ``SoilM/``), the layout ``runoff ingest``
    reads as one multi-variable cube; ``upstream_area`` (river regime) is a static map,
    ``static/upstream_area.tif``. ``regime``: see :func:`simulate`. Returns the QS file paths.
    """
    check_png_scale(png_scale)
    _check_series(days, height, width, regime)  # before any folder is made
    try:
        start_date = dt.date.fromisoformat(str(start))
    except ValueError:
        raise RunoffError(f"--start {start!r}: expected a date YYYY-MM-DD") from None
    try:
        crs_obj = CRS.from_user_input(crs)
    except Exception:
        raise RunoffError(f"--crs {crs!r}: not a CRS that PROJ knows") from None
    unknown = set(covariates) - set(COVARIATES) - set(STATIC_MAPS)
    if unknown:
        raise RunoffError(f"--covariates {','.join(sorted(unknown))}: unknown; choose from "
                          f"{','.join([*COVARIATES, *STATIC_MAPS])}")
    static = [name for name in covariates if name in STATIC_MAPS]
    if static and regime != "river":
        raise RunoffError(f"--covariates {','.join(static)}: only the river regime has a river network (--regime river)")
    if static and fmt != "tif":
        raise RunoffError(f"--covariates {','.join(static)}: static maps are written as GeoTIFF only (--format tif)")
    covariates = [name for name in covariates if name not in STATIC_MAPS]
    if fmt not in ("tif", "png"):
        raise RunoffError(f"--format {fmt!r}: choose tif or png")
    out = Path(out_dir)
    folders = {"qs": out / "Qs" if covariates or static else out}
    folders.update({name: out / COVARIATES[name] for name in covariates})
    try:
        for folder in [*folders.values(), *([out / "static"] if static else [])]:
            folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunoffError(f"{out}: cannot create the output folder ({exc.strerror})") from None
    transform = default_transform(crs_obj, height, width)
    for name in static:
        with atomic_output(out / "static" / f"{name}.tif") as tmp:
            _write_tif(tmp, upstream_area(height, width, seed), crs_obj, transform, name, None)
    series = simulate(days, height, width, seed, start_date, regime=regime)
    if progress:
        from tqdm import tqdm
        series = tqdm(series, total=days, unit="day", desc="synth")
    written = []
    for day in series:
        for name, folder in folders.items():
            stem = f"{'QS' if name == 'qs' else COVARIATES[name].upper()}_{day.date:%Y%m%d}"
            path = folder / f"{stem}.{fmt}"
            values = getattr(day, name)
            if fmt == "png":  # the world file lands first: a PNG under its name is georeferenced
                with atomic_output(path) as tmp, atomic_output(path.with_suffix(".pgw")) as world:
                    _write_png(tmp, world, values, transform, png_scale)
            else:
                with atomic_output(path) as tmp:
                    _write_tif(tmp, values, crs_obj, transform, name, day.date)
            if name == "qs":
                written.append(path)
    return written


# File layouts of land-surface-model output (see pipeline.netcdf): name pattern, hours per
# step, variable, units, where the stamp lies in its interval, and how lat/lon are written.
LSM_LAYOUTS = {
    "gldas": dict(hours=3, variable="Qs_acc", units="kg m-2", stamp="end", coords="1d-ascending",
                  name="GLDAS_NOAH025_3H.A{:%Y%m%d.%H%M}.021.nc4"),
    "nldas": dict(hours=1, variable="Qs", units="kg m-2", stamp="start", coords="1d-ascending",
                  name="NLDAS_NOAH0125_H.A{:%Y%m%d.%H%M}.002.nc"),
    "lis": dict(hours=1, variable="Qs_tavg", units="kg m-2 s-1", stamp="end", coords="2d-float32",
                name="LIS_HIST_{:%Y%m%d%H%M}.d01.nc"),
    "multi": dict(hours=6, variable="runoff", units="mm", stamp="start", coords="1d-descending",
                  name="run_{:%Y}.nc"),
}


@dataclass
class LsmSteps:
    """What :func:`write_lsm_files` wrote: the files, each step's interval start (UTC), the
    values per step ``(steps, height, width)``, north-up (NaN outside the land mask), and the
    cell-centre latitudes (descending) and longitudes of that north-up grid."""

    paths: list[Path]
    starts: np.ndarray
    values: np.ndarray
    lat: np.ndarray
    lon: np.ndarray


def write_lsm_files(out_dir: str | Path, layout: str, days: int = 3, height: int = 12, width: int = 16,
                    start: str = "2010-12-30", seed: int = 0, resolution: float = 0.25,
                    origin: tuple[float, float] = (-100.0, 45.0)) -> LsmSteps:
    """Write sub-daily runoff as a land-surface model publishes it (``LSM_LAYOUTS``): one
    NetCDF file per step (GLDAS, NLDAS, LIS) or one file with every step (``multi``:
    6-hourly, time in float days since 0001-01-01 with ``time_bnds``, like VIC).

    ``origin`` is the (lon, lat) of the grid's north-west corner.

    >>> steps = write_lsm_files("data/gldas", "gldas", days=2)   # doctest: +SKIP
    >>> len(steps.paths), steps.values.shape                     # doctest: +SKIP
    (16, (16, 12, 16))
    """
    import netCDF4

    spec = LSM_LAYOUTS[layout]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    step = np.timedelta64(spec["hours"], "h")
    n = days * 24 // spec["hours"]
    starts = np.datetime64(start, "h") + np.arange(n) * step
    amounts = rng.gamma(0.4, 2.0, (n, height, width)).astype(np.float32)  # kg m-2 per step
    amounts[:, : height // 4, : width // 3] = np.nan  # a masked corner (sea)
    values = amounts / np.float32(spec["hours"] * 3600) if spec["units"].endswith("s-1") else amounts
    lat = origin[1] - (np.arange(height) + 0.5) * resolution
    lon = origin[0] + (np.arange(width) + 0.5) * resolution
    stamps = starts + (step if spec["stamp"] == "end" else np.timedelta64(0, "h"))

    def write(path: Path, index: slice) -> None:
        with netCDF4.Dataset(path, "w") as ds:
            ds.Conventions = "CF-1.8"
            dims = _lsm_coordinates(ds, spec["coords"], lat, lon)
            fill = np.float32(-9999.0)
            if layout != "lis":
                ds.createDimension("time", None)
                time = ds.createVariable("time", "f8", ("time",))
                time.standard_name, time.calendar = "time", "proleptic_gregorian"
                time.units = "days since 0001-01-01 00:00:00" if layout == "multi" else "hours since 2000-01-01"
                reference = np.datetime64("0001-01-01" if layout == "multi" else "2000-01-01", "s")
                unit = np.timedelta64(1, "D" if layout == "multi" else "h")
                time[:] = (stamps[index] - reference) / unit
                if layout == "multi":
                    time.bounds = "time_bnds"
                    ds.createDimension("nv", 2)
                    bounds = ds.createVariable("time_bnds", "f8", ("time", "nv"))
                    bounds[:] = np.stack([starts[index], starts[index] + step], axis=1).astype("datetime64[s]") \
                        .__sub__(reference) / unit
                dims = ("time", *dims)
            var = ds.createVariable(spec["variable"], "f4", dims, fill_value=fill, zlib=True)
            var.units, var.long_name = spec["units"], "storm surface runoff"
            block = values[index]
            if spec["coords"] != "1d-descending":
                block = block[:, ::-1]  # these files store latitude ascending
            block = np.where(np.isnan(block), fill, block)
            var[:] = block if layout != "lis" else block[0]

    if layout == "multi":
        paths = [out / spec["name"].format(starts[0].astype(dt.datetime))]
        write(paths[0], slice(None))
    else:
        paths = [out / spec["name"].format(s.astype(dt.datetime)) for s in stamps]
        for i, path in enumerate(paths):
            write(path, slice(i, i + 1))
    return LsmSteps(paths, starts, values, lat, lon)


def _lsm_coordinates(ds, how: str, lat: np.ndarray, lon: np.ndarray) -> tuple[str, str]:
    """Write lat/lon as the layout does; return the variable's spatial dimensions."""
    if how == "2d-float32":  # NASA LIS: 2-D float32 lat/lon, latitude ascending
        ds.createDimension("north_south", len(lat))
        ds.createDimension("east_west", len(lon))
        lat2, lon2 = np.meshgrid(lat[::-1], lon, indexing="ij")
        for name, values, units in (("lat", lat2, "degrees_north"), ("lon", lon2, "degrees_east")):
            var = ds.createVariable(name, "f4", ("north_south", "east_west"))
            var.units, var.standard_name = units, "latitude" if name == "lat" else "longitude"
            var[:] = values.astype(np.float32)
        return ("north_south", "east_west")
    ds.createDimension("lat", len(lat))
    ds.createDimension("lon", len(lon))
    for name, values, units in (("lat", lat if how == "1d-descending" else lat[::-1], "degrees_north"),
                                ("lon", lon, "degrees_east")):
        var = ds.createVariable(name, "f4" if name == "lon" else "f8", (name,))
        var.units, var.standard_name = units, "latitude" if name == "lat" else "longitude"
        var[:] = values
    return ("lat", "lon")
