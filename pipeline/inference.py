"""From a checkpoint and a cube to forecast maps: the model's inputs for issue days, and
batched, tiled forward passes. ``predict`` and ``evaluate`` both forecast through
:class:`Forecaster`; neither needs the training code.

Several issue days go through the network in one forward pass (``batch_size``). Grids
larger than ``tile`` are predicted piece by piece (:func:`~pipeline.model.map_tiles`): each
piece keeps only its core, which lies beyond the reach of the piece's cut edges (the
model's receptive field), so the tiled result equals the untiled one. A pass takes at most
:data:`~pipeline.model.PASS_PIXELS` window pixels (fewer issue days when the pieces are
large), so memory stays bounded by one pass plus the output.

Example
-------
>>> forecaster = Forecaster.load(read_checkpoint("checkpoints/best.pth"))      # doctest: +SKIP
>>> for issues, maps in forecaster.forecasts(open_cube("stores/qs.zarr"), [10, 11, 12]):  # doctest: +SKIP
...     maps.shape                                   # (issue days, leads, H, W), kg m-2
(3, 1, 128, 160)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
import xarray as xr

from .checkpoint import POINT_MAPS, Checkpoint, read_checkpoint
from .cube import (TARGET, Split, choose_split, cube_dates, cube_grid, denormalise, held_days, held_input, normalise,
                   open_cube)
from .device import autocast_for, keep_freed_memory, pick_device
from .errors import RunoffError
from .ingest import ensure_cube
from .model import TILE, ConvLSTMForecaster, map_passes
from .sampler import WindowSpec, window_issues


@dataclass
class SplitWindows:
    """A checkpoint's windows on a cube: the cube (``store``, ``ds``), the days chosen
    (``period``), the window layout (``spec``) and the issue days of the windows whose
    targets all lie in ``period``."""

    store: str
    ds: xr.Dataset
    period: Split
    spec: WindowSpec
    issues: np.ndarray


def split_windows(ckpt: Checkpoint, data_dir: str, split: str, weights_path: str, storage_options: dict | None = None,
                  progress: bool = False, forcings_from: Mapping[str, str] | None = None) -> SplitWindows:
    """Open ``data_dir`` (a cube, or rasters ingested first) for ``ckpt``, checked against
    its grid and variables, and find the windows of ``split`` (a split of the checkpoint,
    ``all``, or a period START..END); one clear error when none is complete. With
    ``forcings_from``, the forcings it names are read from other variables of the cube
    (:func:`forcings_read_from`)."""
    store = ensure_cube(data_dir, storage_options=storage_options, progress=progress)
    ds = forcings_read_from(open_cube(store, storage_options), ckpt, forcings_from or {}, f"--data_dir {data_dir}")
    ckpt.check_grid(cube_grid(ds), f"--weights_path {weights_path}", f"--data_dir {data_dir}")
    ckpt.check_variables(list(ds.data_vars), f"--data_dir {data_dir}")
    dates = cube_dates(ds)
    period = choose_split(split, ckpt.splits, dates[0], dates[-1])
    spec = WindowSpec(ckpt.input_days, tuple(ckpt.leads), tuple(ckpt.variables), tuple(ckpt.forcings))
    issues = window_issues(ds, period, spec)
    if issues.size == 0:
        raise RunoffError(f"--split {split}: no complete window with targets in {period.start}..{period.end} "
                          f"in {store} ({dates[0]}..{dates[-1]})")
    return SplitWindows(str(store), ds, period, spec, issues)


def parse_forcing_sources(text: str | None) -> dict[str, str]:
    """``--forcings NAME=VARIABLE[,NAME=VARIABLE]`` of evaluate and predict: which cube variable each
    named forcing of the checkpoint is read from.

    >>> parse_forcing_sources("rainf=rainf_fc"), parse_forcing_sources(None)
    ({'rainf': 'rainf_fc'}, {})
    """
    if not text:
        return {}
    sources: dict[str, str] = {}
    for part in text.split(","):
        name, eq, variable = (piece.strip() for piece in part.partition("="))
        if not (name and eq and variable) or name in sources:
            raise RunoffError(f"--forcings {text}: expected NAME=VARIABLE, each forcing once, e.g. rainf=rainf_fc "
                              "(the checkpoint's forcing, then the cube variable to read it from)")
        sources[name] = variable
    return sources


def forcings_read_from(ds: xr.Dataset, ckpt: Checkpoint, sources: Mapping[str, str], cube: str) -> xr.Dataset:
    """``ds`` whose forcings named in ``sources`` hold the cube variables given there, with
    their attributes (``--forcings rainf=rainf_fc``): a model trained on the observed rain,
    scored with an archive of rain forecasts ingested beside it. They are read on the lead
    days only (a forcing is never a past input), normalised as the checkpoint's forcing. One
    clear error for a name that is not a forcing of ``ckpt`` or a variable the cube lacks
    (``cube``: the option and value that gave it, for the message)."""
    for name, variable in sources.items():
        option = f"--forcings {name}={variable}"
        if name not in ckpt.forcings:
            raise RunoffError(f"{option}: the checkpoint reads no forcing {name} "
                              f"(its forcings: {', '.join(ckpt.forcings) or 'none'})")
        if variable not in ds.data_vars:
            raise RunoffError(f"{option}: {cube} has no variable {variable} "
                              f"(it has {', '.join(map(str, ds.data_vars))})")
    return ds.assign({name: ds[variable] for name, variable in sources.items()})


def read_checkpoints(weights_path: str | Path | Sequence[str | Path], storage_options: dict | None = None
                     ) -> tuple[list[str], list[Checkpoint]]:
    """``--weights_path``: one checkpoint, or several trained alike whose forecasts
    :class:`Forecaster` combines; their paths and checkpoints. One clear error for a path
    given twice or a checkpoint that cannot be combined with the first."""
    paths = [str(weights_path)] if isinstance(weights_path, (str, Path)) else [str(p) for p in weights_path]
    if not paths:
        raise RunoffError("--weights_path: no checkpoint given")
    twice = sorted({p for p in paths if paths.count(p) > 1})
    if twice:
        raise RunoffError(f"--weights_path {twice[0]}: given twice (each checkpoint counts once)")
    checkpoints = [read_checkpoint(p, storage_options=storage_options) for p in paths]
    for path, ckpt in zip(paths[1:], checkpoints[1:]):
        checkpoints[0].check_combinable(ckpt, paths[0], path)
    return paths, checkpoints


def checkpoint_names(paths: Sequence[str]) -> str:
    """How outputs name the checkpoint(s) they come from: one file's name, or several paths.

    >>> checkpoint_names(["checkpoints/best.pth"]), checkpoint_names(["s0/best.pth", "s1/best.pth"])
    ('best.pth', 's0/best.pth,s1/best.pth')
    """
    return Path(paths[0]).name if len(paths) == 1 else ",".join(paths)


def _forward(model: ConvLSTMForecaster, x: np.ndarray, forcings: np.ndarray | None, device: torch.device
             ) -> np.ndarray:
    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    with autocast_for(device):
        out = model(tensor(x), None if forcings is None or forcings.shape[2] == 0 else tensor(forcings)).float()
    return (out if model.config.quantiles else out[:, :, 0]).cpu().numpy()


@torch.no_grad()
def forecast_batch(model: ConvLSTMForecaster, x: np.ndarray, device: torch.device, tile: int = TILE,
                   forcings: np.ndarray | None = None) -> np.ndarray:
    """Model output for windows ``x`` (B, T, C, H, W) and their ``forcings`` (B, D, F, H, W)
    (normalised, NaN -> 0): (B, L, H, W), or (B, L, Q, H, W) for a probabilistic model."""
    model.eval()
    h, w = x.shape[-2:]
    margin = model.receptive_radius(x.shape[1])
    if max(h, w) > tile and tile <= 2 * margin:
        raise RunoffError(f"--tile {tile}: must exceed twice the reach of this model's forecasts ({margin} px)")
    out = None
    for windows, piece in map_passes(x.shape[0], h, w, tile, margin):
        region = (Ellipsis, *piece.region)
        part = _forward(model, x[windows][region], None if forcings is None else forcings[windows][region], device)
        if out is None:
            out = np.empty((x.shape[0], *part.shape[1:-2], h, w), np.float32)
        out[windows][(Ellipsis, *piece.core)] = part[(Ellipsis, *piece.inside)]
    return out


def forecast_window(model: ConvLSTMForecaster, x: np.ndarray, device: torch.device, tile: int = TILE) -> np.ndarray:
    """:func:`forecast_batch` for one window ``x`` (T, C, H, W) without forcings: (L, H, W)."""
    return forecast_batch(model, x[None], device, tile)[0]


def read_days(ds: xr.Dataset, name: str, first: int, last: int, maps: dict[str, np.ndarray] | None = None
              ) -> np.ndarray:
    """Days ``first..last`` (time indices, inclusive) of variable ``name``, as stored (T, H, W);
    an input not stored day by day (:func:`~pipeline.cube.held_input`: a static map, of the
    cube or of ``maps`` held in memory, or a season input) broadcast over the days and grid."""
    held = held_input(ds, name, maps)
    if held is not None:
        return np.broadcast_to(held_days(held, slice(first, last + 1)),
                               (last - first + 1, ds.sizes["y"], ds.sizes["x"]))
    return np.asarray(ds[name].data[first:last + 1])


def stack_days(ds: xr.Dataset, names: Sequence[str], stats: dict, issues: Sequence[int],
               offsets: Sequence[int], maps: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Normalised values (B, D, V, H, W) of variables ``names`` (of the cube, or of ``maps``)
    on the days ``issue + offset`` of each issue day (time indices), NaN kept. The days the
    windows span are read once per variable, not once per window."""
    issues, offsets = np.asarray(issues, np.int64), np.asarray(offsets, np.int64)
    h, w = ds.sizes["y"], ds.sizes["x"]
    if not len(names):
        return np.zeros((issues.size, offsets.size, 0, h, w), np.float32)
    first, last = int(issues.min() + offsets.min()), int(issues.max() + offsets.max())
    rows = issues[:, None] + offsets[None, :] - first  # (B, D) rows of the read
    days = [normalise(read_days(ds, name, first, last, maps), stats[name]) for name in names]
    return np.stack([d[rows] for d in days], axis=2)


def window_inputs(ds: xr.Dataset, variables: Sequence[str], stats: dict, issues: Sequence[int],
                  input_days: int, maps: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Normalised past inputs (B, T, C, H, W) of the windows issued at ``issues`` (NaN kept)."""
    return stack_days(ds, variables, stats, issues, range(1 - input_days, 1), maps)


# a batch of a probabilistic model's quantiles: 20 per pixel and lead, so 50 MB per issue day
# of 6 leads at 224x464 (5 days a batch), 0.2 GB at 600x800 (1 day) and 0.9 GB at 1200x1600
# (1 day); larger batches forecast no faster on those grids and held several GB (docs/scaling.md)
MEMBERS_BYTES = 2**28


@dataclass
class Forecaster:
    """Trained models ready to forecast on a cube: their checkpoints, the networks on
    ``device``, and how many issue days (``batch_size``) and pixels (``tile``) one forward
    pass takes. Usually one model; several checkpoints trained alike (e.g. with other
    seeds: a seed ensemble) forecast together, their maps averaged, or a probabilistic
    model's quantiles pooled into one ensemble (the mixture of their distributions)."""

    checkpoints: list[Checkpoint]
    models: list[ConvLSTMForecaster]
    device: torch.device
    batch_size: int = 8
    tile: int = TILE

    @classmethod
    def load(cls, checkpoints: Checkpoint | Sequence[Checkpoint], device: str = "auto", batch_size: int = 8,
             tile: int = TILE) -> "Forecaster":
        """The networks of ``checkpoints`` (one, or several checked by
        :meth:`~pipeline.checkpoint.Checkpoint.check_combinable` by the caller) on ``device``."""
        if batch_size < 1:
            raise RunoffError(f"--batch_size {batch_size}: must be >= 1")
        checkpoints = [checkpoints] if isinstance(checkpoints, Checkpoint) else list(checkpoints)
        dev = pick_device(device)
        keep_freed_memory(dev)  # a batch's activations are freed and asked for again every pass
        return cls(checkpoints, [c.build_model().to(dev).eval() for c in checkpoints], dev, batch_size, tile)

    @property
    def checkpoint(self) -> Checkpoint:
        """The first checkpoint: the inputs, leads, grid and days all of them share."""
        return self.checkpoints[0]

    @property
    def probabilistic(self) -> bool:
        return bool(self.models[0].config.quantiles)

    @property
    def point_maps(self) -> list[str]:
        """Per lead, the single map of a probabilistic forecast (see
        :attr:`~pipeline.checkpoint.Checkpoint.point_maps`): the median where most of the
        checkpoints chose it, else the mean."""
        votes = [sum(ckpt.point_maps[k] == POINT_MAPS[1] for ckpt in self.checkpoints)
                 for k in range(len(self.checkpoint.leads))]
        return [POINT_MAPS[1] if 2 * n > len(self.checkpoints) else POINT_MAPS[0] for n in votes]

    @property
    def members(self) -> int:
        """Members of a probabilistic forecast: every model's quantiles."""
        return sum(model.config.quantiles for model in self.models)

    def forecast(self, ds: xr.Dataset, issues: Sequence[int], members: bool = False) -> np.ndarray:
        """Forecasts (B, L, H, W) in physical units for the issue days ``issues`` (time
        indices), clipped at 0, NaN where the target had no data on any input day (the
        sea, outside the domain). A probabilistic model's is the mean or the median of its
        quantiles, per lead (:attr:`point_maps`); with ``members`` it gives the quantiles
        themselves, (B, L, Q, H, W), increasing.
        Several models: the mean of their maps, or all their quantiles, sorted."""
        ckpt = self.checkpoint
        x = window_inputs(ds, ckpt.variables, ckpt.norm_stats, issues, ckpt.input_days, ckpt.maps)
        ahead = np.nan_to_num(stack_days(ds, ckpt.forcings, ckpt.norm_stats, issues, range(1, max(ckpt.leads) + 1)),
                              nan=0.0)
        nodata = np.isnan(x[:, :, 0]).all(axis=1)  # (B, H, W)
        x = np.nan_to_num(x, nan=0.0)
        outs = []
        for model in self.models:
            out = forecast_batch(model, x, self.device, tile=self.tile, forcings=ahead)
            outs.append(denormalise(out, ckpt.norm_stats[TARGET], out=out))  # monotone: quantiles stay quantiles
        values = combine_forecasts(outs, self.probabilistic)
        del outs
        if self.probabilistic and not members:
            values = point_forecast(values, self.point_maps)
        mask = nodata.reshape(nodata.shape[0], 1, *([1] * (values.ndim - 4)), *nodata.shape[1:])
        values[np.broadcast_to(mask, values.shape)] = np.nan
        return values

    def forecasts(self, ds: xr.Dataset, issues: Sequence[int], members: bool = False
                  ) -> Iterator[tuple[list[int], np.ndarray]]:
        """:meth:`forecast` in batches of ``batch_size`` issue days: yields each batch's
        issue indices and its forecasts (B, L, H, W), or with ``members`` (B, L, Q, H, W).
        A batch of members holds at most :data:`MEMBERS_BYTES` (fewer issue days, at least one)."""
        issues = [int(t) for t in issues]
        size = self.batch_size
        if members and self.probabilistic:
            one_day = 4 * len(self.checkpoint.leads) * self.members * ds.sizes["y"] * ds.sizes["x"]
            size = max(1, min(size, MEMBERS_BYTES // one_day))
        for start in range(0, len(issues), size):
            chunk = issues[start:start + size]
            yield chunk, self.forecast(ds, chunk, members)


def combine_forecasts(outputs: list[np.ndarray], probabilistic: bool) -> np.ndarray:
    """Several models' forecasts of the same windows as one: the mean of their maps
    (B, L, H, W), or for probabilistic models all their quantiles (B, L, Q, H, W) pooled
    along Q and sorted, the members of the mixture of their distributions.

    >>> a, b = np.array([[[[0.0, 1.0]], [[2.0, 5.0]]]]), np.array([[[[4.0, 6.0]], [[3.0, 3.0]]]])
    >>> combine_forecasts([a, b], probabilistic=False)[..., 0].tolist()      # one window, leads 1 and 2
    [[[2.0], [2.5]]]
    >>> combine_forecasts([a[:, :, None], b[:, :, None]], probabilistic=True)[0, :, :, 0, 0].tolist()
    [[0.0, 4.0], [2.0, 3.0]]
    """
    if len(outputs) == 1:
        return outputs[0]
    if not probabilistic:
        return np.mean(outputs, axis=0, dtype=np.float32)
    pooled = np.concatenate(outputs, axis=2)
    pooled.sort(axis=2)
    return pooled


def point_forecast(members: np.ndarray, point_maps: Sequence[str]) -> np.ndarray:
    """A probabilistic forecast's single map from its Q increasing quantiles (B, L, Q, H, W):
    (B, L, H, W), per lead the mean of the quantiles (the value that minimises the expected
    squared error, where the distribution is right) or their median (the mean of the middle
    two), as ``point_maps`` says (:attr:`Forecaster.point_maps`).

    >>> members = np.array([0.0, 1.0, 2.0, 9.0], np.float32).reshape(1, 1, 4, 1, 1).repeat(2, axis=1)
    >>> point_forecast(members, ["mean", "median"]).ravel().tolist()
    [3.0, 1.5]
    """
    out = members.mean(axis=2)
    for lead, point in enumerate(point_maps):
        if point == POINT_MAPS[1]:  # the _q50 map's own reading, so the two are equal to the last bit
            out[:, lead] = quantile_maps(np.moveaxis(members[:, lead], 1, 0), [0.5])[0]
    return out


def quantile_maps(members: np.ndarray, levels: Sequence[float]) -> np.ndarray:
    """Quantiles at ``levels`` of a probabilistic forecast's Q increasing members (Q, H, W),
    taken at the levels ``(k + 0.5) / Q``: linear between them, the outer members beyond.

    >>> quantile_maps(np.arange(4, dtype=np.float32).reshape(4, 1, 1), [0.125, 0.5, 0.99])[:, 0, 0].tolist()
    [0.0, 1.5, 3.0]
    """
    q = members.shape[0]
    out = []
    for level in levels:
        position = min(max(level * q - 0.5, 0.0), q - 1.0)
        lo = int(np.floor(position))
        hi, frac = min(lo + 1, q - 1), np.float32(position - lo)
        out.append(members[lo] + frac * (members[hi] - members[lo]))
    return np.stack(out).astype(np.float32)


def exceedance_maps(members: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """Probability (0..1) that the value exceeds each threshold: the share of the Q members
    above it (as ``runoff evaluate`` scores it), NaN where the members are. (T, H, W)."""
    nodata = np.isnan(members).any(axis=0)
    out = np.stack([(members > thr).mean(axis=0) for thr in thresholds]).astype(np.float32)
    out[:, nodata] = np.nan
    return out
