"""Dask-backed window sampler: cube -> ``(input_days, channels, H, W)`` windows for PyTorch.

A window issued on day *t* holds the input days ``t-N+1 .. t`` of every variable and
the target ``qs`` on days ``t + lead`` for each lead. Windows with a missing day are
skipped; NaN target pixels are masked out of the loss.

Reading pattern: the issue days are grouped in consecutive *blocks*; each block's
days are read once through Dask (chunk-aligned slices, decoded in parallel) and
normalised in memory, then every window of the block is cut from that array with
integer indexing. So a chunk is decoded once per pass, never once per sample, and
memory is bounded by ``block_bytes``. Blocks are shuffled, then the windows inside
each block. Each DataLoader worker (and each DDP rank) opens the store itself and
takes its own share of the blocks.

Example
-------
>>> ds = open_cube("stores/qs.zarr")                                     # doctest: +SKIP
>>> issues = window_issues(ds, splits["train"], WindowSpec(6, (1,)))     # doctest: +SKIP
>>> sampler = WindowSampler("stores/qs.zarr", issues, WindowSpec(6, (1,)), stats, patch=64)
>>> window = next(iter(sampler))                                          # doctest: +SKIP
>>> window.x.shape, window.y.shape, int(window.issue)                     # doctest: +SKIP
(torch.Size([6, 1, 64, 64]), torch.Size([1, 1, 64, 64]), 412)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, NamedTuple

import dask
import numpy as np
import torch
import xarray as xr
from torch.utils.data import IterableDataset, get_worker_info

from .cube import TARGET, Split, cube_dates, normalise, open_cube
from .errors import RunoffError


@dataclass(frozen=True)
class WindowSpec:
    """What a window holds: ``input_days`` past days of ``variables`` (target first), targets at ``leads``."""

    input_days: int = 6
    leads: tuple[int, ...] = (1,)
    variables: tuple[str, ...] = (TARGET,)

    @property
    def span(self) -> tuple[int, int]:
        """Days before and after the issue day that a window touches."""
        return self.input_days - 1, max(self.leads)


class Window(NamedTuple):
    """One sample; a DataLoader batches each field (``x`` becomes ``(batch, T, C, H, W)``)."""

    x: torch.Tensor  # float32 (input_days, channels, h, w): normalised inputs, NaN -> 0
    y: torch.Tensor  # float32 (leads, 1, h, w): normalised target, NaN -> 0
    mask: torch.Tensor  # bool like y: True where the target is valid
    issue: torch.Tensor  # int64 scalar: time index of the issue day (which window this is)


def window_issues(ds: xr.Dataset, split: Split, spec: WindowSpec) -> np.ndarray:
    """Time indices of the issue days of every complete window whose targets lie in ``split``."""
    dates = cube_dates(ds)
    missing = set(ds.attrs.get("missing_dates", []))
    for name in spec.variables[1:]:
        missing |= set(ds[name].attrs.get("missing_dates", []))
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


class WindowSampler(IterableDataset):
    """Iterable dataset of :class:`Window` samples ``(x, y, mask, issue)``, see the module docstring.

    ``patch``: random ``patch x patch`` crops (training); None: the full grid.
    """

    def __init__(self, store: str, issues: np.ndarray, spec: WindowSpec, stats: dict[str, dict[str, float]],
                 patch: int | None = None, shuffle: bool = False, seed: int = 0,
                 block_bytes: int = 512 * 2**20, storage_options: dict | None = None) -> None:
        super().__init__()
        self.store, self.spec, self.stats = str(store), spec, stats
        self.issues = np.asarray(issues, dtype=np.int64)
        self.patch, self.shuffle, self.seed = patch, shuffle, seed
        self.block_bytes, self.storage_options = block_bytes, storage_options
        self.epoch = 0
        self.rank, self.world_size = 0, 1
        self._ds: xr.Dataset | None = None
        self._cached: tuple[tuple[int, int], tuple[np.ndarray, np.ndarray]] | None = None  # reused next epoch

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (deterministic for the seed), as DistributedSampler does."""
        self.epoch = epoch

    def shard(self, rank: int, world_size: int) -> "WindowSampler":
        """Keep only this DDP rank's share of the blocks."""
        self.rank, self.world_size = rank, world_size
        return self

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_ds"] = None  # each worker process opens the store itself
        state["_cached"] = None
        return state

    @property
    def ds(self) -> xr.Dataset:
        if self._ds is None:
            self._ds = open_cube(self.store, self.storage_options)
        return self._ds

    def blocks(self) -> list[np.ndarray]:
        """Issue days grouped so that one block's days fit in ``block_bytes``."""
        if self.issues.size == 0:
            return []
        ds = self.ds
        h, w = ds.sizes["y"], ds.sizes["x"]
        day_bytes = 4 * h * w * len(self.spec.variables)
        before, after = self.spec.span
        days_per_block = max(self.block_bytes // day_bytes - before - after, 1)
        chunk = ds[TARGET].encoding.get("chunks", (16,))[0]
        days_per_block = max(chunk, days_per_block // chunk * chunk)  # chunk-aligned block edges
        keys = self.issues // days_per_block
        return [self.issues[keys == k] for k in np.unique(keys)]

    def _my_blocks(self, rng: np.random.Generator) -> list[np.ndarray]:
        """This rank's and this worker's disjoint share of the windows, blocks in (shuffled) order."""
        blocks = self.blocks()
        if self.world_size > 1:  # every rank reads every block but keeps its own windows of it
            blocks = [b[self.rank::self.world_size] for b in blocks]
        info = get_worker_info()
        if info is not None and info.num_workers > 1:
            if len(blocks) >= info.num_workers:
                blocks = blocks[info.id::info.num_workers]
            else:
                blocks = [b[info.id::info.num_workers] for b in blocks]
        blocks = [b for b in blocks if b.size]
        if self.shuffle:
            blocks = [blocks[i] for i in rng.permutation(len(blocks))]
        return blocks

    def load_block(self, first: int, last: int) -> tuple[np.ndarray, np.ndarray]:
        """Days ``first..last`` (inclusive), normalised, NaN -> 0, time-major ``(T, V, H, W)``,
        and where the target is valid ``(T, H, W)``.

        Filling and masking once per block keeps the per-window work to three slices. The
        last block stays in memory: a cube that fits in one block is decoded once per
        run rather than once per epoch.
        """
        if self._cached is not None and self._cached[0] == (first, last):
            return self._cached[1]
        self._cached = None  # free the previous block before reading the next
        ds = self.ds
        lazy = [ds[name].data[first:last + 1] for name in self.spec.variables]
        arrays = dask.compute(*lazy, scheduler="threads")
        data = np.empty((last - first + 1, len(arrays), *arrays[0].shape[1:]), np.float32)
        for v, (values, name) in enumerate(zip(arrays, self.spec.variables)):
            normalise(values, self.stats[name], out=data[:, v])
        valid = ~np.isnan(data[:, 0])
        np.copyto(data, np.float32(0), where=np.isnan(data))  # ingest stores nodata as NaN, never inf
        self._cached = ((first, last), (data, valid))
        return data, valid

    def __len__(self) -> int:
        return int(self.issues.size)

    def __iter__(self) -> Iterator[Window]:
        worker = get_worker_info()
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker.id if worker else 0])
        before, after = self.spec.span
        leads = np.array(self.spec.leads)
        for block in self._my_blocks(rng):
            first, last = int(block.min()) - before, int(block.max()) + after
            data, valid = self.load_block(first, last)
            _, _, h, w = data.shape
            order = rng.permutation(block) if self.shuffle else block
            for t in order:
                y0 = x0 = 0
                ph, pw = h, w
                if self.patch is not None:
                    ph, pw = min(self.patch, h), min(self.patch, w)
                    y0, x0 = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
                i = int(t) - first
                x = np.ascontiguousarray(data[i - before:i + 1, :, y0:y0 + ph, x0:x0 + pw])
                y = data[i + leads, :1, y0:y0 + ph, x0:x0 + pw]
                mask = valid[i + leads, None, y0:y0 + ph, x0:x0 + pw]
                yield Window(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(mask),
                             torch.tensor(int(t)))

