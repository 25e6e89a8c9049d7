"""Daily rasters -> one chunked, compressed, georeferenced Zarr v3 cube.

The cube gets its whole daily time axis up front and days are written into their
slots (never ``to_zarr(append_dim=...)``, which duplicates days when run twice).
Each data variable records, in its attributes, which file gave each day
(``source_files``) and a digest of the values (``source_digest``). Those records
are what make an ingest idempotent and resumable:

* a day already recorded with the same digest is skipped; a different digest is
  an error unless ``overwrite``;
* records are committed only after the day's chunks are on disk, and Zarr writes
  each chunk and metadata document atomically, so after a kill at any moment the
  same command writes exactly the days that are not recorded yet;
* a new cube (and a cube that must grow before its first day) is built under
  ``STORE.partial`` and renamed into place when complete.

An exclusive ``flock`` on ``.STORE.lock`` beside the store stops two ingests from
writing one cube; the kernel releases it when a process dies, even by SIGKILL.

:func:`ingest_static` adds a static map to a cube: one raster, a ``(y, x)`` layer that
holds on every day (a DEM's flow accumulation, soil depth), recorded the same way.

Example
-------
>>> report = ingest("data/input", "stores/qs.zarr")      # doctest: +SKIP
>>> report.written, report.skipped                        # doctest: +SKIP
(730, 0)
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import multiprocessing
import os
import shutil
import signal
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping, Union

import dask
import dask.array as da
import numpy as np
import pandas as pd
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
import zarr
from dask.callbacks import Callback
from numcodecs import blosc
from zarr.codecs import BloscCodec

from . import __version__
from .cube import CUBE_FORMAT, STATIC_DIMS, TARGET, CubeInfo, Records, read_cube_info
from .errors import RunoffError, RunoffWarning
from .rasters import (DayFile, Grid, ReadOptions, check_grids, find_rasters, georeferencing_key, grid_error,
                      RESAMPLING, list_days, raster_env, read_grid, read_raster, resample_onto)
from .netcdf import NetcdfDay, NetcdfOptions, is_netcdf, open_files, open_netcdf_source
from .storage import is_url, url_filesystem

if TYPE_CHECKING:
    from distributed import Client

DEFAULT_CHUNKS = {"time": 16, "y": 256, "x": 256}
STATIC_FOLDER = "static"  # the sub-folder of static maps in a folder of variables
TIME_UNITS = "days since 1970-01-01"
_EPOCH = dt.date(1970, 1, 1)
_COMMIT_EVERY_S = 0.5
_HELD_LOCKS: set[int] = set()  # file descriptors of the store locks this process holds


@dataclass
class IngestReport:
    """What one ingest did."""

    store: str
    variables: list[str]
    start: dt.date
    end: dt.date
    written: int = 0  # daily maps (a day of one variable) read from files
    skipped: int = 0  # daily maps the cube already held
    missing_dates: list[str] = field(default_factory=list)  # days without a file of the target
    missing_inputs: dict[str, list[str]] = field(default_factory=dict)  # the same, per other variable that has any
    all_nan: list[str] = field(default_factory=list)
    static: list[str] = field(default_factory=list)  # the static maps of the input's static/ folder


@dataclass(frozen=True)
class _Task:
    """Days of one variable inside one time chunk, to be written together."""

    variable: str
    slots: tuple[int, ...]
    reads: tuple[_FileRead | _CubeRead, ...]
    dates: tuple[str, ...]


def parse_chunks(text: str | None) -> dict[str, int]:
    """``"time=16,y=256,x=256"`` -> dict, defaults for the dimensions not named.

    >>> parse_chunks("time=8")
    {'time': 8, 'y': 256, 'x': 256}
    """
    chunks = dict(DEFAULT_CHUNKS)
    if not text:
        return chunks
    for part in text.split(","):
        key, _, value = part.partition("=")
        key = key.strip()
        if key not in chunks or not value.strip().isdigit() or int(value) < 1:
            raise RunoffError(f"--chunks {text!r}: expected time=N,y=N,x=N with positive integers")
        chunks[key] = int(value)
    return chunks


def digest(values: np.ndarray) -> str:
    """Short content digest of one day's float32 values (NaN included)."""
    return hashlib.sha1(np.ascontiguousarray(values, np.float32).data).hexdigest()[:16]


def find_variables(input_dir: str | Path, date_format: str | None = None,
                   start: dt.date | None = None) -> dict[str, list[DayFile]]:
    """Rasters per variable: files directly in ``input_dir`` are ``qs``; otherwise one
    sub-folder per variable (``Qs/``, ``Rainf/``...), named by its lower-cased name
    (``static/`` excepted: see :func:`find_static_maps`).
    ``start``: the date of step 1 of PCRaster map stacks."""
    folder = Path(input_dir)
    if not folder.is_dir():
        raise RunoffError(f"{folder}: no such folder")
    if find_rasters(folder):
        return {TARGET: list_days(folder, date_format, start)}
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
                     and p.name.lower() != STATIC_FOLDER and find_rasters(p))
    if not subdirs:
        raise RunoffError(f"{folder}: no rasters or NetCDF/HDF5 files here or in its sub-folders")
    variables = {p.name.lower(): list_days(p, date_format, start) for p in subdirs}
    if TARGET not in variables:
        raise RunoffError(f"{folder}: sub-folders {', '.join(p.name for p in subdirs)} hold no Qs/ folder "
                          f"(the forecast target)")
    return variables


@contextlib.contextmanager
def store_lock(store: str) -> Iterator[None]:
    """Hold an exclusive lock on a local store for the duration of a write."""
    if is_url(store):
        yield  # object stores have no advisory locks; one writer at a time is the user's rule there
        return
    path = Path(store)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.parent / f".{path.name}.lock"
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunoffError(f"{store}: another ingest is writing this cube right now "
                              f"(lock {lock_path}); wait for it to finish") from None
        _HELD_LOCKS.add(handle.fileno())
        try:
            yield
        finally:
            _HELD_LOCKS.discard(handle.fileno())
            fcntl.flock(handle, fcntl.LOCK_UN)


def _half_built(store: str) -> str:
    """Where a fresh local cube is built before it is renamed into place at ``store``."""
    return store + ".partial"


def _recover_local(store: Path) -> None:
    """Finish or undo a swap that a killed ingest left half done; drop the temp files of
    chunk writes it cut short, in the cube and in a half-built ``STORE.partial`` (which a
    resumed run renames into place, strays included)."""
    replaced = store.with_name(store.name + ".replaced")
    if replaced.exists():
        if store.exists():
            shutil.rmtree(replaced)
        else:
            os.rename(replaced, store)
    for cube in (store, Path(_half_built(str(store)))):
        if cube.is_dir():
            for stray in cube.rglob("*.partial"):
                stray.unlink(missing_ok=True)


def _date_axis(start: dt.date, end: dt.date) -> list[dt.date]:
    return [start + dt.timedelta(days=i) for i in range((end - start).days + 1)]


def _variable_attrs(name: str, files: list[DayFile], options: ReadOptions, units: str | None,
                    long_name: str | None) -> dict:
    _, _, attrs = read_raster(files[0].path, options)
    if name == TARGET:
        attrs["units"] = units or attrs.get("units", "kg m-2")
        attrs["long_name"] = long_name or attrs.get("long_name", "storm surface runoff")
    else:
        attrs.setdefault("long_name", name)
    return attrs


def _create_cube(path: str, grid: Grid, axis: list[dt.date], variables: Mapping[str, dict],
                 chunks: dict[str, int], storage_options: dict | None) -> None:
    """Write the cube's metadata and coordinates; data chunks stay unwritten (NaN)."""
    n, (h, w) = len(axis), grid.shape
    block = (min(chunks["time"], n), min(chunks["y"], h), min(chunks["x"], w))
    data_vars = {
        name: (("time", "y", "x"), da.full((n, h, w), np.nan, dtype=np.float32, chunks=block),
               {**attrs, "source_files": {}, "source_digest": {}})
        for name, attrs in variables.items()
    }
    coords = {"time": pd.DatetimeIndex(axis), "y": grid.y_coords(), "x": grid.x_coords()}
    ds = xr.Dataset(data_vars, coords=coords)
    ds = ds.rio.write_crs(grid.crs_wkt).rio.write_transform(grid.affine).rio.write_coordinate_system()
    ds.time.attrs.update(standard_name="time", long_name="day of the map")
    ds.attrs.update(Conventions="CF-1.8", title="Daily surface runoff cube",
                    source=f"runoff-forecast {__version__} ingest", missing_dates=[])
    # blosc-lz4 with byte shuffle: 5x smaller on QS maps at a third of zstd's cost (see BENCHMARKS.md)
    codec = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
    # rioxarray keeps grid_mapping in .encoding (rioxarray #815): merge, do not replace
    encoding = {name: {**ds[name].encoding, "chunks": block, "compressors": (codec,), "_FillValue": np.nan}
                for name in variables}
    encoding["time"] = {"units": TIME_UNITS, "calendar": "proleptic_gregorian", "dtype": "int64",
                        "chunks": (4096,)}
    ds.to_zarr(path, mode="w-", compute=False, zarr_format=3, consolidated=False, encoding=encoding,
               storage_options=storage_options)
    # last: marks the creation as complete (a kill before this leaves a partial to discard)
    zarr.open_group(path, mode="r+", storage_options=storage_options).update_attributes(
        {"runoff_cube_format": CUBE_FORMAT})


def _resize_time(group: zarr.Group, variables: list[str], axis: list[dt.date]) -> None:
    """Grow (or trim back after a killed run) every time-indexed array to ``axis``."""
    n = len(axis)
    for name in variables:
        arr = group[name]
        if arr.shape[0] != n:
            arr.resize((n, *arr.shape[1:]))
    time_arr = group["time"]
    old = time_arr.shape[0]
    if old != n:
        time_arr.resize((n,))
    values = np.array([(d - _EPOCH).days for d in axis], dtype=np.int64)
    time_arr[:] = values


def _new_array(group: zarr.Group, name: str, like: zarr.Array, dims: tuple[str, ...],
               overwrite: bool = False) -> zarr.Array:
    """A float32 NaN-filled array over the last ``dims`` of ``like`` (the target), chunked and
    compressed as it is."""
    n = len(dims)
    return group.create_array(name, shape=like.shape[-n:], chunks=like.chunks[-n:], dtype="float32",
                              fill_value=np.nan, compressors=like.compressors, dimension_names=dims,
                              overwrite=overwrite)


def _add_variable(group: zarr.Group, name: str, attrs: dict, like: zarr.Array) -> None:
    arr = _new_array(group, name, like, ("time", "y", "x"))
    arr.update_attributes({**attrs, "grid_mapping": "spatial_ref", "source_files": {}, "source_digest": {}})


def find_static_maps(input_dir: str | Path) -> dict[str, Path]:
    """The static maps of a folder of variables: each raster of its ``static/`` sub-folder,
    named by its lower-cased file name without the suffix (``static/upstream_area.tif``)."""
    folder = next((p for p in Path(input_dir).iterdir() if p.is_dir() and p.name.lower() == STATIC_FOLDER), None)
    maps = {path.stem.lower(): path for path in find_rasters(folder)} if folder else {}
    for name, path in maps.items():
        _check_static_name(name, str(path))
    return maps


def _check_static_name(name: str, source: str) -> None:
    if not name.isidentifier():
        raise RunoffError(f"{source}: {name!r} is not a variable name for a static map; use letters, digits and _")


@dataclass(frozen=True)
class _GridCheck:
    """The grid every file must lie on, where it comes from (for the error), and the
    :func:`~pipeline.rasters.georeferencing_key` of a file known to lie on it."""

    grid: Grid
    source: str
    key: bytes | None
    resample: str | None = None  # how covariates and forcings on another grid come onto it

    def read(self, path: Path, options: ReadOptions, out: np.ndarray, variable: str = TARGET) -> None:
        """Read ``path`` (a day of ``variable``) into ``out``. A file on another grid is an
        error, except for a variable other than qs when ``resample`` is set (bilinear,
        average, nearest): it is resampled onto the grid."""
        if self.key is not None and georeferencing_key(path) == self.key:
            read_raster(path, options, out=out, grid=self.grid)  # the same tags, byte for byte
            return
        resample = self.resample if variable != TARGET else None
        if resample is not None:  # one read: its own grid, then onto ours where they differ
            values, file_grid, _ = read_raster(path, options)
            if file_grid.matches(self.grid):
                out[...] = values
            else:
                resample_onto(values, file_grid, self.grid, resample, out)
            return
        file_grid = read_raster(path, options, out=out)[1]
        if not file_grid.matches(self.grid):
            raise grid_error(path, file_grid, self.grid, self.source)


@dataclass(frozen=True)
class _FileRead:
    """Fills one day from a raster file, checking its grid; returns the file's name.

    A module-level class rather than a closure: tasks go to worker processes by
    pickle, which sends a class by reference but a closure by value, code included.
    """

    path: Path
    options: ReadOptions
    check: _GridCheck
    variable: str = TARGET

    @property
    def source(self) -> str:
        return str(self.path)

    def __call__(self, out: np.ndarray) -> str:
        self.check.read(self.path, self.options, out, self.variable)
        return self.path.name


# A day's reader: fills the day's values into a float32 array, returns its provenance for
# ``source_files``, and names its input in errors (``.source``).
_DayRead = Union[_FileRead, NetcdfDay]


@dataclass(frozen=True)
class _CubeRead:
    """Fills one day from a slot of an existing cube (a rebuild); returns its source name."""

    array: zarr.Array
    slot: int
    name: str

    def __call__(self, out: np.ndarray) -> str:
        out[...] = self.array[self.slot]
        return self.name


def _write_task(arr: zarr.Array, task: _Task) -> list[tuple[str, str, str, bool]]:
    """Read a task's days, write them into their slots; return (date, file, digest, all_nan)."""
    block = np.empty((len(task.slots), *arr.shape[1:]), np.float32)
    try:
        with raster_env(), open_files():
            names = [read(block[i]) for i, read in enumerate(task.reads)]
    except RunoffError as exc:
        # it leaves a worker process pickled, with the exceptions it was raised while handling,
        # and rasterio's (CPLE_*) do not unpickle: the user would see that failure, not this line
        exc.__context__ = exc.__cause__ = None
        raise
    start = 0
    for k in range(1, len(task.slots) + 1):  # contiguous runs of slots -> one slice write each
        if k == len(task.slots) or task.slots[k] != task.slots[k - 1] + 1:
            arr[task.slots[start]:task.slots[k - 1] + 1] = block[start:k]
            start = k
    return [(d, n, digest(block[i]), bool(np.isnan(block[i]).all()))
            for i, (d, n) in enumerate(zip(task.dates, names))]


def _plan_tasks(variable: str, writes: dict[dt.date, _FileRead | _CubeRead], axis_index: dict[dt.date, int],
                time_chunk: int) -> list[_Task]:
    by_chunk: dict[int, list[dt.date]] = {}
    for date in sorted(writes):
        by_chunk.setdefault(axis_index[date] // time_chunk, []).append(date)
    return [_Task(variable, tuple(axis_index[d] for d in dates), tuple(writes[d] for d in dates),
                  tuple(d.isoformat() for d in dates))
            for _, dates in sorted(by_chunk.items())]


def _changed_days(present: list[tuple[str, dt.date, "_DayRead"]], info: CubeInfo | None,
                  overwrite: bool) -> set[tuple[str, dt.date]]:
    """Compare days read anew with those ``info`` already records; return the (variable, date) to rewrite.

    A differing day is an error naming its source unless ``overwrite``.
    """
    if not present:
        return set()

    def compare(items: list[tuple[str, dt.date, _DayRead]]) -> list[tuple[str, dt.date, _DayRead, bool]]:
        values = np.empty(info.grid.shape, np.float32)
        same = []
        with raster_env(), open_files():
            for name, date, read in items:
                read(values)
                same.append((name, date, read, digest(values) == info.records[name].digest[date.isoformat()]))
        return same

    workers = os.cpu_count() or 2
    chunks = [present[i::workers] for i in range(workers)]
    rewrite = set()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for name, date, read, same in (item for chunk in pool.map(compare, chunks) for item in chunk):
            if same:
                continue
            if not overwrite:
                old = info.records[name].files[date.isoformat()]
                raise RunoffError(f"{read.source}: its values differ from {date.isoformat()} already in the "
                                  f"cube (from {old}); pass --overwrite to replace that day")
            rewrite.add((name, date))
    return rewrite


def _plan_writes(group: zarr.Group, all_vars: list[str], readers: Mapping[str, Mapping[dt.date, "_DayRead"]],
                 axis: list[dt.date], info: CubeInfo | None, done: CubeInfo | None,
                 old_group: zarr.Group | None, rewrite: set[tuple[str, dt.date]]) -> tuple[list[_Task], int, int]:
    """Tasks for every day the target cube lacks; returns (tasks, days from files, files skipped).

    ``done`` records what the target already holds; when rebuilding (``old_group``), the
    old cube's days are carried over from it rather than re-read from files.
    """
    axis_index = {d: i for i, d in enumerate(axis)}
    tasks: list[_Task] = []
    written = skipped = 0
    for name in all_vars:
        recorded = done.records[name].digest if done and name in done.records else {}
        in_old = info.records[name].digest if info and name in info.records else {}
        writes: dict[dt.date, _FileRead | _CubeRead] = {}
        if old_group is not None:
            for iso, source in info.records.get(name, Records({}, {})).files.items():
                if iso not in recorded:
                    day = dt.date.fromisoformat(iso)
                    writes[day] = _CubeRead(old_group[name], (day - info.start).days, source)
        for date, read in readers.get(name, {}).items():
            iso = date.isoformat()
            if (name, date) not in rewrite and (iso in recorded or iso in in_old):
                skipped += 1
                continue
            writes[date] = read
            written += 1
        tasks += _plan_tasks(name, writes, axis_index, group[name].chunks[0])
    return tasks, written, skipped


class _Committer:
    """Records finished days in the cube's attributes, at most every half second."""

    def __init__(self, group: zarr.Group, info: CubeInfo | None, variables: list[str], bar) -> None:
        self.group, self.bar = group, bar
        self.files = {v: dict(info.records[v].files) if info and v in info.records else {} for v in variables}
        self.digests = {v: dict(info.records[v].digest) if info and v in info.records else {} for v in variables}
        self.dirty: set[str] = set()
        self.last = time.monotonic()
        self.all_nan: list[str] = []

    def record(self, task: _Task, result: list[tuple[str, str, str, bool]]) -> None:
        for date, name, dig, all_nan in result:
            self.files[task.variable][date] = name
            self.digests[task.variable][date] = dig
            if all_nan:
                self.all_nan.append(f"{task.variable} {date} ({name})")
        self.dirty.add(task.variable)
        self.bar.update(len(result))
        if time.monotonic() - self.last > _COMMIT_EVERY_S:
            self.flush()

    def flush(self) -> None:
        for name in sorted(self.dirty):
            self.group[name].update_attributes({
                "source_files": dict(sorted(self.files[name].items())),
                "source_digest": dict(sorted(self.digests[name].items())),
            })
        self.dirty.clear()
        self.last = time.monotonic()


def _init_forked_worker() -> None:
    """Set up a forked ingest worker: it dies with its parent (so a killed ingest leaves no
    orphan writing behind it), and it drops its copies of the store locks (so the lock is
    released the moment the parent dies)."""
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    for fd in _HELD_LOCKS:
        os.close(fd)
    blosc.set_nthreads(1)  # one process per core already: compression threads would only contend


def _local_pool(target: str, tasks: int, num_workers: int | None) -> ProcessPoolExecutor | None:
    """Worker processes for a local store on Linux, or None for threads.

    Reading a GeoTIFF spends about 1 ms per file in rasterio's Python-level open, which
    holds the GIL; processes overlap those opens where threads cannot. Forking (Linux
    only) starts the workers in milliseconds with everything already imported.
    """
    workers = num_workers or os.cpu_count() or 1
    if sys.platform != "linux" or is_url(target) or workers < 2 or tasks < 2:
        return None
    return ProcessPoolExecutor(min(workers, tasks), mp_context=multiprocessing.get_context("fork"),
                               initializer=_init_forked_worker)


def _run_tasks(tasks: list[_Task], arrays: Mapping[str, zarr.Array], committer: _Committer,
               client: "Client | None", num_workers: int | None, target: str) -> None:
    """Write every task, one Dask task each, recording each as soon as it finishes.

    Without a ``client``: Dask's multiprocessing scheduler on forked workers for local
    stores on Linux, its threaded scheduler otherwise.
    """
    # Arguments wrapped as named leaves: Dask would otherwise walk every tuple and dataclass
    # of every task looking for Dask collections, of which there are none.
    leaves = {name: dask.delayed(arr, name=f"ingest-array-{name}", traverse=False) for name, arr in arrays.items()}
    delayed = [dask.delayed(_write_task, pure=False)(leaves[t.variable],
                                                     dask.delayed(t, name=f"ingest-task-{i}", traverse=False))
               for i, t in enumerate(tasks)]
    if client is None:
        by_key = {d.key: t for d, t in zip(delayed, tasks)}

        def posttask(key, result, dsk, state, worker_id) -> None:
            if key in by_key:
                committer.record(by_key[key], result)

        pool = _local_pool(target, len(tasks), num_workers)
        how = (dict(scheduler="threads", num_workers=num_workers) if pool is None
               else dict(scheduler="processes", pool=pool, chunksize=1))
        with Callback(posttask=posttask), (pool or contextlib.nullcontext()):
            dask.compute(*delayed, **how)
        return
    from distributed import as_completed

    futures = client.compute(delayed)
    by_key = {f.key: t for f, t in zip(futures, tasks)}
    try:
        for future, result in as_completed(futures, with_results=True):
            committer.record(by_key[future.key], result)
    finally:
        client.cancel(futures)


@dataclass
class _Input:
    """The days an ingest can write, whatever files they come from: the grid they lie on,
    a reader per variable and day, each variable's attributes, and the days that could
    not be made (incomplete sub-daily steps), with the reason."""

    grid: Grid
    readers: dict[str, dict[dt.date, _DayRead]]
    attrs: dict[str, dict]
    incomplete: dict[str, dict[str, str]] = field(default_factory=dict)


def _raster_input(variables: Mapping[str, list[DayFile]], info: CubeInfo | None, store: str, options: ReadOptions,
                  resample: str | None, units: str | None, long_name: str | None) -> _Input:
    if info is not None:  # an existing cube must not change at all when a file is off-grid
        checked = {name: files for name, files in variables.items() if resample is None or name == TARGET}
        grid = check_grids((d.path for files in checked.values() for d in files), info.grid, options,
                           expected_from=f"the cube {store}") if checked else info.grid
        grid_from = f"the cube {store}"
        reference = next((d.path for files in checked.values() for d in files), None)
    else:  # a new cube is built aside, so each file's grid is checked as it is read
        reference = variables[TARGET][0].path
        grid, grid_from = read_grid(reference, options), f"the first file {reference}"
    # the reference file lies on the grid: it was checked against the cube, or gave the grid
    check = _GridCheck(grid, grid_from, georeferencing_key(reference) if reference else None, resample)
    readers = {name: {d.date: _FileRead(d.path, options, check, name) for d in files}
               for name, files in variables.items()}
    attrs = {name: _variable_attrs(name, files, options, units, long_name) for name, files in variables.items()}
    return _Input(grid, readers, attrs)


def _netcdf_input(source: str | Path, info: CubeInfo | None, store: str, netcdf: NetcdfOptions,
                  resample: str | None, long_name: str | None) -> _Input:
    found = open_netcdf_source(source, netcdf, grid=info.grid if info else None, grid_from=f"the cube {store}",
                               resample=resample)
    if long_name:
        found.attrs[TARGET]["long_name"] = long_name
    readers = {name: {d.date: d for d in days} for name, days in found.days.items()}
    return _Input(found.grid, readers, found.attrs, found.incomplete)


def _refuse_netcdf_options(input_dir: str | Path, netcdf: NetcdfOptions) -> None:
    """One clear error when NetCDF-only settings come with rasters, which would ignore them
    (their variables are named by their sub-folders, their days by their file names)."""
    defaults = NetcdfOptions()
    given = [option for option, name in (("--variable", "variables"), ("--aggregate", "aggregate"),
                                         ("--day_start", "day_start"), ("--stamp", "stamp"))
             if getattr(netcdf, name) != getattr(defaults, name)]
    if given:
        raise RunoffError(f"{', '.join(given)}: NetCDF/HDF5 settings, but {input_dir} holds rasters (their "
                          f"variables are named by their sub-folders, their days by their file names)")


def ingest(input_dir: str | Path, store: str | Path, *, date_format: str | None = None,
           options: ReadOptions = ReadOptions(), chunks: dict[str, int] | None = None,
           overwrite: bool = False, units: str | None = None, long_name: str | None = None,
           progress: bool = False, storage_options: dict | None = None,
           num_workers: int | None = None, client: "Client | None" = None,
           resample: str | None = None, netcdf: NetcdfOptions | None = None,
           start: dt.date | None = None) -> IngestReport:
    """Ingest the rasters or NetCDF/HDF5 files of ``input_dir`` into the cube ``store``
    (created, extended or filled).

    ``input_dir``: a folder of daily rasters, a folder (or file, or glob) of NetCDF/HDF5
    files, or a folder of one such sub-folder per variable; the rasters of its ``static/``
    sub-folder become static maps (:func:`ingest_static`). ``netcdf`` says how NetCDF
    steps become days (see :mod:`pipeline.netcdf`); ``units`` is the units label of qs
    rasters, and for NetCDF the units to convert to unless ``netcdf`` gives them.
    ``start``: the date of step 1 of PCRaster map stacks (``IW000000.001`` ...).

    ``resample`` (bilinear, average or nearest): covariates and forcings on another grid than
    ``qs`` (a coarser rain forecast) are resampled onto the cube's grid; without it, any
    file off the grid is an error.

    The reads and chunk writes run as Dask tasks, one per time chunk: on ``num_workers``
    forked processes for a local store on Linux, on threads elsewhere, or on the
    ``distributed`` cluster of ``client`` (see :mod:`pipeline.cluster`).

    Raises :class:`RunoffError` for bad input, before anything is written.
    """
    store = str(store)
    if resample is not None and resample not in RESAMPLING:
        raise RunoffError(f"--resample {resample!r}: choose {', '.join(RESAMPLING)}")
    chunks = chunks or dict(DEFAULT_CHUNKS)
    from_netcdf = is_netcdf(input_dir)
    if not from_netcdf and netcdf is not None:
        _refuse_netcdf_options(input_dir, netcdf)
    variables = None if from_netcdf else find_variables(input_dir, date_format, start)
    static = {} if from_netcdf else find_static_maps(input_dir)
    with store_lock(store):
        if not is_url(store):
            _recover_local(Path(store))
        info = read_cube_info(store, storage_options) if _exists(store, storage_options) else None
        if from_netcdf:
            netcdf = netcdf or NetcdfOptions(units=units, crs=options.crs, nodata=options.nodata)
            days = _netcdf_input(input_dir, info, store, netcdf, resample, long_name)
        else:
            days = _raster_input(variables, info, store, options, resample, units, long_name)
        grid, readers = days.grid, days.readers
        for path in static.values():  # an off-grid static map fails before any day is written
            if resample is None and not (file_grid := read_grid(path, options)).matches(grid):
                raise grid_error(path, file_grid, grid, f"the grid of {TARGET}")
        dates = {d for by_date in readers.values() for d in by_date}
        dates |= {dt.date.fromisoformat(iso) for reasons in days.incomplete.values() for iso in reasons}
        if info is not None:
            dates |= {info.start, info.end}
        if not dates:
            raise RunoffError(f"{input_dir}: no complete day to ingest")
        axis = _date_axis(min(dates), max(dates))

        # Compare with what is already there before writing anything.
        present = [(name, date, read) for name, by_date in readers.items() for date, read in by_date.items()
                   if info is not None and name in info.records and date.isoformat() in info.records[name].digest]
        rewrite = _changed_days(present, info, overwrite)

        rebuild = info is None or axis[0] < info.start
        if rebuild and is_url(store) and info is not None:
            raise RunoffError(f"{store}: new days before the cube's first day ({info.start}) need a rebuild, "
                              f"which is supported on local stores only; ingest into a new store")
        target = store if (info is not None and not rebuild) or is_url(store) else _half_built(store)
        all_vars = sorted(set(readers) | (set(info.variables) if info else set()))
        attrs = dict(days.attrs)
        if info is not None:
            attrs.update({name: info.attrs[name] for name in info.variables})

        partial = _read_partial(target, storage_options) if target != store else None
        fresh_url_cube = target == store and info is None  # object stores: built in place
        if fresh_url_cube or (target != store and (partial is None or partial.start != axis[0]
                                                    or not partial.grid.matches(grid))):
            if not is_url(target):
                shutil.rmtree(target, ignore_errors=True)
            _create_cube(target, grid, axis, {v: attrs[v] for v in all_vars}, chunks, storage_options)
            partial = None
        if partial is not None:  # a killed run's days whose files changed since are simply rewritten
            resumed = [(n, d, read) for n, by_date in readers.items() for d, read in by_date.items()
                       if n in partial.records and d.isoformat() in partial.records[n].digest
                       and (info is None or n not in info.records or d.isoformat() not in info.records[n].digest)]
            rewrite |= _changed_days(resumed, partial, overwrite=True)
        group = zarr.open_group(target, mode="r+", use_consolidated=False, storage_options=storage_options)
        for name in all_vars:
            if name not in group:
                _add_variable(group, name, attrs[name], group[TARGET])
            # so that a plain xr.open_zarr(cube) has spatial_ref as a coordinate, and .rio.crs; cubes
            # written before 2026-12-03 lack it (their added variables excepted) and gain it here
            if "coordinates" not in group[name].attrs:
                group[name].update_attributes({"coordinates": "spatial_ref"})
        _resize_time(group, all_vars, axis)
        done = partial if target != store else info
        old_group = zarr.open_group(store, mode="r", use_consolidated=False, storage_options=storage_options) if rebuild and info else None
        tasks, written, skipped = _plan_writes(group, all_vars, readers, axis, info, done, old_group, rewrite)

        # the chunks written here hold data: zarr's all-NaN test of each chunk is wasted work (~30%)
        arrays = {name: group[name].with_config({"write_empty_chunks": True}) for name in all_vars}
        from tqdm import tqdm
        with tqdm(total=sum(len(t.slots) for t in tasks), unit="day", desc="ingest",
                  disable=not progress) as bar:
            committer = _Committer(group, done, all_vars, bar)
            try:
                _run_tasks(tasks, arrays, committer, client, num_workers, target)
            except RunoffError:
                if target != store and not is_url(target):
                    shutil.rmtree(target, ignore_errors=True)  # a bad file: the new cube never appears
                raise
            finally:
                if Path(target).exists() or is_url(target):
                    committer.flush()

        if old_group is not None:  # a rebuilt cube keeps the static maps of the one it replaces
            for name in info.static:
                _write_static(group, name, old_group[name][:], dict(old_group[name].attrs))
        by_variable = _finish_attrs(group, all_vars, axis, committer.files, days.incomplete)
        _consolidate(group)
        if target != store:
            _swap_into_place(Path(target), Path(store))
    for name, path in static.items():  # onto the finished cube's grid, as `runoff ingest FILE --static NAME`
        ingest_static(path, store, name, options=options, resample=resample, overwrite=overwrite,
                      storage_options=storage_options)
    missing = by_variable[TARGET]
    report = IngestReport(store, all_vars, axis[0], axis[-1], written=written, skipped=skipped,
                          missing_dates=missing, missing_inputs={n: d for n, d in by_variable.items()
                                                                 if n != TARGET and d},
                          all_nan=committer.all_nan, static=sorted(static))
    for name, lacking in by_variable.items():
        if lacking:
            shown = ", ".join(lacking[:10]) + (f" and {len(lacking) - 10} more" if len(lacking) > 10 else "")
            warnings.warn(f"{store}: {len(lacking)} day(s) without a {name} file are kept as NaN"
                          + ("" if name == TARGET else "; windows that read them are left out") + f": {shown}",
                          RunoffWarning, stacklevel=2)
    for name, reasons in days.incomplete.items():
        if reasons:
            shown = "; ".join(f"{d}: {r}" for d, r in list(reasons.items())[:5])
            warnings.warn(f"{store}: {len(reasons)} day(s) of {name} with incomplete steps are missing days, "
                          f"not summed short: {shown}" + (" ..." if len(reasons) > 5 else ""),
                          RunoffWarning, stacklevel=2)
    for item in committer.all_nan:
        warnings.warn(f"{store}: day {item} holds no valid pixel (all nodata); kept as NaN",
                      RunoffWarning, stacklevel=2)
    return report


def ingest_static(source: str | Path, store: str | Path, name: str, *, options: ReadOptions = ReadOptions(),
                  resample: str | None = None, overwrite: bool = False, units: str | None = None,
                  long_name: str | None = None, storage_options: dict | None = None) -> bool:
    """Write the raster ``source`` into the existing cube ``store`` as the static map ``name``:
    a ``(y, x)`` variable that holds on every day, such as a DEM's flow accumulation, which
    ``runoff train --covariates NAME`` reads on every input day.

    The raster must lie on the cube's grid, or is resampled onto it with ``resample``
    (bilinear, average, nearest). The same values again are skipped; other values are an
    error unless ``overwrite``. Returns whether anything was written.

    >>> ingest_static("dem/flowacc.tif", "stores/qs.zarr", "upstream_area")   # doctest: +SKIP
    True
    """
    store, path = str(store), Path(source)
    _check_static_name(name, f"--static {source}")
    if resample is not None and resample not in RESAMPLING:
        raise RunoffError(f"--resample {resample!r}: choose {', '.join(RESAMPLING)}")
    if not path.is_file():
        raise RunoffError(f"{source}: no such raster file (a static map is one file)")
    with store_lock(store):
        if not is_url(store):
            _recover_local(Path(store))
        info = read_cube_info(store, storage_options)
        if name in info.variables:
            raise RunoffError(f"--static {name}: the cube {store} has a daily variable of that name; choose another")
        values, file_grid, attrs = read_raster(path, options)
        if not file_grid.matches(info.grid):
            if resample is None:
                raise grid_error(path, file_grid, info.grid, f"the cube {store} (pass --resample to resample it)")
            on_grid = np.empty(info.grid.shape, np.float32)
            resample_onto(values, file_grid, info.grid, resample, on_grid)
            values = on_grid
        group = zarr.open_group(store, mode="r+", use_consolidated=False, storage_options=storage_options)
        recorded = group[name].attrs.get("source_digest") if name in info.static else None
        fresh = digest(values)
        if recorded == fresh:
            return False
        if recorded is not None and not overwrite:
            raise RunoffError(f"{source}: the static map {name} of {store} holds other values; "
                              f"pass --overwrite to replace it")
        attrs.update({"units": units or attrs.get("units", "1"), "long_name": long_name or attrs.get("long_name", name),
                      "source_file": path.name, "source_digest": fresh})
        _write_static(group, name, values, attrs)
        _consolidate(group)
    return True


def _consolidate(group: zarr.Group) -> None:
    """Gather the metadata of a cube just written into its root document: readers (``open_cube``)
    get one document and a consistent snapshot; writers ignore it."""
    with warnings.catch_warnings():  # "consolidated metadata is not in the v3 spec": we know
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(group.store)


def _write_static(group: zarr.Group, name: str, values: np.ndarray, attrs: dict) -> None:
    """(Re)write the static map ``name`` of ``group``; its digest, recorded last, marks it complete."""
    arr = _new_array(group, name, group[TARGET], STATIC_DIMS, overwrite=True)
    arr[:] = values
    arr.update_attributes({**attrs, "grid_mapping": "spatial_ref", "coordinates": "spatial_ref"})


MADE_FROM = "ingested_from"  # the folder or file a --data_dir / --input_dir cube was made from
# what `runoff ingest` takes and `train` / `predict` / `evaluate` do not: an error that asks
# for one of them, met while those commands ingest a folder with the defaults, says where it goes
_INGEST_OPTIONS = ("--crs", "--png_scale", "--like", "--band", "--nodata", "--date_format", "--start", "--variable",
                   "--aggregate", "--day_start", "--stamp", "--units", "--resample", "--overwrite", "--chunks")


def _made_from(store: Path) -> str | None:
    """The source recorded in a cube that :func:`ensure_cube` made, else None."""
    if not (store / "zarr.json").exists():
        return None
    return zarr.open_group(store, mode="r", use_consolidated=False).attrs.get(MADE_FROM)


def default_store(source: str | Path, stores_dir: str | Path = "stores") -> Path:
    """Where a folder (or one NetCDF file) of input data is ingested when given in place of a
    cube: ``stores/<folder name>.zarr`` (``stores/<file stem>.zarr``).

    >>> default_store("data/river")
    PosixPath('stores/river.zarr')
    """
    source = Path(source).resolve()
    return Path(stores_dir) / f"{source.name if source.is_dir() else source.stem}.zarr"


def ensure_cube(data_dir: str | Path, stores_dir: str | Path = "stores", storage_options: dict | None = None,
                progress: bool = False, option: str = "--data_dir") -> str:
    """The cube behind ``--data_dir``: a cube as it is, or a folder of rasters or NetCDF files
    (or one NetCDF file) ingested (idempotently) into ``stores/<name>.zarr`` first, with the
    defaults of ``runoff ingest``."""
    path = str(data_dir)
    if is_url(path) or (Path(path) / "zarr.json").exists():
        return path
    if not Path(path).exists():
        raise RunoffError(f"{option} {path}: no such cube or folder")
    if (Path(path).is_dir() and not path.rstrip("/").endswith(".zarr")) or is_netcdf(path):
        source = Path(path).resolve()
        store = default_store(source, stores_dir)
        # two folders of one name (two "input"s) would share the store: their days would mix
        made_from = _made_from(store)
        if made_from not in (None, str(source)):
            raise RunoffError(f"{option} {path}: {store} holds the days of {made_from}; ingest this one into a "
                              f"cube of its own (runoff ingest {path} stores/NAME.zarr) and pass that")
        try:
            report = ingest(path, store, progress=progress, storage_options=storage_options)
        except RunoffError as exc:
            if not any(name in str(exc) for name in _INGEST_OPTIONS):
                raise
            raise RunoffError(f"{exc} (an option of runoff ingest: run `runoff ingest {path} {store}` with it, "
                              f"then pass {option} {store})") from None
        if report.written:
            print(f"{option} {path}: ingested {report.written} daily map(s) into {store}")
        if made_from is None:
            group = zarr.open_group(store, mode="r+", use_consolidated=False)
            group.update_attributes({MADE_FROM: str(source)})
            _consolidate(group)
        return str(store)
    raise RunoffError(f"{option} {path}: neither a Zarr cube nor a folder of rasters or NetCDF files")


def _exists(store: str, storage_options: dict | None) -> bool:
    if not is_url(store):
        return Path(store).exists()
    fs, root = url_filesystem(store, storage_options)
    return fs.exists(root)


def _read_partial(target: str, storage_options: dict | None) -> CubeInfo | None:
    """A cube a killed ingest left half built, or None (also when it died while creating it)."""
    if not _exists(target, storage_options):
        return None
    try:
        info = read_cube_info(target, storage_options)
    except RunoffError:
        return None
    return info if info.format_version == CUBE_FORMAT else None


def _finish_attrs(group: zarr.Group, variables: list[str], axis: list[dt.date],
                  files: Mapping[str, Mapping[str, str]], incomplete: Mapping[str, Mapping[str, str]]
                  ) -> dict[str, list[str]]:
    """Write ``missing_dates`` per variable and, for the target, on the group; and
    ``missing_reasons`` for the missing days whose steps were incomplete (kept from
    earlier runs while those days stay missing). Returns the missing days per variable."""
    by_variable = {}
    for name in variables:
        missing = [d.isoformat() for d in axis if d.isoformat() not in files[name]]
        reasons = {**group[name].attrs.get("missing_reasons", {}), **incomplete.get(name, {})}
        group[name].update_attributes({"missing_dates": missing,
                                       "missing_reasons": {d: reasons[d] for d in missing if d in reasons}})
        by_variable[name] = missing
    group.update_attributes({"missing_dates": by_variable[TARGET]})
    return by_variable


def _swap_into_place(built: Path, store: Path) -> None:
    """Replace ``store`` by the finished ``built`` cube with two renames (see _recover_local)."""
    if store.exists():
        replaced = store.with_name(store.name + ".replaced")
        os.rename(store, replaced)
        os.rename(built, store)
        shutil.rmtree(replaced)
    else:
        os.rename(built, store)
