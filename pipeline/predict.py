"""Inference: a checkpoint + a cube (or raster folder) -> forecast GeoTIFFs and figures.

For each issue day with enough prior days, the model forecasts every lead it was
trained for (:class:`~pipeline.inference.Forecaster`: several issue days per forward
pass, tiled on large grids); each map is de-normalised, clipped at 0, masked where the
input has no data (the sea), and written as ``QS_{valid YYYYMMDD}_lead{L}.tif`` on
exactly the cube's grid.

A probabilistic checkpoint's map is the mean or the median of its quantiles, per lead as
its calibration chose (``point_maps``, :func:`~pipeline.calibration.choose_point_maps`; the
tag ``point_map`` says which); beside it, per valid day and lead, go quantile maps
``..._q{10,50,90}.tif`` (``quantiles``) and exceedance
probabilities ``..._p{thr}.tif`` (``exceedance``, in data units; by default the 90th and
99th percentiles of the wet training pixels), optionally ``members`` ensemble members in
the NetCDF output (the quantiles at N evenly spaced levels), and figures truth | median |
10-90% spread | exceedance probability.

Several checkpoints trained alike forecast together (a seed ensemble): each map is the mean
of theirs, or a probabilistic model's members are all their quantiles pooled; the tag
``checkpoint_sha256`` lists every checkpoint's hash.

Example
-------
>>> report = predict("checkpoints/best.pth", "data/test", "outputs/predictions")  # doctest: +SKIP
"""

from __future__ import annotations

import datetime as dt
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import xarray as xr

from . import __version__
from .checkpoint import Checkpoint
from .cube import TARGET, choose_split, cube_dates, cube_grid, open_cube, target_units
from .errors import RunoffError, RunoffWarning
from .export import write_geotiff, write_netcdf
from .baselines import check_thresholds, wet_thresholds
from .inference import (Forecaster, checkpoint_names, exceedance_maps, forcings_read_from, point_forecast,
                        quantile_maps, read_checkpoints)
from .model import TILE
from .ingest import ensure_cube
from .plots import plot_comparison, plot_probabilistic
from .sampler import WindowSpec, window_issues
from .storage import check_writable, file_sha256, location
from .verify import mse, nse


@dataclass
class Forecast:
    """One issue day's forecasts: ``values[l]`` is the map for ``leads[l]`` (physical units)."""

    issue: dt.date
    leads: list[int]
    values: np.ndarray  # (L, H, W) float32, NaN where there is no data
    members: np.ndarray | None = None  # (L, N, H, W): ensemble members of a probabilistic forecast


@dataclass
class PredictReport:
    """What a prediction run wrote."""

    geotiffs: list[Path]
    figures: list[Path]
    netcdf: Path | None
    issues: list[dt.date]


def _select_issues(dates: list[dt.date], candidates: list[int], spec_dates: str | None, last: bool) -> list[int]:
    if spec_dates:
        start_text, sep, end_text = spec_dates.partition(":")
        try:
            start = dt.date.fromisoformat(start_text) if start_text else dates[0]
            end = dt.date.fromisoformat(end_text) if sep and end_text else (dates[-1] if sep else start)
        except ValueError:
            raise RunoffError(f"--dates {spec_dates!r}: expected START:END as YYYY-MM-DD:YYYY-MM-DD") from None
        if start > end:
            raise RunoffError(f"--dates {spec_dates}: START lies after END")
        candidates = [t for t in candidates if start <= dates[t] <= end]
    if last and candidates:
        candidates = candidates[-1:]
    return candidates


def predict(weights_path: str | Path | Sequence[str | Path], input_dir: str | Path,
            output_dir: str | Path = "outputs/predictions", *,
            dates: str | None = None, last: bool = False, split: str | None = None, fmt: str = "tif", tile: int = TILE,
            plots_dir: str | Path = "outputs/plots", max_plots: int = 8, device: str = "auto", batch_size: int = 8,
            quantiles: list[float] | None = None, exceedance: list[float] | None = None, members: int | None = None,
            storage_options: dict | None = None, progress: bool = False,
            forcings_from: dict[str, str] | None = None) -> PredictReport:
    """Forecast from ``input_dir`` with the checkpoint ``weights_path`` (or several trained
    alike, forecasting together: see :class:`~pipeline.inference.Forecaster`); see the module docstring.

    ``dates``: issue days ``START:END`` (inclusive); ``last``: only the latest issue day;
    ``split``: only windows whose target days lie in the checkpoint's train, val or test split, in all
    the cube's days (``all``) or in a period ``START..END``;
    ``fmt``: ``tif`` or ``netcdf`` (GeoTIFFs plus one NetCDF of all forecasts);
    ``max_plots``: side-by-side figures, spread over the forecasts (-1: all, 0: none);
    ``batch_size``: issue days per forward pass; ``tile``: largest tile side in pixels;
    ``quantiles``, ``exceedance``, ``members``: what a probabilistic checkpoint writes besides;
    ``forcings_from``: forcings read from other cube variables (``{"rainf": "rainf_fc"}``,
    :func:`~pipeline.inference.forcings_read_from`), named in every GeoTIFF's tags.
    """
    if fmt not in ("tif", "netcdf"):
        raise RunoffError(f"--format {fmt!r}: choose tif or netcdf")
    if max_plots < -1:
        raise RunoffError(f"--max_plots {max_plots}: a number of figures, 0 for none or -1 for all")
    paths, checkpoints = read_checkpoints(weights_path, storage_options)
    ckpt = checkpoints[0]
    _check_probabilistic_options(ckpt, paths[0], quantiles, exceedance, members, fmt)
    output_dir, plots_dir = location(output_dir, storage_options), location(plots_dir, storage_options)
    check_writable(output_dir, "--output_dir")
    if max_plots:
        check_writable(plots_dir, "--plots_dir")
    store = ensure_cube(input_dir, storage_options=storage_options, progress=progress, option="--input_dir")
    ds = forcings_read_from(open_cube(store, storage_options), ckpt, forcings_from or {}, f"--input_dir {input_dir}")
    grid = cube_grid(ds)
    ckpt.check_grid(grid, f"--weights_path {paths[0]}", f"--input_dir {input_dir}")
    all_dates = cube_dates(ds)
    issues = _issue_days(ds, ckpt, all_dates, str(input_dir), dates, last, split)
    forecaster = Forecaster.load(checkpoints, device, batch_size=batch_size, tile=tile)
    leads = ckpt.leads
    sha = ",".join(file_sha256(location(p, storage_options)) for p in paths)
    units = target_units(ds)
    missing = set(ds.attrs.get("missing_dates", []))
    plotted = plotted_maps(len(issues) * len(leads), max_plots)
    probabilistic = forecaster.probabilistic
    if probabilistic:
        quantiles = quantiles or [0.1, 0.5, 0.9]
        train = ckpt.splits["train"]
        exceedance = exceedance or wet_thresholds(ds, train.start, train.end)
    point_maps = forecaster.point_maps if probabilistic else []
    geotiffs, figures, forecasts = [], [], []
    read_from = {"forcings_from": ",".join(f"{k}={v}" for k, v in forcings_from.items())} if forcings_from else {}
    from tqdm import tqdm

    k = 0
    bar = tqdm(total=len(issues), desc="predict", unit="day", disable=not progress)
    for batch, out in forecaster.forecasts(ds, issues, members=probabilistic):
        maps = point_forecast(out, point_maps) if probabilistic else out
        for b, (t, values) in enumerate(zip(batch, maps)):
            issued = all_dates[t]
            for li, lead in enumerate(leads):
                valid = issued + dt.timedelta(days=lead)
                tags = {"issue_date": issued.isoformat(), "valid_date": valid.isoformat(), "lead_days": lead,
                        "units": units, "checkpoint_sha256": sha, "package_version": __version__,
                        "source": f"runoff-forecast ConvLSTM, {checkpoint_names(paths)}", **read_from}
                stem = output_dir / f"QS_{valid:%Y%m%d}_lead{lead}"
                what = f"{point_maps[li]} of the forecast distribution" if probabilistic else "QS forecast"
                geotiffs.append(write_geotiff(values[li], grid, stem.with_suffix(".tif"),
                                              {**tags, "point_map": point_maps[li]} if probabilistic else tags,
                                              description=f"{what}, lead {lead} d", units=units))
                if probabilistic:
                    geotiffs += _write_distribution(out[b, li], stem, grid, tags, units, quantiles, exceedance)
                if k in plotted:
                    truth = _truth(ds, all_dates, valid, missing)
                    scores = None if truth is None else {"mse": mse(values[li], truth), "nse": nse(values[li], truth)}
                    path = plots_dir / f"compare_{valid:%Y%m%d}_lead{lead}.png"
                    context = dict(valid_date=valid.isoformat(), issue_date=issued.isoformat(), lead=lead,
                                   truth=truth, units=units)
                    figures.append(
                        plot_probabilistic(quantile_maps(out[b, li], [0.1, 0.5, 0.9]),
                                           exceedance_maps(out[b, li], exceedance[:1])[0], exceedance[0], grid,
                                           path, **context) if probabilistic
                        else plot_comparison(values[li], grid, path, scores=scores, **context))
                k += 1
            if fmt == "netcdf":
                ensemble = None
                if members:
                    ensemble = np.stack([quantile_maps(out[b, li], member_levels(members))
                                         for li in range(len(leads))])
                forecasts.append(Forecast(issued, leads, values, ensemble))
        bar.update(len(batch))
    bar.close()
    netcdf = None
    if fmt == "netcdf":
        netcdf = write_netcdf(_forecast_dataset(forecasts, units, {"checkpoint_sha256": sha, **read_from},
                                                point_maps), grid,
                              output_dir / f"QS_forecasts_{all_dates[issues[0]]:%Y%m%d}_{all_dates[issues[-1]]:%Y%m%d}.nc")
    return PredictReport(geotiffs, figures, netcdf, [all_dates[t] for t in issues])


def _check_probabilistic_options(ckpt: Checkpoint, weights: str, quantiles: list[float] | None,
                                 exceedance: list[float] | None, members: int | None, fmt: str) -> None:
    """One clear error for each probabilistic option that cannot be honoured, before anything is written."""
    given = [name for name, value in (("--quantiles", quantiles), ("--exceedance", exceedance),
                                      ("--members", members)) if value is not None]
    if given and not ckpt.quantiles:
        raise RunoffError(f"{', '.join(given)}: {weights} is a deterministic checkpoint (train with --probabilistic)")
    if quantiles is not None and (any(not 0 < q < 1 for q in quantiles)
                                  or any(b <= a for a, b in zip(quantiles, quantiles[1:]))):
        raise RunoffError(f"--quantiles {','.join(f'{q:g}' for q in quantiles)}: levels must lie in (0, 1), "
                          f"in increasing order")
    check_thresholds(exceedance, "--exceedance")
    if members is not None and members < 2:
        raise RunoffError(f"--members {members}: an ensemble needs at least 2 members")
    if members is not None and fmt != "netcdf":
        raise RunoffError("--members: the members go into the NetCDF output; add --format netcdf")


def _write_distribution(members: np.ndarray, stem: Path, grid, tags: dict, units: str, quantiles: list[float],
                        exceedance: list[float]) -> list[Path]:
    """Quantile and exceedance-probability COGs of one forecast's members (Q, H, W)."""
    written = []
    for level, values in zip(quantiles, quantile_maps(members, quantiles)):
        name = f"{level * 100:g}".replace(".", "_")
        written.append(write_geotiff(values, grid, stem.with_name(f"{stem.name}_q{name}.tif"),
                                     {**tags, "quantile": f"{level:g}"},
                                     description=f"{level:g} quantile of the forecast, lead {tags['lead_days']} d",
                                     units=units))
    for threshold, values in zip(exceedance, exceedance_maps(members, exceedance)):
        name = f"{threshold:g}".replace(".", "_")
        written.append(write_geotiff(values, grid, stem.with_name(f"{stem.name}_p{name}.tif"),
                                     {**tags, "units": "1", "threshold": f"{threshold:g} {units}"},
                                     description=f"probability that QS exceeds {threshold:g} {units}, lead "
                                                 f"{tags['lead_days']} d", units="1"))
    return written


def _issue_days(ds: xr.Dataset, ckpt: Checkpoint, all_dates: list[dt.date], input_dir: str, dates: str | None,
                last: bool, split: str | None) -> list[int]:
    """Time indices of the issue days to forecast: complete input days, then ``--split``,
    ``--dates`` and ``--last``; one clear error when none is left, or when a chosen day's
    forcing is missing. Without ``--dates`` or ``--last``, a model with forcings skips the
    last days, whose lead days lie past the cube's end."""
    variables, input_days = ckpt.variables, ckpt.input_days
    ckpt.check_variables(list(ds.data_vars), f"--input_dir {input_dir}")
    missing = set(ds.attrs.get("missing_dates", []))
    present = [d.isoformat() not in missing for d in all_dates]
    candidates = [t for t in range(input_days - 1, len(all_dates)) if all(present[t - input_days + 1:t + 1])]
    if not candidates:
        raise RunoffError(f"--input_dir {input_dir}: {len(all_dates)} day(s) ({sum(present)} present); the model "
                          f"needs {input_days} consecutive days before an issue day")
    possible = f"{all_dates[candidates[0]]}..{all_dates[candidates[-1]]}"
    if split is not None:
        chosen = choose_split(split, ckpt.splits, all_dates[0], all_dates[-1])
        spec = WindowSpec(input_days, tuple(ckpt.leads), tuple(variables), tuple(ckpt.forcings))
        in_split = set(window_issues(ds, chosen, spec).tolist())
        candidates = [t for t in candidates if t in in_split]
    if ckpt.forcings and not dates and not last:
        # every possible day: those whose lead days run past the cube's end have no forcing to read
        candidates = [t for t in candidates if t + max(ckpt.leads) < len(all_dates)] or candidates
    issues = _select_issues(all_dates, candidates, dates, last)
    if not issues:
        chosen_by = " / ".join(f"{option} {value}" for option, value in (("--dates", dates), ("--split", split))
                               if value)
        raise RunoffError(f"{chosen_by}: no issue day with {input_days} complete prior days there "
                          f"({possible} are possible)")
    for t in issues:
        _check_forcing_days(ds, ckpt, all_dates, t, input_dir)
    return issues


def _check_forcing_days(ds: xr.Dataset, ckpt: Checkpoint, all_dates: list[dt.date], t: int, input_dir: str) -> None:
    """One clear error, naming the date, when a forcing has no value on a lead day of the
    forecast issued at ``t`` (operationally: its forecast is not ingested yet)."""
    for name in ckpt.forcings:
        missing = set(ds[name].attrs.get("missing_dates", []))
        for ahead in range(1, max(ckpt.leads) + 1):
            day = all_dates[t] + dt.timedelta(days=ahead)
            if t + ahead >= len(all_dates) or day.isoformat() in missing:
                raise RunoffError(f"--input_dir {input_dir}: forcing {name} has no value for {day} (day {ahead} "
                                  f"ahead of the forecast issued {all_dates[t]}); ingest its forecast for that day")


def plotted_maps(n_maps: int, max_plots: int) -> set[int]:
    """Which of ``n_maps`` forecast maps (issue days by leads, in order) get a figure: all for
    ``max_plots`` -1 or >= ``n_maps``, else ``max_plots`` of them evenly spaced, the last (the
    latest forecast) always among them.

    >>> sorted(plotted_maps(12, 2)), sorted(plotted_maps(12, 1)), sorted(plotted_maps(3, -1))
    ([0, 11], [11], [0, 1, 2])
    """
    if max_plots < 0 or n_maps <= max_plots:
        return set(range(n_maps))
    if max_plots == 0:
        return set()
    return {n_maps - 1 - round(k * (n_maps - 1) / max(max_plots - 1, 1)) for k in range(max_plots)}


def _truth(ds: xr.Dataset, all_dates: list[dt.date], valid: dt.date, missing: set[str]) -> np.ndarray | None:
    if valid > all_dates[-1] or valid.isoformat() in missing:
        return None
    values = np.asarray(ds[TARGET].data[(valid - all_dates[0]).days])
    if np.isnan(values).all():
        warnings.warn(f"truth for {valid} holds no valid pixel", RunoffWarning, stacklevel=2)
        return None
    return values


def member_levels(n: int) -> np.ndarray:
    """The quantile levels that ``--members n`` reads the forecast distribution at: the
    middles of ``n`` equal slices of probability, so that the members are equally likely.

    >>> member_levels(4).tolist()
    [0.125, 0.375, 0.625, 0.875]
    """
    return (np.arange(n) + 0.5) / n


def _forecast_dataset(forecasts: list[Forecast], units: str, attrs: dict[str, str],
                      point_maps: Sequence[str] = ()) -> xr.Dataset:
    """All forecasts as ``qs_forecast(time, lead, y, x)``, ``time`` being the issue day; ``attrs``
    (the checkpoint's digest, the forcings' sources) go into the global attributes. A
    probabilistic forecast's ``point_maps`` (per lead, the statistic ``qs_forecast`` holds)
    become the coordinate ``point_map(lead)``."""
    leads = forecasts[0].leads
    times = np.array([np.datetime64(f.issue, "ns") for f in forecasts])
    values = np.stack([f.values for f in forecasts])
    valid = times[:, None] + np.array([np.timedelta64(lead, "D") for lead in leads])[None, :]
    data_vars = {"qs_forecast": (("time", "lead", "y", "x"), values,
                                 {"long_name": "forecast storm surface runoff", "units": units})}
    if forecasts[0].members is not None:
        data_vars["qs_members"] = (("time", "lead", "member", "y", "x"), np.stack([f.members for f in forecasts]),
                                   {"long_name": "ensemble members of the forecast (its quantiles at evenly "
                                                 "spaced levels)", "units": units})
    coords = {"time": ("time", times, {"long_name": "issue day (last input day)"}),
              "lead": ("lead", np.array(leads, np.int32), {"long_name": "lead time", "units": "days"}),
              "valid_time": (("time", "lead"), valid, {"long_name": "day the forecast is for"})}
    if point_maps:
        coords["point_map"] = ("lead", np.array(point_maps),
                               {"long_name": "statistic of the forecast distribution that qs_forecast holds"})
    if forecasts[0].members is not None:
        n = forecasts[0].members.shape[1]
        coords["member"] = ("member", np.arange(1, n + 1, dtype=np.int32),
                            {"long_name": "ensemble member", "standard_name": "realization"})
        coords["member_level"] = ("member", member_levels(n),
                                  {"long_name": "quantile level of the forecast distribution the member is read at"})
    ds = xr.Dataset(data_vars, coords=coords)
    ds.attrs.update(Conventions="CF-1.8", title="QS forecasts", source=f"runoff-forecast {__version__}", **attrs)
    return ds
