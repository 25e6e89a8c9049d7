"""Inference: a checkpoint + a cube (or raster folder) -> forecast GeoTIFFs and figures.

For each issue day with enough prior days, the model forecasts every lead it was
trained for; each map is de-normalised, clipped at 0, masked where the input has
no data (the sea), and written as ``QS_{valid YYYYMMDD}_lead{L}.tif`` on exactly the
cube's grid. Grids larger than ``tile`` are predicted in overlapping tiles whose
blend weights are zero wherever a tile's edge could reach (the model's receptive
field), so the tiled result equals the untiled one.

Example
-------
>>> report = predict("checkpoints/best.pth", "data/test", "outputs/predictions")  # doctest: +SKIP
"""

from __future__ import annotations

import datetime as dt
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from . import __version__
from .cube import TARGET, cube_dates, cube_grid, denormalise, normalise, open_cube
from .errors import RunoffError, RunoffWarning
from .export import file_sha256, location, write_geotiff, write_netcdf
from .ingest import ensure_cube
from .model import ConvLSTMForecaster
from .plots import plot_comparison
from .sampler import WindowSpec, window_issues
from .train import (autocast_for, build_model, check_checkpoint_grid, check_writable, checkpoint_splits,
                    load_checkpoint, pick_device)
from .verify import mse, nse


@dataclass
class Forecast:
    """One issue day's forecasts: ``values[l]`` is the map for ``leads[l]`` (physical units)."""

    issue: dt.date
    leads: list[int]
    values: np.ndarray  # (L, H, W) float32, NaN where there is no data
    truth: list[np.ndarray | None] = field(default_factory=list)


@dataclass
class PredictReport:
    """What a prediction run wrote."""

    geotiffs: list[Path]
    figures: list[Path]
    netcdf: Path | None
    issues: list[dt.date]


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, size - tile, step)) + [size - tile]
    return sorted(set(starts))


def _taper(n: int, margin: int, ramp: int, at_start_edge: bool, at_end_edge: bool) -> np.ndarray:
    """1-D blend weight: 0 within ``margin`` of an inner tile edge, then a linear ramp."""
    i = np.arange(n, dtype=np.float64)
    w = np.ones(n)
    if not at_start_edge:
        w = np.minimum(w, np.clip((i - margin + 1) / (ramp + 1), 0, 1))
    if not at_end_edge:
        w = np.minimum(w, np.clip((n - i - margin) / (ramp + 1), 0, 1))
    return w


@torch.no_grad()
def forecast_window(model: ConvLSTMForecaster, x: np.ndarray, device: torch.device, tile: int = 512,
                    margin: int | None = None, ramp: int = 8) -> np.ndarray:
    """Model output for one window ``x`` (T, C, H, W) (normalised, NaN -> 0): (L, H, W).

    Grids larger than ``tile`` go through overlapping tiles; memory stays bounded by
    one tile plus the output map.
    """
    model.eval()
    _, _, h, w = x.shape
    if h <= tile and w <= tile:
        batch = torch.from_numpy(x[None]).to(device)
        with autocast_for(device):
            return model(batch).float()[0, :, 0].cpu().numpy()
    margin = model.receptive_radius(x.shape[0]) if margin is None else margin
    overlap = 2 * margin + ramp
    if tile <= overlap:
        raise RunoffError(f"--tile {tile}: must exceed the tile overlap of {overlap} px for this model")
    total = np.zeros((model.config.leads, h, w), np.float64)
    weight = np.zeros((h, w), np.float64)
    ys, xs = _tile_starts(h, tile, overlap), _tile_starts(w, tile, overlap)
    for y0 in ys:
        th = min(tile, h)
        wy = _taper(th, margin, ramp, y0 == 0, y0 + th == h)
        for x0 in xs:
            tw = min(tile, w)
            wx = _taper(tw, margin, ramp, x0 == 0, x0 + tw == w)
            patch = torch.from_numpy(np.ascontiguousarray(x[None, :, :, y0:y0 + th, x0:x0 + tw])).to(device)
            with autocast_for(device):
                out = model(patch).float()[0, :, 0].cpu().numpy()
            wgt = np.outer(wy, wx)
            total[:, y0:y0 + th, x0:x0 + tw] += out * wgt
            weight[y0:y0 + th, x0:x0 + tw] += wgt
    return (total / np.maximum(weight, 1e-12)).astype(np.float32)


def _select_issues(dates: list[dt.date], candidates: list[int], spec_dates: str | None, last: bool) -> list[int]:
    if spec_dates:
        start_text, sep, end_text = spec_dates.partition(":")
        try:
            start = dt.date.fromisoformat(start_text) if start_text else dates[0]
            end = dt.date.fromisoformat(end_text) if sep and end_text else (dates[-1] if sep else start)
        except ValueError:
            raise RunoffError(f"--dates {spec_dates!r}: expected START:END as YYYY-MM-DD:YYYY-MM-DD") from None
        candidates = [t for t in candidates if start <= dates[t] <= end]
    if last and candidates:
        candidates = candidates[-1:]
    return candidates


def predict(weights_path: str | Path, input_dir: str | Path, output_dir: str | Path = "outputs/predictions", *,
            dates: str | None = None, last: bool = False, split: str | None = None, fmt: str = "tif", tile: int = 512,
            plots_dir: str | Path = "outputs/plots", max_plots: int = 8, device: str = "auto",
            storage_options: dict | None = None, progress: bool = False) -> PredictReport:
    """Forecast from ``input_dir`` with the checkpoint ``weights_path``; see the module docstring.

    ``dates``: issue days ``START:END`` (inclusive); ``last``: only the latest issue day;
    ``split``: only windows whose target days lie in the checkpoint's train, val or test split;
    ``fmt``: ``tif`` or ``netcdf`` (GeoTIFFs plus one NetCDF of all forecasts);
    ``max_plots``: side-by-side figures, spread over the forecasts (-1: all, 0: none).
    """
    if fmt not in ("tif", "netcdf"):
        raise RunoffError(f"--format {fmt!r}: choose tif or netcdf")
    state = load_checkpoint(weights_path, storage_options=storage_options)
    output_dir, plots_dir = location(output_dir, storage_options), location(plots_dir, storage_options)
    check_writable(output_dir, "--output_dir")
    if max_plots:
        check_writable(plots_dir, "--plots_dir")
    store = ensure_cube(input_dir, storage_options=storage_options, progress=progress, option="--input_dir")
    ds = open_cube(store, storage_options)
    grid = cube_grid(ds)
    check_checkpoint_grid(state, grid, f"--weights_path {weights_path}", f"--input_dir {input_dir}")
    variables, leads, input_days = state["variables"], list(state["leads"]), int(state["input_days"])
    missing_vars = [v for v in variables if v not in ds.data_vars]
    if missing_vars:
        raise RunoffError(f"--input_dir {input_dir}: the model needs variable(s) {', '.join(missing_vars)}")
    all_dates = cube_dates(ds)
    missing = set(ds.attrs.get("missing_dates", []))
    present = [d.isoformat() not in missing for d in all_dates]
    candidates = [t for t in range(input_days - 1, len(all_dates)) if all(present[t - input_days + 1:t + 1])]
    if not candidates:
        raise RunoffError(f"--input_dir {input_dir}: {len(all_dates)} day(s) ({sum(present)} present); the model "
                          f"needs {input_days} consecutive days before an issue day")
    if split is not None:
        splits = checkpoint_splits(state)
        if split not in splits:
            raise RunoffError(f"--split {split!r}: choose one of {', '.join(splits)}")
        in_split = set(window_issues(ds, splits[split], WindowSpec(input_days, tuple(leads), tuple(variables))).tolist())
        candidates = [t for t in candidates if t in in_split]
    issues = _select_issues(all_dates, candidates, dates, last)
    if not issues:
        raise RunoffError(f"--dates {dates} / --split {split}: no issue day with {input_days} complete prior days there "
                          f"({all_dates[candidates[0]]}..{all_dates[candidates[-1]]} are possible)")

    dev = pick_device(device)
    model = build_model(state).to(dev)
    stats = state["norm_stats"]
    weights_path = location(weights_path, storage_options)
    sha = file_sha256(weights_path)
    units = ds[TARGET].attrs.get("units", "kg m-2")
    plot_every = _plot_stride(len(issues) * len(leads), max_plots)
    geotiffs, figures, forecasts = [], [], []
    from tqdm import tqdm

    k = 0
    for t in tqdm(issues, desc="predict", unit="day", disable=not progress):
        window = window_inputs(ds, variables, stats, t, input_days)
        out = forecast_window(model, np.nan_to_num(window, nan=0.0), dev, tile=tile)
        nodata = np.isnan(window[:, 0]).all(axis=0)  # no data on any input day: sea, outside the domain
        values = denormalise(out, stats[TARGET])
        values[:, nodata] = np.nan
        forecast = Forecast(all_dates[t], leads, values)
        for li, lead in enumerate(leads):
            valid = all_dates[t] + dt.timedelta(days=lead)
            truth = _truth(ds, all_dates, valid, missing)
            forecast.truth.append(truth)
            tags = {"issue_date": all_dates[t].isoformat(), "valid_date": valid.isoformat(), "lead_days": lead,
                    "units": units, "checkpoint_sha256": sha, "package_version": __version__,
                    "source": f"runoff-forecast ConvLSTM, {weights_path.name}"}
            geotiffs.append(write_geotiff(values[li], grid, output_dir / f"QS_{valid:%Y%m%d}_lead{lead}.tif", tags,
                                          description=f"QS forecast, lead {lead} d", units=units))
            if plot_every and (k % plot_every == 0 or (t == issues[-1] and li == len(leads) - 1)):
                scores = None
                if truth is not None:
                    scores = {"mse": mse(values[li], truth), "nse": nse(values[li], truth)}
                figures.append(plot_comparison(values[li], grid, plots_dir / f"compare_{valid:%Y%m%d}_lead{lead}.png",
                                               valid_date=valid.isoformat(), issue_date=all_dates[t].isoformat(),
                                               lead=lead, truth=truth, units=units, scores=scores))
            k += 1
        if fmt == "netcdf":
            forecasts.append(forecast)
    netcdf = None
    if fmt == "netcdf":
        netcdf = write_netcdf(_forecast_dataset(forecasts, units, sha), grid,
                              output_dir / f"QS_forecasts_{all_dates[issues[0]]:%Y%m%d}_{all_dates[issues[-1]]:%Y%m%d}.nc")
    return PredictReport(geotiffs, figures, netcdf, [all_dates[t] for t in issues])


def _plot_stride(n_maps: int, max_plots: int) -> int:
    if max_plots == 0:
        return 0
    if max_plots < 0 or n_maps <= max_plots:
        return 1
    return -(-n_maps // max_plots)


def window_inputs(ds: xr.Dataset, variables: list[str], stats: dict, t: int, input_days: int) -> np.ndarray:
    """Normalised inputs (T, C, H, W) of the window issued at index ``t`` (NaN kept)."""
    days = [np.asarray(ds[name].data[t - input_days + 1:t + 1]) for name in variables]
    return np.stack([normalise(d, stats[name]) for d, name in zip(days, variables)], axis=1)


def _truth(ds: xr.Dataset, all_dates: list[dt.date], valid: dt.date, missing: set[str]) -> np.ndarray | None:
    if valid > all_dates[-1] or valid.isoformat() in missing:
        return None
    values = np.asarray(ds[TARGET].data[(valid - all_dates[0]).days])
    if np.isnan(values).all():
        warnings.warn(f"truth for {valid} holds no valid pixel", RunoffWarning, stacklevel=2)
        return None
    return values


def _forecast_dataset(forecasts: list[Forecast], units: str, sha: str) -> xr.Dataset:
    """All forecasts as ``qs_forecast(time, lead, y, x)``, ``time`` being the issue day."""
    leads = forecasts[0].leads
    times = np.array([np.datetime64(f.issue, "ns") for f in forecasts])
    values = np.stack([f.values for f in forecasts])
    valid = times[:, None] + np.array([np.timedelta64(lead, "D") for lead in leads])[None, :]
    ds = xr.Dataset(
        {"qs_forecast": (("time", "lead", "y", "x"), values,
                         {"long_name": "forecast storm surface runoff", "units": units})},
        coords={"time": ("time", times, {"long_name": "issue day (last input day)"}),
                "lead": ("lead", np.array(leads, np.int32), {"long_name": "lead time", "units": "days"}),
                "valid_time": (("time", "lead"), valid, {"long_name": "day the forecast is for"})})
    ds.attrs.update(Conventions="CF-1.8", title="QS forecasts", source=f"runoff-forecast {__version__}",
                    checkpoint_sha256=sha)
    return ds
