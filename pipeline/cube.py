"""Open and validate a runoff cube; its grid, its records, a summary for ``runoff info``.

The cube (see DESIGN.md) is a Zarr v3 group with ``qs(time, y, x)`` float32, a daily
``time`` axis, cell-centre ``x``/``y`` and a ``spatial_ref`` coordinate (rioxarray
convention), so that ``xr.open_zarr(store).rio.crs`` and
``.rio.transform()`` equal the source rasters'. Other ``(time, y, x)`` variables (rain, soil
moisture) and static ``(y, x)`` maps (a DEM's flow accumulation) share that grid.

Example
-------
>>> ds = open_cube("stores/qs.zarr")                     # doctest: +SKIP
>>> ds.qs.rio.crs, ds.qs.rio.transform()                  # doctest: +SKIP
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
import zarr
from rasterio.transform import Affine

from .errors import RunoffError, first_line
from .rasters import Grid
from .storage import is_url, url_filesystem

TARGET = "qs"
STATIC_DIMS = ("y", "x")  # a static map: one layer that holds on every day (flow accumulation, soil depth)
CUBE_FORMAT = 1  # group attribute ``runoff_cube_format``, written last when a cube is created
_EPOCH = dt.date(1970, 1, 1)
_DESCRIPTIVE_ATTRS = ("units", "long_name", "standard_name")


@dataclass(frozen=True)
class Records:
    """Per-variable provenance: source file and content digest of each written day."""

    files: dict[str, str]
    digest: dict[str, str]


@dataclass(frozen=True)
class CubeInfo:
    """What a writer needs to know about an existing cube, read with zarr alone."""

    grid: Grid
    start: dt.date
    end: dt.date
    variables: list[str]
    records: dict[str, Records] = field(default_factory=dict)
    attrs: dict[str, dict] = field(default_factory=dict)
    format_version: int | None = None  # CUBE_FORMAT once the writer finished creating it
    static: list[str] = field(default_factory=list)  # the static maps, (y, x)
    # the group lists its arrays' metadata (a cube that xarray appended to without it does not)
    consolidated: bool = True


def _open_group(store: str, storage_options: dict | None) -> zarr.Group:
    if not is_url(store) and not Path(store).exists():
        raise RunoffError(f"{store}: no such cube")
    try:
        return zarr.open_group(store, mode="r", use_consolidated=False, storage_options=storage_options)
    except Exception as exc:
        if is_url(store):  # no cube there, or no answer: the reason tells which
            raise RunoffError(f"{store}: no Zarr cube could be opened there ({first_line(exc)})") from None
        raise RunoffError(f"{store}: exists but is not a Zarr cube (no zarr.json group)") from None


def grid_from_spatial_ref(attrs: dict, shape: tuple[int, int], where: str) -> Grid:
    """Rebuild the exact :class:`Grid` from a ``spatial_ref`` variable's attributes."""
    wkt = attrs.get("crs_wkt") or attrs.get("spatial_ref")
    geo = attrs.get("GeoTransform")
    if not wkt or not geo:
        raise RunoffError(f"{where}: spatial_ref has no CRS WKT or GeoTransform; not a runoff cube")
    transform = Affine.from_gdal(*(float(v) for v in str(geo).split()))
    return Grid(wkt, tuple(transform)[:6], int(shape[0]), int(shape[1]))


def read_cube_info(store: str | Path, storage_options: dict | None = None) -> CubeInfo:
    """Grid, time range, variables and records of a cube, with zarr alone.

    Tolerates the state a killed writer can leave (time-indexed arrays longer than
    the time axis); raises :class:`RunoffError` when ``store`` is not a runoff cube.
    """
    store = str(store)
    group = _open_group(store, storage_options)
    names = set(group.array_keys())
    if not {TARGET, "time", "spatial_ref"} <= names:
        raise RunoffError(f"{store}: a Zarr group, but not a runoff cube (needs arrays {TARGET}, time, "
                          f"spatial_ref; has {', '.join(sorted(names)) or 'none'})")
    time_arr = group["time"]
    if not str(time_arr.attrs.get("units", "")).startswith("days since 1970-01-01"):
        raise RunoffError(f"{store}: time is not encoded as 'days since 1970-01-01'; not a runoff cube")
    days = time_arr[:]
    if days.size == 0:
        raise RunoffError(f"{store}: the cube has an empty time axis")
    # a killed extension can leave unwritten (fill) values after the valid daily run
    valid = int(np.argmin(np.append(days == days[0] + np.arange(days.size), False)))
    start = _EPOCH + dt.timedelta(days=int(days[0]))
    variables = sorted(n for n in names if tuple(group[n].metadata.dimension_names or ()) == ("time", "y", "x"))
    static = sorted(n for n in names if tuple(group[n].metadata.dimension_names or ()) == STATIC_DIMS)
    grid = grid_from_spatial_ref(dict(group["spatial_ref"].attrs), group[TARGET].shape[1:], store)
    records, attrs = {}, {}
    for name in variables:
        a = dict(group[name].attrs)
        records[name] = Records(dict(a.get("source_files", {})), dict(a.get("source_digest", {})))
        attrs[name] = {k: a[k] for k in _DESCRIPTIVE_ATTRS if k in a}
    return CubeInfo(grid, start, start + dt.timedelta(days=valid - 1), variables, records, attrs,
                    group.attrs.get("runoff_cube_format"), static, group.metadata.consolidated_metadata is not None)


def open_cube(store: str | Path, storage_options: dict | None = None,
              chunks: dict[str, int] | None = None) -> xr.Dataset:
    """Open a cube lazily (Dask) with its CRS decoded: ``ds.rio.crs`` works at once.

    ``chunks``: the Dask chunks (default: one Dask chunk per stored chunk).
    """
    store = str(store)
    if not is_url(store) and not Path(store).exists():
        raise RunoffError(f"{store}: no such cube")
    info = read_cube_info(store, storage_options)  # clear errors for non-cubes before xarray's own
    return xr.open_zarr(store, decode_coords="all", consolidated=info.consolidated, storage_options=storage_options,
                        chunks={} if chunks is None else chunks)


def target_units(ds: xr.Dataset) -> str:
    """Units of the cube's ``qs``, which every score, map and log line is in (kg m-2 when unsaid)."""
    return ds[TARGET].attrs.get("units", "kg m-2")


def is_static(ds: xr.Dataset, name: str) -> bool:
    """Whether ``name`` is a static map of the cube ``ds``: ``(y, x)``, the same on every day."""
    return ds[name].dims == STATIC_DIMS


def cube_grid(ds: xr.Dataset) -> Grid:
    """The exact grid of an opened cube."""
    return grid_from_spatial_ref(dict(ds["spatial_ref"].attrs), ds[TARGET].shape[1:], "cube")


def _stored_bytes(store: str, storage_options: dict | None) -> int:
    """Bytes the cube takes on disk or in its object store."""
    if not is_url(store):
        return sum(p.stat().st_size for p in Path(store).rglob("*") if p.is_file())
    fs, root = url_filesystem(store, storage_options)
    return int(fs.du(root))


def evenly_spaced(items: np.ndarray, at_most: int | None) -> np.ndarray:
    """At most ``at_most`` of ``items`` (issue days, day indices), spread evenly from the first
    to the last (all of them when None or when there are no more).

    >>> evenly_spaced(np.arange(100), 4).tolist(), evenly_spaced(np.arange(3), 5).tolist()
    ([0, 33, 66, 99], [0, 1, 2])
    """
    if at_most is None or items.size <= at_most:
        return items
    return items[np.unique(np.linspace(0, items.size - 1, at_most).round().astype(np.int64))]


P99_CELLS = 5 * 10**7  # cells the 99th percentile of runoff info is taken over, at most (200 MB of float32)


def _p99(qs: xr.DataArray) -> tuple[xr.DataArray, str]:
    """The 99th percentile of ``qs`` (NaN skipped; lazy, to compute with the other statistics
    in one read) and its label: over every day, or on a larger cube over evenly spaced days
    holding at most ``P99_CELLS`` cells (said in the label)."""
    days = qs.sizes["time"]
    picked = evenly_spaced(np.arange(days), max(1, P99_CELLS // (qs.sizes["y"] * qs.sizes["x"])))
    label = "p99" if picked.size == days else f"p99 (of {picked.size} days)"
    return qs.isel(time=picked).quantile(0.99, skipna=True), label


def describe_cube(store: str | Path, storage_options: dict | None = None) -> str:
    """A human summary: dims, dates, missing days, CRS, resolution, chunks, size, statistics."""
    import dask

    store = str(store)
    ds = open_cube(store, storage_options)
    grid = cube_grid(ds)
    qs = ds[TARGET]
    missing = list(ds.attrs.get("missing_dates", []))
    valid = qs.notnull()
    p99, p99_label = _p99(qs)
    stats = dask.compute(qs.min(), qs.max(), qs.mean(), (qs > 0).sum() / valid.sum(), valid.mean(), p99)
    vmin, vmax, vmean, wet, valid_frac, p99 = (float(s) for s in stats)
    size = _stored_bytes(store, storage_options)
    lines = [
        f"cube        {store}",
        f"variables   {', '.join(f'{v} {ds[v].dtype} {ds[v].dims}' for v in ds.data_vars)}",
        f"dims        time={ds.sizes['time']}, y={ds.sizes['y']}, x={ds.sizes['x']}",
        f"dates       {str(ds.time.values[0])[:10]} .. {str(ds.time.values[-1])[:10]} (daily)",
        f"missing     {_days_text(missing)}" + "".join(
            f"; {name} {_days_text(ds[name].attrs['missing_dates'])}" for name in ds.data_vars
            if name != TARGET and "time" in ds[name].dims and ds[name].attrs.get("missing_dates")),
        f"crs         {grid.describe()}",
        f"resolution  {abs(grid.transform[0]):g} x {abs(grid.transform[4]):g} {_unit_name(ds)}",
        f"chunks      {dict(zip(qs.dims, qs.encoding.get('chunks', ())))}",
        f"stored      {_stored_text(size, sum(ds[v].size * 4 for v in ds.data_vars))}",
        f"{TARGET} [{qs.attrs.get('units', '?')}]  min {vmin:.3g}  mean {vmean:.3g}  {p99_label} {p99:.3g}  "
        f"max {vmax:.3g}  wet {wet:.1%} of valid  valid {valid_frac:.1%} of cells",
    ]
    return "\n".join(lines)


def _stored_text(size: int, float32_bytes: int) -> str:
    """The store's size against its variables as raw float32.

    >>> _stored_text(3_000_000, 12_000_000)
    '3 MB (4.0x smaller than float32, chunk and metadata files included)'
    >>> _stored_text(25_000, 10_000)  # a tiny cube is mostly metadata
    '0.025 MB (2.5x larger than float32, chunk and metadata files included)'
    """
    ratio = float32_bytes / max(size, 1)
    versus = f"{ratio:.1f}x smaller than" if ratio >= 1 else f"{1 / ratio:.1f}x larger than"
    return f"{size / 1e6:.3g} MB ({versus} float32, chunk and metadata files included)"


def _days_text(days: list[str]) -> str:
    """``3 day(s): 2019-01-10, ...`` as ``runoff info`` lists missing days (the first 8)."""
    return f"{len(days)} day(s)" + (f": {', '.join(days[:8])}" + (" ..." if len(days) > 8 else "") if days else "")


def _unit_name(ds: xr.Dataset) -> str:
    crs = ds.rio.crs
    if crs is None:
        return ""
    return "degrees" if crs.is_geographic else (crs.linear_units or "")


# --- splits and normalisation -------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """A named date range; a window belongs to it when all its target days lie inside."""

    name: str
    start: dt.date
    end: dt.date

    def contains(self, day: dt.date) -> bool:
        return self.start <= day <= self.end

    def overlaps(self, other: "Split") -> bool:
        """Whether the two ranges share a day (a period scored or calibrated on that the
        model was trained on)."""
        return self.start <= other.end and other.start <= self.end


def _as_date(value: str | dt.date | None, option: str) -> dt.date | None:
    if value is None or isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value))
    except ValueError:
        raise RunoffError(f"{option} {value!r}: expected a date YYYY-MM-DD") from None


def make_splits(first: dt.date, last: dt.date, train_end: str | dt.date | None = None,
                val_end: str | dt.date | None = None, fraction: float = 0.15) -> dict[str, Split]:
    """Train / validation / test by date: by default the last ``fraction`` of days is
    test and the ``fraction`` before it validation; ``train_end`` / ``val_end`` override.

    >>> s = make_splits(dt.date(2020, 1, 1), dt.date(2020, 4, 9))   # 100 days
    >>> s["train"].end, s["val"].end, s["test"].start
    (datetime.date(2020, 3, 10), datetime.date(2020, 3, 25), datetime.date(2020, 3, 26))
    """
    n = (last - first).days + 1
    n_hold = max(1, round(fraction * n))
    val_end = _as_date(val_end, "--val_end") or last - dt.timedelta(days=n_hold)
    train_end = _as_date(train_end, "--train_end") or val_end - dt.timedelta(days=n_hold)
    if not first <= train_end < val_end <= last:
        raise RunoffError(f"--train_end {train_end} / --val_end {val_end}: need {first} <= train_end < "
                          f"val_end <= {last} (the cube's dates)")
    return {
        "train": Split("train", first, train_end),
        "val": Split("val", train_end + dt.timedelta(days=1), val_end),
        "test": Split("test", val_end + dt.timedelta(days=1), last) if val_end < last
        else Split("test", last + dt.timedelta(days=1), last),
    }


def choose_split(name: str, splits: dict[str, Split], first: dt.date, last: dt.date,
                 option: str = "--split") -> Split:
    """The checkpoint's ``train``, ``val`` or ``test`` split, ``all`` (the cube's days from
    ``first`` to ``last``), or a period ``START..END`` of the cube's days, either end left out
    for the cube's first or last day: the days that arrived after training, say.

    >>> day = dt.date.fromisoformat
    >>> choose_split("2021-01-01..", {}, day("2019-01-01"), day("2022-12-31"))
    Split(name='2021-01-01..2022-12-31', start=datetime.date(2021, 1, 1), end=datetime.date(2022, 12, 31))
    """
    if name == "all":
        return Split("all", first, last)
    if ".." not in name:
        if name not in splits:
            raise RunoffError(f"{option} {name!r}: choose {', '.join(splits)}, all, or a period START..END "
                              "(YYYY-MM-DD..YYYY-MM-DD)")
        return splits[name]
    start_text, end_text = name.split("..", 1)
    try:
        start = dt.date.fromisoformat(start_text) if start_text else first
        end = dt.date.fromisoformat(end_text) if end_text else last
    except ValueError:
        raise RunoffError(f"{option} {name!r}: expected a period YYYY-MM-DD..YYYY-MM-DD") from None
    if not (start <= end and start <= last and end >= first):
        raise RunoffError(f"{option} {name!r}: need START <= END and days within the cube's {first}..{last}")
    start, end = max(start, first), min(end, last)
    return Split(f"{start}..{end}", start, end)


def cube_dates(ds: xr.Dataset) -> list[dt.date]:
    """The cube's days as :class:`datetime.date`."""
    return [dt.date.fromisoformat(str(t)[:10]) for t in ds.time.values]


def normalisation_stats(ds: xr.Dataset, variables: list[str], train: Split) -> dict[str, dict[str, float]]:
    """Mean and std of ``log1p(value)`` per variable over the training days (QS is skewed), the
    root mean square of the values themselves (``rms``: the scale of the training loss in
    physical units) and their largest value (``max``: what bounds a forecast)."""
    import dask

    days = ds.sel(time=slice(str(train.start), str(train.end)))
    lazy = {}
    for name in variables:
        values = days[name].clip(min=0)
        logged = np.log1p(values)
        lazy[name] = (logged.mean(skipna=True), logged.std(skipna=True), (values ** 2).mean(skipna=True),
                      values.max(skipna=True))
    computed = dask.compute(lazy)[0]
    return {name: checked_stats(name, float(mean), float(std), train, float(np.sqrt(square)), float(largest))
            for name, (mean, std, square, largest) in computed.items()}


CLIMATOLOGY_MAP = "qs_climatology"  # the input `runoff train --climatology_map` adds; the checkpoint carries it


def climatology_map(ds: xr.Dataset, train: Split) -> np.ndarray:
    """Each pixel's mean of ``log1p(qs)`` over the training days, float32 ``(y, x)``, NaN where
    no training day is valid: where runoff is usually high (rivers, wet slopes) and where it
    is dry, a static map that any cube yields without a DEM."""
    days = ds[TARGET].sel(time=slice(str(train.start), str(train.end)))
    return np.asarray(np.log1p(days.clip(min=0)).mean("time", skipna=True).values, np.float32)


SEASON_INPUTS = ("season_cos", "season_sin")  # the inputs `runoff train --season` adds, computed from the dates


def season_values(ds: xr.Dataset, name: str) -> np.ndarray:
    """Input ``name`` of :data:`SEASON_INPUTS` on every day of the cube, float32 ``(time,)``:
    1 + cos and 1 + sin of the day's angle in the year, 2 pi (day of year - 1) / 365.25.

    The same on every pixel, they tell the network the season, which a few past days of
    runoff do not (snow melts in spring, monsoons start in June). Shifted by 1 so that they
    are >= 0, as every input is before the ``log1p`` of :func:`normalise`.

    >>> days = xr.Dataset(coords={"time": np.array(["2001-01-01", "2001-04-02"], "datetime64[ns]")})
    >>> season_values(days, "season_sin").round(3).tolist()
    [1.0, 2.0]
    """
    angle = 2 * np.pi * (ds.time.dt.dayofyear.values - 1) / 365.25
    wave = np.cos if name == SEASON_INPUTS[0] else np.sin
    return (1 + wave(angle)).astype(np.float32)


def held_input(ds: xr.Dataset, name: str, maps: dict[str, np.ndarray] | None = None) -> np.ndarray | None:
    """Input ``name`` when it is not read day by day from the cube ``ds``, float32, as values
    that broadcast against ``(time, y, x)``; None for a daily variable of the cube.

    Inputs come from three places besides the cube's daily variables, and this is the one
    place that tells them apart: a static map held in ``maps`` (the checkpoint's climatology
    map) or stored in the cube, as ``(1, y, x)``; an input of :data:`SEASON_INPUTS`, computed
    from the dates, as ``(time, 1, 1)``. :func:`held_days` takes their days.

    >>> days = xr.Dataset(coords={"time": np.array(["2001-01-01", "2001-04-02"], "datetime64[ns]")})
    >>> held_input(days, "season_sin").shape, held_input(days, "dem", {"dem": np.ones((3, 4))}).shape
    ((2, 1, 1), (1, 3, 4))
    """
    if maps and name in maps:
        return np.asarray(maps[name], np.float32)[None]
    if name in SEASON_INPUTS:
        return season_values(ds, name)[:, None, None]
    if is_static(ds, name):
        return np.asarray(ds[name].values, np.float32)[None]
    return None


def held_days(values: np.ndarray, days: slice | np.ndarray) -> np.ndarray:
    """The days ``days`` (time indices) of a :func:`held_input`: a static map is every day's."""
    return values if values.shape[0] == 1 else values[days]


def map_stats(name: str, values: np.ndarray, train: Split) -> dict[str, float]:
    """:func:`normalisation_stats` of values held in memory (:func:`held_input` on the
    training days): a static map, or a :data:`SEASON_INPUTS` input on each training day."""
    valid = values[~np.isnan(values)]
    if not valid.size:
        return checked_stats(name, np.nan, np.nan, train)
    logged = log_transform(valid).astype(np.float64)
    rms = np.sqrt(np.mean(np.square(np.maximum(valid, 0), dtype=np.float64)))
    return checked_stats(name, float(logged.mean()), float(logged.std()), train, float(rms), float(valid.max()))


def checked_stats(name: str, mean: float, std: float, train: Split, rms: float = 1.0,
                  largest: float = 0.0) -> dict[str, float]:
    """One variable's normalisation statistics; an error when the training days hold no value."""
    if not np.isfinite(mean) or not np.isfinite(std):
        raise RunoffError(f"variable {name}: no valid value in the training days {train.start}..{train.end}")
    # plain floats: checkpoints load weights_only
    return {"mean": float(mean), "std": float(max(std, 1e-6)), "rms": float(max(rms, 1e-6)),
            "max": float(max(largest, 0.0))}


def log_transform(values: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``log1p(max(x, 0))`` in float32, NaN staying NaN: the first half of :func:`normalise`.

    In place (into ``out`` when given), and ``log1p`` only where runoff is positive (most
    pixels of most days are 0, and log1p(0) = 0): 6x faster than the plain expression
    with temporaries, which matters for a sampler's first pass.
    """
    out = np.maximum(values, np.float32(0), out=out, dtype=np.float32)
    np.log1p(out, out=out, where=out > 0)
    return out


def normalise(values: np.ndarray, stats: dict[str, float], out: np.ndarray | None = None) -> np.ndarray:
    """Physical values -> model space: ``(log1p(max(x, 0)) - mean) / std`` (NaN stays NaN), float32."""
    return standardise(log_transform(values, out), stats)


def standardise(values: np.ndarray, stats: dict[str, float]) -> np.ndarray:
    """``(values - mean) / std`` in place, float32: the second half of :func:`normalise`."""
    values -= np.float32(stats["mean"])
    values /= np.float32(stats["std"])
    return values


def denormalise(values: np.ndarray, stats: dict[str, float], out: np.ndarray | None = None) -> np.ndarray:
    """Model space -> physical values, clipped at 0 (inverse of :func:`normalise`), float32:
    into ``out`` (which may be ``values`` itself), else one new array, transformed in place:
    a probabilistic forecast of a large grid is GBs.

    >>> values = np.array([0.0, -1.0], np.float32)
    >>> denormalise(values, {"mean": 1.0, "std": 2.0}, out=values) is values, [round(float(v), 3) for v in values]
    (True, [1.718, 0.0])
    """
    out = np.multiply(values, stats["std"], out=out, dtype=np.float32)
    out += np.float32(stats["mean"])
    np.expm1(out, out=out)
    return np.maximum(out, 0, out=out)
