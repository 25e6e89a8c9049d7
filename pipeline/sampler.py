"""Dask-backed window sampler: cube -> ``(input_days, channels, H, W)`` windows for PyTorch.

A window issued on day *t* holds the input days ``t-N+1 .. t`` of every variable (a static
``(y, x)`` map repeated on each), the forcings (inputs known ahead, such as a rain forecast)
on the lead days ``t+1 .. t+max(lead)``, and the target ``qs`` on days ``t + lead`` for each lead. Windows with a missing day are
skipped; NaN target pixels are masked out of the loss.

Reading pattern: the issue days are grouped in consecutive *blocks*; each block's
days are read once, by Dask tasks in threads that each decode a Dask chunk of whole
stored chunks (:func:`block_chunks`) from Zarr straight into the block and normalise
it there, then every window of the block is cut from that array with integer
indexing. So a chunk is decoded once per pass, never once per sample, and memory is
bounded by ``block_bytes``. A cube whose windows fit in one block is decoded once per
run, and :meth:`WindowSampler.fit_stats` takes the training statistics from that same
read. Blocks are shuffled, then the windows inside each block.

Training patches of a grid so large that one stored time chunk of whole maps overflows
``block_bytes`` (a 1 km continent) come from *regions*: each block of one stored time
chunk of issue days reads only a region of whole stored spatial chunks, as large as
``block_bytes`` holds and at least a patch wide, drawn anew for each block and epoch, and
its windows' patches lie inside it (:meth:`WindowSampler.regions`). Memory stays within
``block_bytes``, and an epoch decodes that region's share of the map for each block
instead of the whole map. Each DataLoader worker
(and each DDP rank) opens the store itself and takes its own share of the blocks.

Example
-------
>>> ds = open_cube("stores/qs.zarr")                                     # doctest: +SKIP
>>> issues = window_issues(ds, splits["train"], WindowSpec(6, (1,)))     # doctest: +SKIP
>>> sampler = WindowSampler("stores/qs.zarr", issues, WindowSpec(6, (1,)), stats, patch=64)  # doctest: +SKIP
>>> window = next(iter(sampler))                                          # doctest: +SKIP
>>> window.x.shape, window.y.shape, int(window.issue)                     # doctest: +SKIP
(torch.Size([6, 1, 64, 64]), torch.Size([1, 1, 64, 64]), 412)
"""

from __future__ import annotations

import contextlib
import multiprocessing
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator, NamedTuple, Sequence

import dask
import dask.array as da
import numpy as np
import torch
import xarray as xr
import zarr
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from zarr.core.buffer import default_buffer_prototype

from .cube import (TARGET, Split, checked_stats, cube_dates, held_days, held_input, log_transform, map_stats,
                   normalisation_stats, normalise, open_cube, standardise)
from .errors import RunoffError


@dataclass(frozen=True)
class WindowSpec:
    """What a window holds: ``input_days`` past days of ``variables`` (target first), targets at
    ``leads``, and ``forcings`` on the lead days ``1 .. max(leads)``."""

    input_days: int = 6
    leads: tuple[int, ...] = (1,)
    variables: tuple[str, ...] = (TARGET,)
    forcings: tuple[str, ...] = ()

    @property
    def inputs(self) -> tuple[str, ...]:
        """Every variable a window reads: the past inputs, then the forcings not among them."""
        return self.variables + tuple(f for f in self.forcings if f not in self.variables)

    @property
    def span(self) -> tuple[int, int]:
        """Days before and after the issue day that a window touches."""
        return self.input_days - 1, max(self.leads)


class Window(NamedTuple):
    """One sample; a DataLoader batches each field (``x`` becomes ``(batch, T, C, H, W)``)."""

    x: torch.Tensor  # float32 (input_days, channels, h, w): normalised inputs, NaN -> 0
    y: torch.Tensor  # float32 (leads, 1, h, w): normalised target, NaN -> 0
    mask: torch.Tensor  # bool like y: True where the target is valid
    issue: int  # time index of the issue day (which window this is); a DataLoader batches it to int64
    forcings: torch.Tensor  # float32 (max lead, forcings, h, w): normalised, NaN -> 0; 0 forcings: empty


def collate_windows(windows: Sequence[Window], pin_memory: bool = False) -> Window:
    """Stack windows into one batch, as the DataLoader's default collation does (``x``
    becomes ``(batch, T, C, H, W)``, ``issue`` an int64 tensor), but with numpy's
    single-threaded copies, straight into page-locked memory when ``pin_memory`` (CUDA;
    not in loader worker processes, which have no CUDA context).

    ``torch.stack`` and ``Tensor.pin_memory`` copy in an OpenMP parallel region whose
    threads, in the thread that prefetches batches for an accelerator, take cores from the
    thread launching the step (see BENCHMARKS.md).

    >>> w = Window(torch.zeros(6, 1, 4, 4), torch.ones(1, 1, 4, 4), torch.ones(1, 1, 4, 4, dtype=torch.bool), 7,
    ...            torch.zeros(1, 0, 4, 4))
    >>> batch = collate_windows([w, w])
    >>> batch.x.shape, batch.mask.dtype, batch.issue.tolist()
    (torch.Size([2, 6, 1, 4, 4]), torch.bool, [7, 7])
    """
    def stacked(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        out = torch.empty((len(tensors), *tensors[0].shape), dtype=tensors[0].dtype, pin_memory=pin_memory)
        np.stack([t.numpy() for t in tensors], out=out.numpy())
        return out

    x, y, mask, issue, forcings = zip(*windows)
    return Window(stacked(x), stacked(y), stacked(mask), torch.tensor(issue, dtype=torch.int64), stacked(forcings))


def block_chunks(shape: tuple[int, int, int], stored: tuple[int, int, int],
                 target_bytes: int = 32 * 2**20) -> dict[str, int]:
    """Dask chunks for reading many consecutive days of a float32 ``(time, y, x)`` array
    of ``shape`` stored in chunks of ``stored``.

    Whole stored chunks grouped into Dask chunks of about ``target_bytes``: whole maps
    when a stored time chunk of the whole grid fits, the stored chunks otherwise. A
    block read is then a few large tasks, each decoding its stored chunks concurrently
    in Zarr, rather than one task per stored chunk (2x faster on a 224x464 grid).

    >>> block_chunks((365, 224, 464), (16, 224, 256))
    {'time': 80, 'y': -1, 'x': -1}
    >>> block_chunks((365, 4000, 6000), (16, 256, 256))
    {'time': 16, 'y': 256, 'x': 256}
    """
    stored_time, stored_y, stored_x = stored
    day_bytes = 4 * shape[1] * shape[2]
    if stored_time * day_bytes > target_bytes:
        return {"time": stored_time, "y": stored_y, "x": stored_x}
    return {"time": stored_time * (target_bytes // (stored_time * day_bytes)), "y": -1, "x": -1}


def window_issues(ds: xr.Dataset, split: Split, spec: WindowSpec) -> np.ndarray:
    """Time indices of the issue days of every complete window whose targets lie in ``split``."""
    dates = cube_dates(ds)
    missing = set(ds.attrs.get("missing_dates", []))
    for name in spec.inputs[1:]:
        missing |= set(ds[name].attrs.get("missing_dates", []) if name in ds else [])  # not in ds: a map in memory
    present = np.array([d.isoformat() not in missing for d in dates])
    before, after = spec.span
    issues = []
    for t in range(before, len(dates) - after):
        if not all(split.contains(dates[t + lead]) for lead in spec.leads):
            continue
        if present[t - before:t + 1].all() and all(present[t + lead] for lead in spec.leads):
            issues.append(t)
    return np.array(issues, dtype=np.int64)


def check_windows(issues: np.ndarray, split: Split, spec: WindowSpec, n_days: int) -> None:
    """A clear error when a split has no complete window."""
    if issues.size == 0:
        raise RunoffError(
            f"the {split.name} split ({split.start}..{split.end}) has no complete window of "
            f"--input_days {spec.input_days} + leads {','.join(map(str, spec.leads))} in a cube of {n_days} days; "
            f"use fewer input days or leads, or more data")


def _read_region(array: zarr.Array, selection: tuple[slice, ...], out: np.ndarray, valid: np.ndarray,
                 transform: Callable[..., np.ndarray]) -> None:
    """Decode ``array[selection]`` straight into ``out``, then ``transform(out, out=out)``
    with NaN -> 0, and record in ``valid`` where it was not NaN (ingest stores nodata as
    NaN, never inf, in float32 with no scale or offset: the stored values are the cube's)."""
    array.get_basic_selection(selection, out=default_buffer_prototype().nd_buffer.from_numpy_array(out))
    _transform_in_place(out, valid, transform)


def _transform_in_place(out: np.ndarray, valid: np.ndarray, transform: Callable[..., np.ndarray]) -> None:
    """``transform(out, out=out)`` with NaN -> 0; ``valid``: where ``out`` was not NaN."""
    missing = np.isnan(out, out=valid)  # the mask's buffer holds "missing" until the last line
    transform(out, out=out)
    np.copyto(out, 0, where=missing)
    np.logical_not(missing, out=valid)


def _read_held(values: np.ndarray, out: np.ndarray, valid: np.ndarray, transform: Callable[..., np.ndarray]) -> None:
    """Values held in memory that broadcast against ``out`` and ``valid`` ``(T, H, W)`` (a
    static map, or one value per day: :func:`~pipeline.cube.held_input`), transformed and
    masked as :func:`_read_region` does, once at their own shape before the broadcast."""
    values = np.array(values, np.float32)
    held_valid = np.empty(values.shape, bool)
    _transform_in_place(values, held_valid, transform)
    out[...] = values
    valid[...] = held_valid


def _region_side(size: int, stored: int, patch: int, wanted: float) -> int:
    """A side of a region: ``wanted`` pixels down to whole ``stored`` chunks, at least a
    ``patch`` (up to whole chunks), at most the map's ``size``.

    >>> _region_side(4000, 512, 64, 1577.3), _region_side(4000, 512, 600, 300.0), _region_side(700, 512, 64, 1e4)
    (1536, 1024, 700)
    """
    return min(size, max(-(-patch // stored) * stored, int(wanted) // stored * stored))


class WindowSampler(IterableDataset):
    """Iterable dataset of :class:`Window` samples ``(x, y, mask, issue)``, see the module docstring.

    ``patch``: random ``patch x patch`` crops (training); None: the full grid. ``maps``: static
    inputs held in memory rather than in the cube (the checkpoint's climatology map), by name.
    """

    task_bytes = 32 * 2**20  # about how much one Dask task of a block read decodes (block_chunks)

    def __init__(self, store: str, issues: np.ndarray, spec: WindowSpec, stats: dict[str, dict[str, float]],
                 patch: int | None = None, shuffle: bool = False, seed: int = 0,
                 block_bytes: int = 512 * 2**20, storage_options: dict | None = None,
                 maps: dict[str, np.ndarray] | None = None) -> None:
        super().__init__()
        self.store, self.spec, self.stats, self.maps = str(store), spec, stats, dict(maps or {})
        self.issues = np.asarray(issues, dtype=np.int64)
        self.patch, self.shuffle, self.seed = patch, shuffle, seed
        self.block_bytes, self.storage_options = block_bytes, storage_options
        # in shared memory: DataLoader workers that persist across epochs read the epoch the
        # training loop set, not the one their copy of the sampler was made with
        self._epoch = multiprocessing.get_context("spawn").RawValue("q", 0)
        self.rank, self.world_size = 0, 1
        self._ds: xr.Dataset | None = None
        self._group: zarr.Group | None = None  # the same store, for reading blocks straight from Zarr
        self._cached: tuple[tuple[int, int], tuple[np.ndarray, np.ndarray]] | None = None  # reused next epoch
        self._held: dict[str, np.ndarray | None] = {}  # held_input of each input, looked up once

    @property
    def epoch(self) -> int:
        return self._epoch.value

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (deterministic for the seed), as DistributedSampler does;
        also in DataLoader workers that persist across epochs."""
        self._epoch.value = epoch

    def shard(self, rank: int, world_size: int) -> "WindowSampler":
        """Keep only this DDP rank's share of the blocks."""
        self.rank, self.world_size = rank, world_size
        return self

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_ds"] = state["_group"] = None  # each worker process opens the store itself
        state["_cached"] = None
        state["_held"] = {}
        return state

    @property
    def ds(self) -> xr.Dataset:
        """The cube, with Dask chunks made for reading blocks of whole days (:func:`block_chunks`)."""
        if self._ds is None:
            self._group = zarr.open_group(self.store, mode="r", storage_options=self.storage_options)
            stored = self._group[TARGET]
            chunks = block_chunks(stored.shape, stored.chunks, self.task_bytes)
            self._ds = open_cube(self.store, self.storage_options, chunks=chunks)
        return self._ds

    def held(self, name: str) -> np.ndarray | None:
        """Input ``name`` when it is not read day by day from the cube (:func:`~pipeline.cube.held_input`)."""
        if name not in self._held:
            self._held[name] = held_input(self.ds, name, self.maps)
        return self._held[name]

    def _stored_chunks(self) -> tuple[int, int, int]:
        """The target's stored chunk shape (time, y, x)."""
        target = self.ds[TARGET]
        return tuple(target.encoding.get("chunks", (16, *target.shape[1:])))

    def _pixel_day_bytes(self) -> int:
        """Bytes a block holds per pixel and day: one float32 per input."""
        return 4 * len(self.spec.inputs)

    def _whole_map_days(self) -> int:
        """Issue days whose windows' whole maps fit in ``block_bytes`` (at least 1)."""
        day_bytes = self._pixel_day_bytes() * self.ds.sizes["y"] * self.ds.sizes["x"]
        before, after = self.spec.span
        return max(self.block_bytes // day_bytes - before - after, 1)

    @property
    def regional(self) -> bool:
        """Whether blocks read regions rather than whole maps: training patches of a grid
        whose whole maps for one stored time chunk of issue days overflow ``block_bytes``."""
        return self.patch is not None and self._whole_map_days() < self._stored_chunks()[0]

    def blocks(self) -> list[np.ndarray]:
        """Issue days grouped so that one block's days fit in ``block_bytes``: whole stored
        time chunks of them, or one stored time chunk each when blocks read regions."""
        if self.issues.size == 0:
            return []
        chunk = self._stored_chunks()[0]
        # chunk-aligned block edges
        days_per_block = chunk if self.regional else max(chunk, self._whole_map_days() // chunk * chunk)
        keys = self.issues // days_per_block
        return [self.issues[keys == k] for k in np.unique(keys)]

    def region_shape(self) -> tuple[int, int]:
        """Rows and columns of a block's region: as large as ``block_bytes`` holds for one
        stored time chunk of windows, in whole stored chunks, at least a patch a side."""
        h, w = self.ds.sizes["y"], self.ds.sizes["x"]
        days, rows_chunk, cols_chunk = self._stored_chunks()
        pixels = self.block_bytes // (self._pixel_day_bytes() * (days + sum(self.spec.span)))
        rows = _region_side(h, rows_chunk, self.patch, np.sqrt(pixels))
        return rows, _region_side(w, cols_chunk, self.patch, pixels / rows)

    def regions(self, rng: np.random.Generator, count: int) -> list[tuple[slice, slice] | None]:
        """``count`` regions (rows, columns) of :meth:`region_shape` drawn from ``rng``,
        starting at stored chunk edges (or flush with the map's far edge), where a block's
        patches lie when blocks read regions; None (the whole map) for each otherwise,
        drawing nothing."""
        if not self.regional:
            return [None] * count
        h, w = self.ds.sizes["y"], self.ds.sizes["x"]
        spans = []
        for size, side, stored in zip((h, w), self.region_shape(), self._stored_chunks()[1:]):
            starts = np.unique([*range(0, size - side + 1, stored), size - side])
            spans.append([slice(int(start), int(start) + side) for start in rng.choice(starts, count)])
        return list(zip(*spans))

    def _my_blocks(self, rng: np.random.Generator) -> list[tuple[int, int, np.ndarray]]:
        """This rank's and this worker's disjoint share of the windows: ``(first, last, issues)``
        per block, blocks in (shuffled) order. ``first..last`` are the days the whole block
        touches, so every rank and worker reads (and caches) the same range."""
        before, after = self.spec.span
        blocks = [(int(b.min()) - before, int(b.max()) + after, b) for b in self.blocks()]
        if self.world_size > 1:  # every rank reads every block but keeps its own windows of it
            blocks = [(first, last, b[self.rank::self.world_size]) for first, last, b in blocks]
        info = get_worker_info()
        if info is not None and info.num_workers > 1:
            if len(blocks) >= info.num_workers:
                blocks = blocks[info.id::info.num_workers]
            else:
                blocks = [(first, last, b[info.id::info.num_workers]) for first, last, b in blocks]
        blocks = [block for block in blocks if block[2].size]
        if self.shuffle:
            blocks = [blocks[i] for i in rng.permutation(len(blocks))]
        return blocks

    def _read(self, first: int, last: int, transform: Callable[[str], Callable[..., np.ndarray]],
              region: tuple[slice, slice] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Days ``first..last`` as ``transform(variable)(values, out=...)``, ``(T, V, H, W)``,
        NaN -> 0, and where they were valid (not NaN); of ``region`` (rows, columns) only,
        else of the whole map.

        One Dask task per Dask chunk of the days (whole stored chunks, :func:`block_chunks`),
        run in threads: each decodes its chunks from Zarr straight into its region of the
        block, then transforms, fills and masks that region in place. No intermediate
        chunk arrays, no concatenated copy and no block-wide pass after the read: fresh
        memory is the block alone (on a VM, touching fresh memory costs more than
        decoding it, see BENCHMARKS.md).
        """
        ds = self.ds
        region = region or (slice(0, ds.sizes["y"]), slice(0, ds.sizes["x"]))
        top, left = region[0].start, region[1].start
        shape = (last - first + 1, len(self.spec.inputs), region[0].stop - top, region[1].stop - left)
        data, valid = np.empty(shape, np.float32), np.empty(shape, bool)
        tasks = []
        for v, name in enumerate(self.spec.inputs):
            fill = transform(name)
            held = self.held(name)
            if held is not None:
                held = held_days(held, slice(first, last + 1))
                if held.shape[-2:] != (1, 1):  # a map, not one value per day
                    held = held[..., region[0], region[1]]
                tasks.append(dask.delayed(_read_held)(held, data[:, v], valid[:, v], fill))
                continue
            array = self._group[name]  # one metadata lookup per variable, not per task
            chunks = ds[name].data[(slice(first, last + 1), *region)].chunks
            for days, rows, cols in da.core.slices_from_chunks(chunks):
                stored = (slice(first + days.start, first + days.stop), slice(top + rows.start, top + rows.stop),
                          slice(left + cols.start, left + cols.stop))
                tasks.append(dask.delayed(_read_region)(array, stored, data[days, v, rows, cols],
                                                        valid[days, v, rows, cols], fill))
        dask.compute(tasks, scheduler="threads")
        return data, valid

    def _normalisation(self, name: str) -> Callable[..., np.ndarray]:
        return partial(normalise, stats=self.stats[name])

    def _keep(self, key: tuple, data: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # a copy only when there are covariates: the target's mask alone need not pin theirs
        self._cached = (key, (data, np.ascontiguousarray(valid[:, 0])))
        return self._cached[1]

    def load_block(self, first: int, last: int, region: tuple[slice, slice] | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
        """Days ``first..last`` (inclusive) of ``region`` (rows, columns; default the whole
        map), normalised, NaN -> 0, time-major ``(T, V, H, W)``, and where the target is
        valid ``(T, H, W)``.

        Filling and masking once per block keeps the per-window work to three slices. The
        last block stays in memory: a cube that fits in one block is decoded once per
        run rather than once per epoch.
        """
        key = (first, last, region)
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        self._cached = None  # free the previous block before reading the next
        return self._keep(key, *self._read(first, last, self._normalisation, region))

    def fit_stats(self, split: Split) -> dict[str, dict[str, float]]:
        """Set and return the normalisation statistics of ``split``'s days, as
        :func:`~pipeline.cube.normalisation_stats` computes them.

        When the windows form one block that holds every day of ``split`` (a cube that
        fits in ``block_bytes``), the statistics come from reading that block, which is
        then kept for the first epoch: the training days are decoded once, not twice,
        and the first epoch does not wait for them.
        """
        dates = cube_dates(self.ds)
        days = [i for i, d in enumerate(dates) if split.contains(d)]
        blocks = self._my_blocks(np.random.default_rng(0))
        if len(blocks) != 1 or self.regional or not days or not blocks[0][0] <= days[0] <= days[-1] <= blocks[0][1]:
            in_memory = {name: held_days(self.held(name), np.asarray(days, np.int64))
                         for name in self.spec.inputs if self.held(name) is not None}
            in_cube = [name for name in self.spec.inputs if name not in in_memory]
            self.stats = {**normalisation_stats(self.ds, in_cube, split),
                          **{name: map_stats(name, values, split) for name, values in in_memory.items()}}
            return self.stats
        first, last, _ = blocks[0]
        data, valid = self._read(first, last, lambda name: log_transform)
        rows = slice(days[0] - first, days[-1] - first + 1)
        stats = {}
        for v, name in enumerate(self.spec.inputs):
            count = np.count_nonzero(valid[rows, v])
            # float64 sums, one day at a time: no float32 round-off, no block-sized temporary
            total = sum(float(day.sum(dtype=np.float64)) for day in data[rows, v])
            squares = sum(float(np.dot(day.ravel(), day.ravel())) for day in data[rows, v])
            physical = sum(float(np.square(np.expm1(day, dtype=np.float64)).sum()) for day in data[rows, v])
            largest = float(np.expm1(float(data[rows, v].max())))  # missing values are 0 here
            mean = total / count if count else np.nan
            std = np.sqrt(max(squares / count - mean * mean, 0.0)) if count else np.nan
            rms = np.sqrt(physical / count) if count else np.nan
            stats[name] = checked_stats(name, mean, std, split, rms, largest)
        self.stats = stats
        for v, name in enumerate(self.spec.inputs):  # log1p values -> normalised, as normalise does
            standardise(data[:, v], stats[name])
        data *= valid  # back to 0 where missing
        self._keep((first, last, None), data, valid)
        return stats

    def __len__(self) -> int:
        return int(self.issues.size)

    def __iter__(self) -> Iterator[Window]:
        worker = get_worker_info()
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker.id if worker else 0])
        before, after = self.spec.span
        leads = np.array(self.spec.leads)
        n_past = len(self.spec.variables)
        forcing_channels = [self.spec.inputs.index(f) for f in self.spec.forcings]
        blocks = self._my_blocks(rng)
        for (first, last, block), region in zip(blocks, self.regions(rng, len(blocks))):
            data, valid = self.load_block(first, last, region)
            _, _, h, w = data.shape
            order = rng.permutation(block) if self.shuffle else block
            ph, pw = (h, w) if self.patch is None else (min(self.patch, h), min(self.patch, w))
            # all patch corners of the block in two draws rather than two per window
            y0s = rng.integers(0, h - ph + 1, size=order.size).tolist()
            x0s = rng.integers(0, w - pw + 1, size=order.size).tolist()
            for t, y0, x0 in zip(order.tolist(), y0s, x0s):
                i = t - first
                # a copy: a view would pin the whole block (and ship it to the loader's collation)
                x = np.ascontiguousarray(data[i - before:i + 1, :n_past, y0:y0 + ph, x0:x0 + pw])
                y = data[i + leads, :1, y0:y0 + ph, x0:x0 + pw]
                mask = valid[i + leads, None, y0:y0 + ph, x0:x0 + pw]
                ahead = data[i + 1:i + after + 1, forcing_channels, y0:y0 + ph, x0:x0 + pw]
                yield Window(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(mask), t,
                             torch.from_numpy(ahead))


@contextlib.contextmanager
def data_loader(dataset: torch.utils.data.Dataset, **kwargs) -> Iterator[DataLoader]:
    """A :class:`~torch.utils.data.DataLoader` whose worker processes are shut down when the
    block exits.

    Persistent workers otherwise live until the loader's iterator is garbage-collected, which
    a reference cycle can put off to interpreter exit; DataLoader skips its own shutdown then,
    and the workers are killed, leaking their semaphores (numcodecs' Blosc lock) with a
    warning. PyTorch has no public call for this, hence the private ``_shutdown_workers``.
    """
    loader = DataLoader(dataset, **kwargs)
    try:
        yield loader
    finally:
        if loader._iterator is not None:
            loader._iterator._shutdown_workers()
            loader._iterator = None
