"""NetCDF/HDF5 files of land-surface models -> daily maps, ready for :func:`pipeline.ingest.ingest`.

GLDAS and NLDAS publish one file per 3-hourly or hourly step, NASA LIS one history file
per output step (2-D ``lat``/``lon``, no time dimension), VIC and CWatM one file holding
a whole run. :func:`open_netcdf_source` reads every file's header once (variable, time,
coordinates), decides which steps make which day, and returns one :class:`NetcdfDay`
per complete day: a small picklable reader that opens its files, sums or averages its
steps and writes the day onto the cube's north-up grid.

Conventions
-----------
* Time comes from the file's CF time coordinate, decoded by xarray (units and calendar
  honoured), or from the file name (``A20101231.0300``, ``YYYYMMDDhhmm``, ``YYYYMMDD``)
  when the file has none.
* A step covers an interval: its ``time_bnds`` where the file has them; otherwise the stamp
  marks the *end* of the interval for sub-daily steps (GLDAS and LIS stamp their
  accumulations and averages so; NLDAS stamps the start of its hour, and its files are
  recognised by name) and the day itself for daily steps; ``stamp`` overrides.
  A step belongs to the day its interval's middle lies in, days starting at ``day_start``
  hours UTC.
* A day lacking any of its steps is not summed short: it is a missing day, with the reason.
* Accumulations (kg m-2, mm, m per step) are summed, everything else (rates such as
  kg m-2 s-1, instantaneous states) averaged, unless ``aggregate`` says otherwise.
  ``units="kg m-2"`` converts water amounts and rates into kg m-2 per day.

Example
-------
>>> source = open_netcdf_source("data/gldas", NetcdfOptions(variables={"qs": "Qs_acc"}))  # doctest: +SKIP
>>> values = np.empty(source.grid.shape, np.float32)                                     # doctest: +SKIP
>>> source.days["qs"][0](values)                                                         # doctest: +SKIP
'GLDAS_NOAH025_3H.A20101231.0300.021.nc4, ...'
"""

from __future__ import annotations

import contextlib
import datetime as dt
import glob
import hashlib
import multiprocessing
import os
import re
import sys
import threading
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .cube import TARGET
from .errors import RunoffError, RunoffWarning, first_line
from .rasters import Grid, grid_error, refuse_undeclared_fill, resample_onto

NETCDF_SUFFIXES = (".nc", ".nc4", ".netcdf", ".cdf", ".h5", ".hdf5", ".he5")
AGGREGATIONS = ("sum", "mean")
STAMPS = ("auto", "start", "middle", "end")
_DAY = np.timedelta64(86400, "s")

# File-name stamps, tried in order: GLDAS/NLDAS "A20101231.0300", LIS "201012310300", a date.
_NAME_STAMPS = (
    (re.compile(r"A(\d{8})\.(\d{4})(?!\d)"), "%Y%m%d%H%M"),
    (re.compile(r"(?<!\d)(\d{12})(?!\d)"), "%Y%m%d%H%M"),
    (re.compile(r"(?<!\d)(\d{8})(?!\d)"), "%Y%m%d"),
)
_STAMPS_AT_START = ("NLDAS_",)  # products whose sub-daily stamps mark the start of the interval
_LATITUDE = ("lat", "latitude", "nav_lat", "y", "rlat", "northing")
_LONGITUDE = ("lon", "longitude", "nav_lon", "x", "rlon", "easting")

# Water amounts per step in kg m-2, and rates in kg m-2 s-1 (1 mm of water = 1 kg m-2).
_AMOUNTS = {"kgm-2": 1.0, "kg/m2": 1.0, "kg/m^2": 1.0, "kgm^-2": 1.0, "mm": 1.0, "m": 1000.0}
_RATES = {"kgm-2s-1": 1.0, "kg/m2/s": 1.0, "kg/m^2/s": 1.0, "kgm^-2s^-1": 1.0, "mms-1": 1.0, "mm/s": 1.0,
          "ms-1": 1000.0, "m/s": 1000.0}


@dataclass(frozen=True)
class NetcdfOptions:
    """How to turn the files into days.

    ``variables``: cube variable -> variable in the files (``{"qs": "Qs_acc"}``); None picks
    the only variable with time and two spatial dimensions. ``aggregate``: sum or mean (default
    from the units). ``day_start``: hour (UTC) at which a day begins. ``stamp``: which end of
    its interval a step's time marks (auto: ``time_bnds``, else see the module notes).
    ``units``: units to store (``"kg m-2"`` converts amounts and rates to kg m-2 per day).
    ``crs``: CRS overriding the file's grid mapping. ``nodata``: a value (as read, after
    the file's scale and offset) that marks no data besides the variable's ``_FillValue``.
    """

    variables: dict[str, str] | None = None
    aggregate: str | None = None
    day_start: int = 0
    stamp: str = "auto"
    units: str | None = None
    crs: str | None = None
    nodata: float | None = None


@dataclass(frozen=True)
class _Layout:
    """How a file's (y, x) plane maps onto the north-up cube grid."""

    transpose: bool = False  # the variable's dimensions are (x, y)
    flip_y: bool = False     # latitude ascends with the row
    flip_x: bool = False     # longitude descends with the column


@dataclass(frozen=True)
class NetcdfDay:
    """One day: the steps (file, time indices) that make it and how to combine them.

    Called with a float32 array of the cube grid's shape, it fills it and returns the
    day's provenance (``file[indices], ...``) for the cube's ``source_files``.
    """

    date: dt.date
    variable: str
    steps: tuple[tuple[str, tuple[int, ...]], ...]
    how: str
    factor: float
    layout: _Layout
    resample: tuple[Grid, Grid, str] | None = None  # (file grid, cube grid, method)
    nodata: float | None = None  # NetcdfOptions.nodata

    @property
    def source(self) -> str:
        return ", ".join(_step_label(path, indices) for path, indices in self.steps)

    def __call__(self, out: np.ndarray) -> str:
        total, count = None, 0
        for path, indices in self.steps:
            block = _read_steps(path, self.variable, indices)
            if self.nodata is not None:
                block[block == self.nodata] = np.nan
            refuse_undeclared_fill(_step_label(path, indices), block)
            if total is None:
                total = np.zeros(block.shape[1:], np.float64)
            for step in block:  # NaN (masked) in any step stays NaN
                np.add(total, step, out=total)
            count += len(block)
        total *= self.factor / (count if self.how == "mean" else 1)
        values = total
        if self.layout.transpose:
            values = values.T
        values = values[::-1 if self.layout.flip_y else 1, ::-1 if self.layout.flip_x else 1]
        if self.resample is None:
            if out.shape != values.shape:
                raise RunoffError(f"{self.source}: {values.shape[0]}x{values.shape[1]} cells, "
                                  f"expected {out.shape[0]}x{out.shape[1]}")
            out[...] = values
        else:
            file_grid, grid, method = self.resample
            resample_onto(values.astype(np.float32), file_grid, grid, method, out)
        return ", ".join(_step_label(Path(path).name, indices) for path, indices in self.steps)


@dataclass
class NetcdfSource:
    """What ingest needs from a set of NetCDF files: the grid, the days per cube variable, their
    attributes, and the days that could not be made, with the reason (``{"qs": {"2010-12-31":
    "7 of 8 3-hourly steps"}}``)."""

    grid: Grid
    days: dict[str, list[NetcdfDay]]
    attrs: dict[str, dict]
    incomplete: dict[str, dict[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Step:
    path: str
    index: int
    stamp: np.datetime64
    bounds: tuple[np.datetime64, np.datetime64] | None


@dataclass(frozen=True)
class _FileScan:
    """One variable of one file, from its header: dimensions, attributes, time, coordinates."""

    path: str
    variable: str
    shape: tuple[int, ...]
    attrs: dict
    stamps: np.ndarray | _CfTime            # datetime64[s], one per step (CF values until decoded)
    bounds: np.ndarray | _CfTime | None     # datetime64[s], (steps, 2)
    coords_key: str


@dataclass(frozen=True)
class _CfTime:
    """CF time values as the file holds them; decoded for many files at once (see _decode_scans)."""

    values: np.ndarray
    units: str
    calendar: str


def is_netcdf(path: str | Path) -> bool:
    """True for a NetCDF/HDF5 file, a glob of them, or a folder holding them (or sub-folders that do).

    >>> is_netcdf("runs/VIC_streaminputs.nc")
    True
    """
    text = str(path)
    if any(c in text for c in "*?["):
        return any(p.lower().endswith(NETCDF_SUFFIXES) for p in glob.glob(text))
    p = Path(text)
    if p.suffix.lower() in NETCDF_SUFFIXES:
        return True
    if not p.is_dir():
        return False
    return bool(_netcdf_files(p)) or any(_netcdf_files(s) for s in p.iterdir() if s.is_dir())


def _netcdf_files(folder: Path) -> list[Path]:
    with os.scandir(folder) as entries:
        return sorted(folder / e.name for e in entries if not e.name.startswith(".")
                      and e.name.lower().endswith(NETCDF_SUFFIXES) and e.is_file())


def parse_variables(text: str | None) -> dict[str, str] | None:
    """``--variable``: ``Qs_acc`` (the runoff) or ``qs=sum_runoff,rainf=Precipitation``.

    >>> parse_variables("qs=sum_runoff,rainf=Precipitation")
    {'qs': 'sum_runoff', 'rainf': 'Precipitation'}
    """
    if not text:
        return None
    mapping = {}
    for part in text.split(","):
        name, eq, variable = part.strip().rpartition("=")
        if not eq:
            name, variable = TARGET, part.strip()
        if not variable or not re.fullmatch(r"[a-z][a-z0-9_]*", name.strip() or TARGET):
            raise RunoffError(f"--variable {text!r}: expected NAME or qs=NAME,rainf=NAME2 "
                              f"(cube names lower-case letters, digits and _)")
        mapping[name.strip() or TARGET] = variable
    if TARGET not in mapping:
        raise RunoffError(f"--variable {text!r}: name the runoff variable, e.g. qs={next(iter(mapping.values()))}")
    return mapping


def _file_groups(source: str | Path) -> dict[str, list[Path]] | list[Path]:
    """The files: one list (each file may hold several of the wanted variables) or, for a
    folder of sub-folders, one list per cube variable named after its sub-folder."""
    text = str(source)
    if any(c in text for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(text) if p.lower().endswith(NETCDF_SUFFIXES))
        if not files:
            raise RunoffError(f"{text}: no NetCDF/HDF5 files match this pattern")
        return files
    path = Path(text)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise RunoffError(f"{path}: no such file or folder")
    files = _netcdf_files(path)
    if files:
        return files
    groups = {s.name.lower(): _netcdf_files(s) for s in sorted(path.iterdir()) if s.is_dir()}
    groups = {name: files for name, files in groups.items() if files}
    if not groups:
        raise RunoffError(f"{path}: no {', '.join(NETCDF_SUFFIXES)} files here or in its sub-folders")
    if TARGET not in groups:
        raise RunoffError(f"{path}: sub-folders {', '.join(groups)} hold no Qs/ folder (the forecast target)")
    return groups


def _dataset(path: str):
    import netCDF4

    try:
        return netCDF4.Dataset(path)
    except (OSError, RuntimeError, ValueError) as exc:
        raise RunoffError(f"{path}: not a readable NetCDF/HDF5 file ({first_line(exc)})") from None


def _time_dim(ds, var) -> str | None:
    """The variable's time dimension: a dimension whose coordinate is CF time (or is named so)."""
    for dim in var.dimensions:
        coord = ds.variables.get(dim)
        if dim.lower() in ("time", "t") or (coord is not None and (" since " in str(getattr(coord, "units", ""))
                                                                  or getattr(coord, "axis", "") == "T")):
            return dim
    return None


def _candidates(ds) -> list[str]:
    """Data variables with time (or none, one step per file) and two spatial dimensions."""
    names = []
    for name, var in ds.variables.items():
        if name in ds.dimensions or name.lower() in _LATITUDE + _LONGITUDE + ("time_bnds", "time_bounds"):
            continue
        spatial = len(var.dimensions) - (_time_dim(ds, var) is not None)
        if spatial == 2 and var.dtype.kind in "fiu" and (len(var.dimensions) == 3 or "time" not in ds.variables):
            names.append(name)
    return names


def choose_variable(path: str | Path, wanted: str | None = None) -> str:
    """``wanted`` if ``path`` holds it, else the file's only runoff-like variable; else a clear error."""
    with _dataset(str(path)) as ds:
        if wanted is not None:
            if wanted not in ds.variables:
                raise RunoffError(f"{path}: no variable {wanted!r}; it holds {', '.join(ds.variables)}")
            return wanted
        found = _candidates(ds)
    if len(found) != 1:
        listed = ", ".join(found) if found else "none with time, y and x dimensions"
        raise RunoffError(f"{path}: choose the runoff variable with --variable NAME (candidates: {listed})")
    return found[0]


def _coordinates(ds, var, path: str, crs: str | None = None
                 ) -> tuple[np.ndarray, np.ndarray, _Layout, bool, str | None]:
    """Cell-centre y and x of a variable's grid, its layout, whether they are in degrees, and
    the projection 2-D lat/lon were placed in (else None).

    1-D coordinates of either orientation, or 2-D ``lat``/``lon`` that vary along one axis
    each (NASA LIS on a lat/lon grid), or 2-D ``lat``/``lon`` that do so once projected into
    ``crs`` (``--crs``) or into the Lambert grid a LIS file declares (WRF, LIS); anything else
    is not a regular grid and is refused.
    """
    spatial = [d for d in var.dimensions if d != _time_dim(ds, var)]
    first, second = spatial
    placed_in = None
    one_d = [ds.variables.get(d) for d in spatial]
    if all(c is not None and c.ndim == 1 for c in one_d):
        a, b = (_unmasked(c) * _metres_per_unit(c) for c in one_d)
        is_x = [_is_longitude(d, c) for d, c in zip(spatial, one_d)]
        transpose = is_x[0] and not is_x[1]
        y, x = (b, a) if transpose else (a, b)
        degrees = any(_degrees(c) for c in one_d)
    else:
        lat_name, lon_name = _two_d_names(ds, var, path)
        lat, lon = (_unmasked(ds.variables[n]) for n in (lat_name, lon_name))
        lat_dims = ds.variables[lat_name].dimensions
        transpose = lat_dims[0] != first
        if transpose:
            lat, lon = lat.T, lon.T
        y, x, degrees = lat, lon, True
        if _off_grid(lat, lon) > 0.01:
            crs = crs or _lis_projection(ds, lat, lon)
            if crs is None:
                raise RunoffError(f"{path}: {lat_name}/{lon_name} are 2-D and do not form a regular lat/lon grid "
                                  f"(a projected, curvilinear or rotated grid); pass --crs with the projection "
                                  f"they are regular in (e.g. the model's Lambert conformal), or reproject the "
                                  f"files onto a regular grid first")
            x, y = _projected(lat, lon, crs)
            off = _off_grid(y, x)
            if off > 0.01:
                raise RunoffError(f"{path}: {lat_name}/{lon_name} do not form a regular grid in {crs!r} either "
                                  f"(off by up to {off:.2g} cells); pass --crs with the projection the model ran on")
            degrees, placed_in = False, crs
        y, x = y.mean(axis=1), x.mean(axis=0)
    layout = _Layout(transpose=transpose, flip_y=len(y) > 1 and y[-1] > y[0], flip_x=len(x) > 1 and x[-1] < x[0])
    return y, x, layout, degrees, placed_in


def _unmasked(var) -> np.ndarray:
    var.set_auto_mask(False)  # coordinates have no fill values; masked arrays cost more than the read
    return np.asarray(var[:], np.float64)


_LIS_LAMBERT = ("MAP_PROJECTION", "TRUELAT1", "TRUELAT2", "STANDARD_LON", "DX")


def _lis_projection(ds, lat: np.ndarray, lon: np.ndarray) -> str | None:
    """The Lambert conformal grid a NASA LIS file declares in its global attributes
    (``MAP_PROJECTION``, ``TRUELAT1``, ``TRUELAT2``, ``STANDARD_LON``, ``DX`` in km) as a PROJ
    string, for its 2-D ``lat``/``lon``; else None.

    The cells are placed by projecting the file's own lat/lon, so the sphere's radius moves
    none of them; it scales them all alike, and is chosen so that they lie ``DX`` apart.
    """
    if not set(_LIS_LAMBERT) <= set(ds.ncattrs()) or \
            str(ds.getncattr("MAP_PROJECTION")).strip().upper() != "LAMBERT CONFORMAL":
        return None
    lat1, lat2, lon0, dx = (float(ds.getncattr(k)) for k in _LIS_LAMBERT[1:])
    spec = f"+proj=lcc +lat_1={lat1:g} +lat_2={lat2:g} +lat_0={lat1:g} +lon_0={lon0:g} +units=m +no_defs"
    # the two ends of the middle line along the longer axis: a straight line of cells DX apart
    axis = int(np.argmax(lat.shape))
    ends = [tuple(end if a == axis else n // 2 for a, n in enumerate(lat.shape)) for end in (0, -1)]
    x, y = _projected(np.array([lat[e] for e in ends]), np.array([lon[e] for e in ends]), spec + " +R=6371200")
    spacing = float(np.hypot(x[1] - x[0], y[1] - y[0])) / max(lat.shape[axis] - 1, 1)
    radius = 6_371_200 * dx * 1000 / spacing if spacing > 0 and dx > 0 else 6_371_200
    return f"{spec} +R={radius:.0f}"


def _off_grid(y: np.ndarray, x: np.ndarray) -> float:
    """How far 2-D cell centres stray from a grid whose rows share one y and columns one x,
    in cells (0 for a regular grid)."""
    step = max(np.abs(np.diff(y[:, 0])).max(initial=0), np.abs(np.diff(x[0])).max(initial=0), 1e-12)
    return float(max(np.abs(y - y[:, :1]).max(), np.abs(x - x[:1]).max()) / step)


def _projected(lat: np.ndarray, lon: np.ndarray, crs: str) -> tuple[np.ndarray, np.ndarray]:
    """x and y of the cell centres in ``crs``, their lat/lon read on that CRS's own datum (the
    sphere of a weather model's Lambert grid), as the model computed them."""
    import pyproj

    try:
        target = pyproj.CRS.from_user_input(crs)
    except pyproj.exceptions.CRSError:
        raise RunoffError(f"--crs {crs!r}: not a CRS that PROJ knows") from None
    transformer = pyproj.Transformer.from_crs(target.geodetic_crs or target, target, always_xy=True)
    x, y = transformer.transform(lon.astype(np.float64), lat.astype(np.float64))
    return np.asarray(x), np.asarray(y)


def _is_longitude(name: str, coord) -> bool:
    units = str(getattr(coord, "units", "")).lower()
    standard = str(getattr(coord, "standard_name", "")).lower()
    return (name.lower() in _LONGITUDE or units.startswith("degrees_e") or standard in ("longitude",
            "projection_x_coordinate", "grid_longitude") or getattr(coord, "axis", "") == "X")


_KILOMETRES = ("km", "kilometer", "kilometers", "kilometre", "kilometres")


def _metres_per_unit(coord) -> float:
    """1000 for projected coordinates in km (regional models often write them so), else 1:
    the CRS of a grid mapping counts in metres."""
    return 1000.0 if str(getattr(coord, "units", "")).strip().lower() in _KILOMETRES else 1.0


def _degrees(coord) -> bool:
    units = str(getattr(coord, "units", "")).lower()
    standard = str(getattr(coord, "standard_name", "")).lower()
    return units.startswith("degree") or standard in ("latitude", "longitude")


def _two_d_names(ds, var, path: str) -> tuple[str, str]:
    listed = str(getattr(var, "coordinates", "")).split()
    names = [n for n in listed if n in ds.variables] + [n for n in ds.variables if n not in listed]
    lat = next((n for n in names if n.lower() in ("lat", "latitude", "nav_lat") and ds.variables[n].ndim == 2), None)
    lon = next((n for n in names if n.lower() in ("lon", "longitude", "nav_lon") and ds.variables[n].ndim == 2), None)
    if lat is None or lon is None:
        raise RunoffError(f"{path}: {var.name} has no coordinates for its dimensions "
                          f"{', '.join(var.dimensions)} (neither 1-D coordinates nor 2-D lat/lon)")
    return lat, lon


def _decode(values: np.ndarray, units: str, calendar: str, path: str) -> np.ndarray:
    """CF time values -> datetime64[s] through xarray's decoder (any units and calendar)."""
    from xarray.coding.times import decode_cf_datetime

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            decoded = np.asarray(decode_cf_datetime(np.asarray(values), units, calendar))
        if decoded.dtype.kind != "M":  # cftime dates of a non-standard calendar
            decoded = np.array([np.datetime64(dt.datetime(t.year, t.month, t.day, t.hour, t.minute, t.second))
                                for t in decoded.ravel()]).reshape(decoded.shape)
    except Exception as exc:  # noqa: BLE001 (xarray and cftime raise many kinds)
        raise RunoffError(f"{path}: its time coordinate cannot be decoded (units {units!r}, calendar "
                          f"{calendar!r}: {first_line(exc)})") from None
    # float time values (days since 0001-01-01 in float32) miss whole minutes by a few seconds
    seconds = decoded.astype("datetime64[s]").astype(np.int64)
    return (np.round(seconds / 60) * 60).astype(np.int64).astype("datetime64[s]")


def _name_stamp(path: str) -> np.datetime64 | None:
    stem = Path(path).name
    for pattern, fmt in _NAME_STAMPS:
        for match in pattern.finditer(stem):
            try:
                return np.datetime64(dt.datetime.strptime("".join(match.groups()), fmt), "s")
            except ValueError:
                continue
    return None


def _scan_file(path: str, variables: tuple[str, ...], required: bool, why: str = "",
               crs: str | None = None) -> list[_FileScan]:
    """The header of one file for each of ``variables`` it holds (all of them if ``required``);
    ``why`` says, in the error for a missing one, where the names came from; ``crs``: ``--crs``."""
    with _dataset(path) as ds:
        missing = [v for v in variables if v not in ds.variables]
        if missing and (required or len(missing) == len(variables)):
            raise RunoffError(f"{path}: no variable {' or '.join(map(repr, missing))}{why}; it holds "
                              f"{', '.join(ds.variables)}")
        scans = []
        for name in variables:
            if name in missing:
                continue
            var = ds.variables[name]
            tdim = _time_dim(ds, var)
            steps = ds.dimensions[tdim].size if tdim else 1
            stamps, bounds = _times(ds, tdim, path, steps)
            y, x, layout, degrees, placed_in = _coordinates(ds, var, path, crs)
            key = hashlib.sha1(y.tobytes() + x.tobytes() + repr(layout).encode()).hexdigest()
            attrs = {k: str(getattr(var, k)) for k in ("units", "long_name", "standard_name", "cell_methods",
                                                       "grid_mapping") if hasattr(var, k)}
            attrs["_degrees"] = degrees
            if placed_in and not crs:
                attrs["_crs"] = placed_in  # the file's own projection (LIS), placing its 2-D lat/lon
            scans.append(_FileScan(path, name, tuple(var.shape), attrs, stamps, bounds, key))
        return scans


def _times(ds, tdim: str | None, path: str, steps: int) -> tuple[np.ndarray, np.ndarray | None]:
    coord = ds.variables.get(tdim or "time")
    if coord is None or " since " not in str(getattr(coord, "units", "")):
        stamp = _name_stamp(path)
        if stamp is None:
            raise RunoffError(f"{path}: no CF time coordinate and no date in the file name "
                              f"(A20101231.0300, YYYYMMDDhhmm or YYYYMMDD)")
        if steps != 1:
            raise RunoffError(f"{path}: {steps} steps but no CF time coordinate to date them")
        return np.array([stamp]), None
    units, calendar = str(coord.units), str(getattr(coord, "calendar", "standard"))
    try:
        coord.set_auto_mask(False)
        raw = np.asarray(coord[:], np.float64).reshape(-1)
    except (OSError, RuntimeError) as exc:
        raise RunoffError(f"{path}: cannot read its time coordinate ({first_line(exc)})") from None
    fill = getattr(coord, "_FillValue", None)
    if not np.isfinite(raw).all() or (fill is not None and (raw == fill).any()):
        raise RunoffError(f"{path}: its time coordinate has missing values")
    bounds_var = ds.variables.get(str(getattr(coord, "bounds", "")))
    bounds = None
    if bounds_var is not None and bounds_var.shape == (len(raw), 2):
        bounds_var.set_auto_mask(False)
        bounds = _CfTime(np.asarray(bounds_var[:], np.float64), str(getattr(bounds_var, "units", units)),
                         str(getattr(bounds_var, "calendar", calendar)))
    return _CfTime(raw, units, calendar), bounds


def _decode_scans(scans: list[_FileScan]) -> list[_FileScan]:
    """Decode every scan's CF times, one xarray call per (units, calendar) rather than per file."""
    groups: dict[tuple[str, str], list[tuple[int, str, _CfTime]]] = {}
    for i, scan in enumerate(scans):
        for field_name in ("stamps", "bounds"):
            value = getattr(scan, field_name)
            if isinstance(value, _CfTime):
                groups.setdefault((value.units, value.calendar), []).append((i, field_name, value))
    decoded: dict[tuple[int, str], np.ndarray] = {}
    for (units, calendar), items in groups.items():
        try:
            flat = _decode(np.concatenate([v.values.ravel() for _, _, v in items]), units, calendar, "")
        except RunoffError:  # name the file: decode them one by one
            for i, _, value in items:
                _decode(value.values, units, calendar, scans[i].path)
            raise
        start = 0
        for i, field_name, value in items:
            decoded[i, field_name] = flat[start:start + value.values.size].reshape(value.values.shape)
            start += value.values.size
    return [replace(scan, stamps=decoded.get((i, "stamps"), scan.stamps),
                    bounds=decoded.get((i, "bounds"), scan.bounds)) for i, scan in enumerate(scans)]


def _scan_all(paths: list[str], variables: tuple[str, ...], required: bool, why: str = "",
              crs: str | None = None) -> list[_FileScan]:
    """Every file's header, on forked processes where there are many files (one open each)."""
    workers = min(os.cpu_count() or 1, max(1, len(paths) // 64))
    if workers < 2 or sys.platform != "linux":
        return _decode_scans([s for p in paths for s in _scan_file(p, variables, required, why, crs)])
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        chunks = pool.map(_scan_file, paths, [variables] * len(paths), [required] * len(paths),
                          [why] * len(paths), [crs] * len(paths), chunksize=max(1, len(paths) // (workers * 8)))
        return _decode_scans([s for scans in chunks for s in scans])


# HDF5 as the wheels build it is not thread-safe: one thread inside the library at a time.
_HDF5 = threading.RLock()
_OPEN = threading.local()  # the file open_files() keeps open in this thread: {path: Dataset}, at most one


@contextlib.contextmanager
def open_files() -> Iterator[None]:
    """Keep the last file read in this block open until another is read or the block ends.

    A multi-year file compressed in long time chunks (VIC: 8036 steps per chunk) would
    otherwise be opened, and its chunks decompressed, again for every day; files of one
    step each gain nothing from staying open.
    """
    outer = getattr(_OPEN, "files", None)
    _OPEN.files = {} if outer is None else outer
    try:
        yield
    finally:
        if outer is None:
            with _HDF5:
                for ds in _OPEN.files.values():
                    ds.close()
            _OPEN.files = None


def _read_steps(path: str, variable: str, indices: tuple[int, ...]) -> np.ndarray:
    """Float32 values of the given time indices (NaN where masked), shape (steps, a, b)."""
    cache = getattr(_OPEN, "files", None)
    with _HDF5:
        ds = cache.get(path) if cache is not None else None
        if ds is None:
            ds = _dataset(path)
            if cache is not None:
                for other in cache.values():
                    other.close()
                cache.clear()
                cache[path] = ds
        try:
            var = ds.variables[variable]
            if _time_dim(ds, var) is None:
                raw = var[:][np.newaxis]
            elif len(indices) > 1 and indices[-1] - indices[0] == len(indices) - 1:
                raw = var[indices[0]:indices[-1] + 1]
            else:
                raw = var[list(indices)] if len(indices) > 1 else var[indices[0]][np.newaxis]
        except (OSError, RuntimeError, IndexError) as exc:
            raise RunoffError(f"{path}: cannot read {variable} ({first_line(exc)})") from None
        finally:
            if cache is None:
                ds.close()
    if np.ma.isMaskedArray(raw):
        raw = raw.astype(np.float32, copy=False).filled(np.nan)
    return np.asarray(raw, np.float32).reshape(len(indices), *raw.shape[-2:])


def _step_label(path: str | Path, indices: tuple[int, ...]) -> str:
    if len(indices) == 1:
        return f"{path}[{indices[0]}]"
    if indices[-1] - indices[0] == len(indices) - 1:
        return f"{path}[{indices[0]}:{indices[-1] + 1}]"
    return f"{path}[{','.join(map(str, indices))}]"


def grid_from_coordinates(y: np.ndarray, x: np.ndarray, crs_wkt: str, path: str) -> Grid:
    """The exact north-up :class:`Grid` of cell centres ``y`` and ``x`` (either orientation).

    Float32 coordinates wobble by ~1e-5 degree: the resolution and origin are fitted, then
    snapped to the nearest simple value (0.125, 1/12 of a degree, a multiple of half a cell)
    within that wobble, so the transform does not drift.

    >>> lat = (19.375 - np.arange(31) / 12).astype(np.float32)    # 5 arc-minutes, stored as float32
    >>> lon = (73.375 + np.arange(33) / 12).astype(np.float32)
    >>> g = grid_from_coordinates(lat.astype(float), lon.astype(float), "EPSG:4326", "f.nc")
    >>> g.transform[0] == 1 / 12, g.transform[2] == 1760 / 24, g.transform[5] == 466 / 24
    (True, True, True)
    """
    ya, ystep = _axis(np.sort(y)[::-1], "y/latitude", path)
    xa, xstep = _axis(np.sort(x), "x/longitude", path)
    from rasterio.crs import CRS

    return Grid(CRS.from_user_input(crs_wkt).to_wkt(), (xstep, 0.0, xa, 0.0, ystep, ya), len(y), len(x))


def _axis(centres: np.ndarray, name: str, path: str) -> tuple[float, float]:
    """(edge of the first cell, signed cell size) of regularly spaced cell centres."""
    n = len(centres)
    if n < 2:
        raise RunoffError(f"{path}: a single cell along {name}; the grid's resolution cannot be known")
    step = (centres[-1] - centres[0]) / (n - 1)
    fitted = centres[0] + np.arange(n) * step
    wobble = np.abs(centres - fitted).max()
    if wobble > 0.01 * abs(step):
        raise RunoffError(f"{path}: {name} coordinates are not regularly spaced (off by up to "
                          f"{wobble / abs(step):.0%} of a cell); only regular grids can be ingested")
    tol = max(wobble, 1e-12 * abs(centres).max(), 1e-15) * 2 + 1e-7 * abs(step)
    step = _snap(step, tol / n, fraction=True)
    first = float(np.mean(centres - np.arange(n) * step))
    edge = _snap(first - step / 2, tol, unit=abs(step) / 2)
    return edge, step


def _snap(value: float, tol: float, fraction: bool = False, unit: float | None = None) -> float:
    """The simplest value within ``tol`` of ``value``: up to 4 decimals, else (a cell size)
    1/k or (an edge) a multiple of ``unit``, else more decimals."""
    candidates = [round(value, k) for k in range(0, 5)]
    if fraction and abs(value) > 1e-6 and round(1 / value) != 0:
        candidates.append(1 / round(1 / value))
    if unit:
        per_unit = round(1 / unit)  # a unit of 1/k (half a 1/12-degree cell: 1/24): divide by k, exactly
        candidates.append(round(value * per_unit) / per_unit if abs(1 / unit - per_unit) < 1e-9
                          else round(value / unit) * unit)
    candidates += [round(value, k) for k in range(5, 10)]
    for candidate in candidates:
        if abs(candidate - value) <= tol:
            return float(candidate)
    return float(value)


def _crs_of(path: str, scan: _FileScan, options: NetcdfOptions) -> str:
    from rasterio.crs import CRS
    from rasterio.errors import CRSError

    if options.crs:
        try:
            return CRS.from_user_input(options.crs).to_wkt()
        except CRSError:
            raise RunoffError(f"--crs {options.crs!r}: not a CRS that PROJ knows") from None
    mapping = scan.attrs.get("grid_mapping")
    if mapping:
        with _dataset(path) as ds:
            var = ds.variables.get(mapping)
            attrs = {k: var.getncattr(k) for k in var.ncattrs()} if var is not None else {}
        wkt = attrs.get("crs_wkt") or attrs.get("spatial_ref")
        try:
            if wkt:
                return CRS.from_wkt(str(wkt)).to_wkt()
            import pyproj

            return pyproj.CRS.from_cf(attrs).to_wkt()
        except Exception:  # noqa: BLE001 (pyproj raises its own CRSError and others)
            raise RunoffError(f"{path}: grid_mapping {mapping!r} is not a CRS PROJ understands; pass --crs") from None
    if scan.attrs.get("_crs"):
        return CRS.from_user_input(scan.attrs["_crs"]).to_wkt()
    if scan.attrs["_degrees"]:
        warnings.warn(f"{path}: no grid_mapping; latitude/longitude in degrees taken as EPSG:4326 "
                      f"(pass --crs to set another)", RunoffWarning, stacklevel=3)
        return CRS.from_epsg(4326).to_wkt()
    raise RunoffError(f"{path}: projected x/y coordinates without a grid_mapping; pass --crs (e.g. --crs EPSG:32633)")


def _normalise_units(units: str) -> str:
    return units.lower().replace(" ", "").replace("**", "^").replace("kgm2", "kgm-2")


def _aggregation(name: str, units: str, options: NetcdfOptions, step: np.timedelta64) -> tuple[str, float, str]:
    """(sum or mean, factor to the requested units, the units stored)."""
    key = _normalise_units(units)
    how = options.aggregate or ("sum" if key in _AMOUNTS else "mean")
    if options.units is None or _normalise_units(options.units) == key:
        return how, 1.0, options.units or units
    wanted = _normalise_units(options.units)
    if wanted not in ("kgm-2", "mm"):
        raise RunoffError(f"--units {options.units!r}: only 'kg m-2' (or 'mm', the same) can be converted to; "
                          f"{name} is in {units!r}")
    if key in _AMOUNTS:
        if how != "sum" and step < _DAY:
            raise RunoffError(f"--aggregate mean with --units {options.units!r}: {name} is an amount per step "
                              f"({units!r}); summing its steps gives the daily amount")
        return how, _AMOUNTS[key], options.units
    if key in _RATES:
        if how != "mean":
            raise RunoffError(f"--aggregate sum with --units {options.units!r}: {name} is a rate ({units!r}); "
                              f"the daily amount is its mean times 86400 s")
        return how, _RATES[key] * 86400.0, options.units
    raise RunoffError(f"--units {options.units!r}: cannot convert {name}'s units {units!r} "
                      f"(known: kg m-2, mm, m per step or per day; kg m-2 s-1, mm s-1, m s-1)")


def _step_length(steps: list[_Step], name: str) -> np.timedelta64:
    """The common interval of the steps: from their bounds, else the most common gap between stamps."""
    if all(s.bounds is not None for s in steps):
        lengths = np.array([s.bounds[1] - s.bounds[0] for s in steps])
    else:
        stamps = np.unique(np.array([s.stamp for s in steps]))
        if len(stamps) < 2:
            return _DAY
        lengths = np.diff(stamps)
    values, counts = np.unique(lengths, return_counts=True)
    step = values[counts.argmax()]
    if step <= np.timedelta64(0, "s"):
        raise RunoffError(f"{name}: time bounds of zero length")
    if step > _DAY:
        raise RunoffError(f"{name}: steps {step.astype(int) / 86400:g} days apart; daily or sub-daily steps are needed")
    if (_DAY % step) != np.timedelta64(0, "s"):
        raise RunoffError(f"{name}: steps of {step.astype(int) / 3600:g} h do not divide a day")
    return step


def _stamp_position(stamp: str, length: np.timedelta64, path: str) -> str:
    """Where a step's time lies in its interval when the file has no ``time_bnds``: as given,
    else by product (NLDAS stamps the start of its hour), else the end of a sub-daily
    interval (GLDAS, LIS) and the start of a daily one (the day itself)."""
    if stamp != "auto":
        return stamp
    if Path(path).name.startswith(_STAMPS_AT_START):
        return "start"
    return "end" if length < _DAY else "start"


def _to_middle(length: np.timedelta64, position: str) -> np.timedelta64:
    """Middle of an interval minus its stamp."""
    return {"start": length // 2, "middle": np.timedelta64(0, "s"), "end": -(length // 2)}[position]


def _interval_middle(step: _Step, length: np.timedelta64, stamp: str) -> np.datetime64:
    if stamp == "auto" and step.bounds is not None:
        return step.bounds[0] + (step.bounds[1] - step.bounds[0]) // 2
    return step.stamp + _to_middle(length, _stamp_position(stamp, length, step.path))


def _days_of(variable: str, steps: list[_Step], length: np.timedelta64, options: NetcdfOptions, how: str,
             factor: float, layout: _Layout) -> tuple[list[NetcdfDay], dict[str, str]]:
    """Group the steps (``length`` apart) into days; a day short of steps goes to the
    incomplete ones, with the reason."""
    per_day = int(_DAY // length)
    start = np.timedelta64(options.day_start * 3600, "s")
    by_day: dict[dt.date, dict[np.datetime64, _Step]] = {}
    for step in steps:
        middle = _interval_middle(step, length, options.stamp)
        day = (middle - start).astype("datetime64[D]").item()
        by_day.setdefault(day, {})[middle] = step
    days, incomplete = [], {}
    hours = f"{length.astype(int) / 3600:g}-hourly" if length < _DAY else "daily"
    for day in sorted(by_day):
        found = by_day[day]
        if len(found) < per_day:
            first = np.datetime64(day, "s") + start + length // 2
            offset = _to_middle(length, _stamp_position(options.stamp, length, steps[0].path))
            absent = [str(first + k * length - offset)[:16]
                      for k in range(per_day) if first + k * length not in found]
            shown = ", ".join(absent[:3]) + (" ..." if len(absent) > 3 else "")
            incomplete[day.isoformat()] = f"{len(found)} of {per_day} {hours} steps (missing {shown})"
            continue
        by_file: dict[str, list[int]] = {}
        for middle in sorted(found):
            by_file.setdefault(found[middle].path, []).append(found[middle].index)
        days.append(NetcdfDay(day, variable, tuple((p, tuple(i)) for p, i in by_file.items()), how, factor, layout,
                              nodata=options.nodata))
    return days, incomplete


def _check_names(scans: list[_FileScan]) -> None:
    """Warn where a one-step file's decoded time and the date in its name are a day or more
    apart: the sign of a calendar or reference date read wrongly (by the writer or here)."""
    for scan in scans:
        named = _name_stamp(scan.path) if len(scan.stamps) == 1 else None
        if named is not None and abs(scan.stamps[0] - named) >= _DAY:
            warnings.warn(f"{scan.path}: its time coordinate decodes to {str(scan.stamps[0])[:16]} but its name "
                          f"says {str(named)[:16]}; check the file's time units and calendar (the coordinate is used)",
                          RunoffWarning, stacklevel=4)
            return


def _deduplicate(steps: list[_Step], name: str, variable: str) -> list[_Step]:
    """One step per time stamp; two files with different values for one stamp are an error."""
    kept: dict[np.datetime64, _Step] = {}
    for step in steps:
        other = kept.get(step.stamp)
        if other is None:
            kept[step.stamp] = step
            continue
        a, b = (_read_steps(s.path, variable, (s.index,)) for s in (other, step))
        if a.shape != b.shape or not np.array_equal(a, b, equal_nan=True):
            raise RunoffError(f"{step.path}: {name} at {str(step.stamp)[:16]} differs from the same step in "
                              f"{other.path}; keep one of the two files")
    return [kept[t] for t in sorted(kept)]


def open_netcdf_source(source: str | Path, options: NetcdfOptions = NetcdfOptions(), grid: Grid | None = None,
                       grid_from: str = "", resample: str | None = None) -> NetcdfSource:
    """Scan the NetCDF/HDF5 files of ``source`` (a file, a glob, a folder or a folder of
    sub-folders per variable) and plan the days of each cube variable.

    ``grid``: the grid they must lie on (an existing cube's); qs must match it, other
    variables are resampled onto it with ``resample`` or are an error. Raises
    :class:`RunoffError` for any bad file or option, before anything is read in full.
    """
    if options.aggregate is not None and options.aggregate not in AGGREGATIONS:
        raise RunoffError(f"--aggregate {options.aggregate!r}: choose sum or mean")
    if options.stamp not in STAMPS:
        raise RunoffError(f"--stamp {options.stamp!r}: choose {', '.join(STAMPS)}")
    if not 0 <= options.day_start <= 23:
        raise RunoffError(f"--day_start {options.day_start}: an hour from 0 to 23")
    scans = _scan_sources(source, dict(options.variables or {}), options.crs)
    days, attrs, incomplete = {}, {}, {}
    for name in [TARGET] + sorted(n for n in scans if n != TARGET):
        found, grid, grid_from = _variable_days(name, scans[name], options, grid, grid_from, resample)
        days[name], attrs[name], incomplete[name] = found
    return NetcdfSource(grid, days, attrs, incomplete)


def _scan_sources(source: str | Path, wanted: dict[str, str], crs: str | None = None) -> dict[str, list[_FileScan]]:
    """Every file's header, per cube variable: from its sub-folder, or from the files that
    hold the variable ``wanted`` names for it (by default the only candidate, as qs)."""
    groups = _file_groups(source)
    if isinstance(groups, dict):  # one sub-folder per cube variable
        unknown = sorted(set(wanted) - set(groups))
        if unknown:
            raise RunoffError(f"--variable {','.join(unknown)}: no such sub-folder in {source}")
        return {name: _scan_all([str(p) for p in files], (choose_variable(files[0], wanted.get(name)),), True,
                                crs=crs) for name, files in groups.items()}
    names = [str(p) for p in groups]
    why = ""
    if not wanted:  # a folder of one file per variable (CWatM) must say which is which
        wanted = {TARGET: choose_variable(names[0])}
        why = (f" (taken as {TARGET} from the first file, {Path(names[0]).name}: name the variables with "
               f"--variable {TARGET}=NAME or {TARGET}=NAME,rainf=NAME2)")
    variables = tuple(dict.fromkeys(wanted.values()))
    found = _scan_all(names, variables, len(variables) == 1, why, crs)
    scans = {name: [s for s in found if s.variable == variable] for name, variable in wanted.items()}
    for name, variable in wanted.items():
        if not scans[name]:
            raise RunoffError(f"{source}: no file holds the variable {variable!r} (--variable {name}={variable})")
    return scans


def _variable_days(name: str, scans: list[_FileScan], options: NetcdfOptions, grid: Grid | None, grid_from: str,
                   resample: str | None) -> tuple[tuple[list[NetcdfDay], dict, dict[str, str]], Grid, str]:
    """One cube variable's days, attributes and incomplete days; and the cube's grid (this
    variable's, when no grid is set yet) with where it comes from."""
    variable_grid, layout = _common_grid(scans, options)
    first = scans[0]
    if grid is None:
        grid, grid_from = variable_grid, f"the first file {first.path}"
    on_grid = variable_grid.matches(grid)
    if not on_grid and (name == TARGET or resample is None):
        raise grid_error(Path(first.path), variable_grid, grid, grid_from)
    _check_names(scans)
    steps = _deduplicate([_Step(s.path, i, s.stamps[i], None if s.bounds is None else tuple(s.bounds[i]))
                          for s in scans for i in range(len(s.stamps))], name, first.variable)
    length = _step_length(steps, f"{first.path} ({first.variable})")
    how, factor, units = _aggregation(first.variable, first.attrs.get("units", ""), options, length)
    if options.aggregate is not None and length == _DAY:
        warnings.warn(f"{first.path}: {first.variable} is already daily; --aggregate {options.aggregate} "
                      f"has no effect", RunoffWarning, stacklevel=3)
    days, incomplete = _days_of(first.variable, steps, length, options, how, factor, layout)
    if not on_grid:
        days = [replace(d, resample=(variable_grid, grid, resample)) for d in days]
    per_day = int(_DAY // length)
    attrs = {
        "units": units,
        "long_name": (first.attrs.get("long_name") or first.attrs.get("standard_name") or "").strip()
        or first.variable,
        "source_variable": first.variable,
        "aggregation": f"{how} of {per_day} steps of {length.astype(int) / 3600:g} h" if per_day > 1
        else "daily values as published",
    }
    return (days, attrs, incomplete), grid, grid_from


def _common_grid(scans: list[_FileScan], options: NetcdfOptions) -> tuple[Grid, _Layout]:
    """The grid every file of one variable lies on; a file on another grid is an error."""
    first = scans[0]
    grids: dict[str, tuple[Grid, _Layout]] = {}

    def grid_of(scan: _FileScan) -> tuple[Grid, _Layout]:
        if scan.coords_key not in grids:
            with _dataset(scan.path) as ds:
                y, x, layout, _, _ = _coordinates(ds, ds.variables[scan.variable], scan.path,
                                                  options.crs or scan.attrs.get("_crs"))
            grids[scan.coords_key] = (grid_from_coordinates(y, x, _crs_of(scan.path, scan, options), scan.path),
                                      layout)
        return grids[scan.coords_key]

    grid, layout = grid_of(first)
    for scan in _distinct(scans):
        other, other_layout = grid_of(scan)
        if not other.matches(grid) or other_layout != layout:
            raise grid_error(Path(scan.path), other, grid, f"the first file {first.path}")
    return grid, layout


def _distinct(scans: Iterable[_FileScan]) -> list[_FileScan]:
    seen: dict[str, _FileScan] = {}
    for scan in scans:
        seen.setdefault(scan.coords_key, scan)
    return list(seen.values())
