"""``runoff evaluate``: the model against persistence and climatology, per lead time.

All three forecast the same windows (those whose target days lie in the split), on
valid pixels only. Scores stream: each batch of windows updates one accumulator per lead
and source (:mod:`pipeline.verify`), so memory does not grow with the number of windows.
Writes ``metrics.json``, ``metrics.md`` (one table per lead),
``skill_by_lead.png`` and the per-pixel NSE and KGE maps of the first lead as a GeoTIFF (on
the cube's grid) and a PNG.

Pixels pooled weigh the wettest cells most; a hydrologist also asks how well the area's
total is forecast. So each source's map and the truth are averaged over the area every day
(weighted by cell area, over the pixels valid in all of them) and scored as a series:
``area_mean`` in ``metrics.json``, a table in ``metrics.md``, the series in
``area_mean.csv`` and, for the first and last lead, ``area_mean.png``. On a cube of one
catchment, or with ``mask`` (``--mask``: a raster selecting a catchment's pixels, to which
every score is then limited), that is the catchment's mean runoff.

A probabilistic checkpoint's single map (``model``) is the map ``runoff predict`` writes: per
lead, the mean or the median of its quantiles, as its calibration chose
(:func:`~pipeline.calibration.choose_point_maps`). Both get the same continuous scores beside
it (``mean``, and ``median``: the quantile map at 0.5, the ``_q50`` GeoTIFF). It is also
scored as an ensemble (its quantiles as equally likely members) against two reference ensembles
(:mod:`pipeline.baselines`): the climatological one (training days around the same day of
year) and the persistence one (today's map plus persistence's training errors at that
lead). Per lead: CRPS and its skill against
both, spread/skill, the Brier score and its skill (against the climatological ensemble) at
each threshold, the reliability gap at each threshold (from the diagonal, and beyond the
band of resampled days), and ``ensemble_lead{L}.png`` (rank histogram and reliability
diagram).

Several checkpoints trained alike are scored as one model (:class:`~pipeline.inference.Forecaster`
combines them); ``metrics.md`` says how.

Example
-------
>>> report = evaluate("checkpoints/best.pth", "stores/qs.zarr", split="test")   # doctest: +SKIP
>>> print(report.markdown)                                                       # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import xarray as xr

from .baselines import (SOURCES, Climatology, ClimatologyEnsemble, PersistenceEnsemble, check_thresholds,
                        wet_thresholds)
from .checkpoint import POINT_MAPS, point_maps_text
from .cube import TARGET, Split, cube_dates, cube_grid, target_units
from .errors import RunoffError
from .export import write_geotiff
from .inference import Forecaster, checkpoint_names, quantile_maps, read_checkpoints, read_days, split_windows
from .plots import plot_area_means, plot_ensemble_diagnostics, plot_map, plot_skill_by_lead
from .rasters import Grid, read_mask
from .storage import atomic_output, check_writable, location
from .verify import (RELIABILITY_ROWS, ContinuousScores, EnsembleScores, PixelScores, ScoreTable, area_means, skill,
                     widest_reliability_gap)


@dataclass
class EvaluationReport:
    """Scores per lead and source, and the files written."""

    metrics: dict[int, dict[str, dict[str, float]]]
    markdown: str  # the whole of metrics.md
    summary: str  # the continuous scores only, for the terminal
    files: list[Path]
    windows: int
    ensemble: dict[int, dict] = field(default_factory=dict)  # probabilistic: rank histogram, reliability per lead
    area_mean: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)  # the area's mean, scored per lead


BAND_BLOCK_DAYS = 10  # consecutive valid days resampled together for the reliability band (docs/skill.md)
_MAIN_COLUMNS = ("mse", "rmse", "mae", "bias", "nse", "kge", "skill_vs_persistence", "skill_vs_climatology")
_AREA_COLUMNS = ("mse", "bias", "nse", "kge", "skill_vs_persistence", "skill_vs_climatology")
_ENSEMBLE_PREFIXES = ("crps", "brier", "spread_skill", "reliability_gap")


def _table(rows: dict[str, dict[str, float]], columns: list[str]) -> list[str]:
    """A markdown table of ``columns``, one line per source that has any of them."""
    lines = ["| source | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for source, row in rows.items():
        if not any(c in row for c in columns):
            continue
        lines.append(f"| {source} | " + " | ".join(f"{row.get(c, float('nan')):.4g}" for c in columns) + " |")
    return lines


def _skill_lines(metrics: dict[int, dict[str, dict[str, float]]], inputs: str,
                 point_maps: dict[int, str] | None = None) -> list[str]:
    """One line per lead: the model's MSE skill against both baselines (and when
    probabilistic which map it is, ``point_maps``, the MSE skill against persistence of the
    other one, its CRPS skill and its widest reliability gap over the thresholds), and its inputs."""
    lines = []
    for lead, rows in metrics.items():
        model = rows["model"]
        point = (point_maps or {}).get(lead)
        other = {"mean": "median", "median": "mean"}.get(point)
        which = f" (the {point}; {other} {rows[other]['skill_vs_persistence']:+.3f})" if other else ""
        gap = widest_reliability_gap(model)
        ensemble = (f"; CRPS skill vs persistence {model['crps_skill_vs_persistence']:+.3f}, vs climatology "
                    f"{model['crps_skill_vs_climatology']:+.3f}" if "crps" in model else "")
        ensemble += f"; reliability gap {gap:.3f}" if gap is not None else ""
        lines.append(f"lead {lead}: skill vs persistence {model['skill_vs_persistence']:+.3f}{which}, "
                     f"vs climatology {model['skill_vs_climatology']:+.3f}{ensemble}  ({inputs})")
    return lines


def _area_section(area: dict[int, dict[str, dict[str, float]]], windows: int, geographic: bool) -> list[str]:
    """metrics.md's table of the scores of the area's mean, per lead and source."""
    weights = "weighted by cell area, the cosine of the latitude" if geographic else "cells weighted equally"
    lines = ["## Mean over the scored area", "",
             f"Each map and the truth averaged over the pixels valid in all of them ({weights}), one value per "
             f"window, and scored as a series of {windows} days per lead: a catchment's mean runoff. Day by day in "
             "area_mean.csv and area_mean.png.", "",
             "| lead | source | " + " | ".join(_AREA_COLUMNS) + " |", "|---" * (len(_AREA_COLUMNS) + 2) + "|"]
    for lead, rows in area.items():
        lines += [f"| {lead} | {source} | " + " | ".join(f"{row[c]:.4g}" for c in _AREA_COLUMNS) + " |"
                  for source, row in rows.items()]
    return lines + [""]


def _markdown(metrics: dict[int, dict[str, dict[str, float]]], split: Split, windows: int, skill_lines: list[str],
              notes: list[str], units: str, area: list[str], categorical: bool = True) -> str:
    """The skill lines, then one table per lead (continuous scores and skill), then the
    ``area`` section (:func:`_area_section`) and the notes; with ``categorical`` a second
    table per lead of CSI/POD/FAR and FSS at each threshold (in ``units``, the target's)."""
    what = f"the {split.name} split" if ".." not in split.name else "the period"
    lines = [f"# Evaluation on {what} ({split.start} .. {split.end}), {windows} windows", ""]
    if skill_lines:
        lines += skill_lines + [""]
    for lead, rows in metrics.items():
        lines += [f"## Lead {lead} day(s)", ""] + _table(rows, list(_MAIN_COLUMNS)) + [""]
        ensemble = [k for k in rows["model"] if k.startswith(_ENSEMBLE_PREFIXES)]
        if ensemble:
            lines += [f"Probabilistic scores, lead {lead} (model: its quantiles as members; persistence and "
                      f"climatology: their ensembles):", ""] + _table(rows, ensemble) + [""]
        if categorical:
            extra = [k for k in rows["model"] if k not in _MAIN_COLUMNS and k not in ensemble]
            lines += [f"Events at thresholds ({units}), lead {lead}:", ""] + _table(rows, extra) + [""]
    lines += area
    lines.append("skill = 1 - MSE_model / MSE_baseline (CRPS and Brier skill alike). Every source is scored on "
                 "the same windows and the same valid pixels.")
    lines += notes
    return "\n".join(lines)


# threads scoring at once (one accumulator each); one scoring an ensemble holds its members
# and ~0.1 GB of work arrays (verify.PIXELS_PER_PASS pixels of 30 members in float64)
SCORING_THREADS = 4


class Scoreboard:
    """Every accumulator of one evaluation, fed batch by batch: the point scores per lead and
    source (the model, when probabilistic the mean and the median of its quantiles, persistence,
    climatology), the ensemble scores per lead and source (probabilistic), the model's per-pixel NSE and KGE
    at the first lead, which climatology each scored day got, and each source's mean over
    the area (weighted by cell area, over the pixels valid in every source and the truth)
    per lead and day, scored as a series.

    The maps of one issue day are scored on up to :data:`SCORING_THREADS` threads (NumPy
    releases the GIL while it sorts and sums): each accumulator still takes its maps in the
    order of the issue days, so the scores are those of one thread."""

    def __init__(self, ds: xr.Dataset, train_range: Split, leads: list[int], thresholds: list[float],
                 point_maps: Sequence[str] = (), mask: np.ndarray | None = None) -> None:
        self.ds, self.dates, self.leads, self.thresholds = ds, cube_dates(ds), leads, thresholds
        self.mask = mask  # the pixels scored (all if None): the truth is NaN elsewhere
        # a probabilistic model's single map per lead (Forecaster.point_maps); none: a deterministic model
        self.point_maps = list(point_maps)
        self.probabilistic = bool(self.point_maps)
        self.climatology = Climatology(ds, train_range.start, train_range.end)
        self.climatology_used: dict[str, int] = {}
        self.point_sources = ("model", *POINT_MAPS, *SOURCES[1:]) if self.probabilistic else SOURCES
        self.tables = {lead: {s: ScoreTable(thresholds) for s in self.point_sources} for lead in leads}
        if self.probabilistic:
            self.ensembles = {lead: {s: EnsembleScores(thresholds) for s in SOURCES} for lead in leads}
            self.climatology_members = ClimatologyEnsemble(ds, train_range.start, train_range.end,
                                                           cached=max(leads))
            self.persistence_members = PersistenceEnsemble(ds, train_range.start, train_range.end, leads)
        self.pixels = PixelScores(ds[TARGET].shape[1:])
        self.cell_areas = cube_grid(ds).area_weights()
        # per lead, (issue, [truth, *point sources]) of each scored day: a few numbers a day, kept for
        # the CSV, the figure and the scores
        self.area_series: dict[int, list[tuple[int, np.ndarray]]] = {lead: [] for lead in leads}
        self.threads = min(SCORING_THREADS, os.cpu_count() or 1)

    def add(self, issues: Sequence[int], out: np.ndarray) -> None:
        """Score the forecasts ``out`` of the windows issued at ``issues`` (consecutive
        time indices), and the baselines on the same days and pixels."""
        first = issues[0]
        days = read_days(self.ds, TARGET, first, issues[-1] + max(self.leads))  # truth and persistence
        if self.mask is not None:
            days = np.where(self.mask, days, np.float32(np.nan))
        with ThreadPoolExecutor(max_workers=self.threads) as pool:
            for k, t in enumerate(issues):
                today, jobs = days[t - first], []
                for li, lead in enumerate(self.leads):
                    truth, doy = days[t - first + lead], self.dates[t + lead].timetuple().tm_yday - 1
                    # a probabilistic model's single map is one of these two, each scored beside it too
                    singles = ({"mean": out[k, li].mean(axis=0), "median": quantile_maps(out[k, li], [0.5])[0]}
                               if self.probabilistic else {})
                    pred = singles[self.point_maps[li]] if self.probabilistic else out[k, li]
                    jobs += self._point_jobs(lead, t, doy, pred, singles, today, truth)
                    if li == 0:
                        jobs.append(partial(self.pixels.accumulate, pred, truth))
                    if self.probabilistic:
                        block = (t + lead) // BAND_BLOCK_DAYS  # of the valid day: its truth is what persists
                        jobs += self._ensemble_jobs(lead, doy, out[k, li], today, truth, block)
                for _ in pool.map(lambda job: job(), jobs):  # one day at a time: each accumulator in day order
                    pass

    def _point_jobs(self, lead: int, issue: int, doy: int, pred: np.ndarray, singles: dict[str, np.ndarray],
                    today: np.ndarray, truth: np.ndarray) -> list[Callable[[], object]]:
        """The point scorings of one lead's map ``pred`` (and of a probabilistic model's
        ``singles``: the mean and the median of its quantiles) and of both baselines against
        ``truth`` on day of year ``doy``, per pixel and as the area's mean, to run on any thread
        (each touches its own accumulators)."""
        reference = {"model": pred, **singles, "persistence": today, "climatology": self.climatology.for_day(doy)}
        how = self.climatology.source(doy)
        self.climatology_used[how] = self.climatology_used.get(how, 0) + 1
        return [partial(self.tables[lead][source].accumulate, values, truth) for source, values in reference.items()
                ] + [partial(self._record_area_means, lead, issue, [reference[s] for s in self.point_sources], truth)]

    def _record_area_means(self, lead: int, issue: int, maps: list[np.ndarray], truth: np.ndarray) -> None:
        """The truth's mean over the area and each source's (``maps`` in the order of
        ``point_sources``), recorded for the series of ``lead``."""
        self.area_series[lead].append((issue, area_means([truth, *maps], self.cell_areas)))

    def _ensemble_jobs(self, lead: int, doy: int, members: np.ndarray, today: np.ndarray, truth: np.ndarray,
                       block: int) -> list[Callable[[], object]]:
        """The ensemble scorings of one lead's ``members`` and of both reference ensembles,
        to run on any thread (each touches its own accumulator)."""
        scores = self.ensembles[lead]
        climatology = self.climatology_members.for_day(doy)  # here: its cache is not shared between threads
        return [partial(scores["model"].accumulate, members, truth, block=block),
                partial(scores["climatology"].accumulate, climatology, truth, block=block),
                # made on the thread, so only the running jobs' member maps are held
                lambda: scores["persistence"].accumulate(self.persistence_members.members(today, lead), truth,
                                                         block=block)]

    def metrics(self) -> dict[int, dict[str, dict[str, float]]]:
        """Per lead and source: the continuous and categorical scores, MSE skill against
        both baselines, and when probabilistic the ensemble scores and their skill."""
        metrics = {}
        for lead in self.leads:
            rows = _with_mse_skill({s: self.tables[lead][s].compute() for s in self.point_sources})
            if self.probabilistic:
                _add_ensemble_scores(rows, {s: self.ensembles[lead][s].compute() for s in SOURCES}, self.thresholds)
            metrics[lead] = rows
        return metrics

    def area_metrics(self) -> dict[int, dict[str, dict[str, float]]]:
        """Per lead and source: the continuous scores of the area's mean, with MSE skill
        against both baselines' means."""
        metrics = {}
        for lead in self.leads:
            means = np.array([m for _, m in self.area_series[lead]]).reshape(-1, 1 + len(self.point_sources))
            metrics[lead] = _with_mse_skill({s: ContinuousScores().accumulate(means[:, k], means[:, 0]).compute()
                                             for k, s in enumerate(self.point_sources, start=1)})
        return metrics

    def area_table(self) -> list[str]:
        """The series of the area's mean as CSV lines: per lead and issue day, the valid
        day, the truth's mean and each source's."""
        lines = ["issue_date,valid_date,lead,truth," + ",".join(self.point_sources)]
        for lead in self.leads:
            for issue, means in self.area_series[lead]:
                lines.append(f"{self.dates[issue]},{self.dates[issue + lead]},{lead},"
                             + ",".join(f"{m:.6g}" for m in means))
        return lines

    def area_plot_series(self) -> tuple[dict[int, dict[str, list[float]]], dict[int, list]]:
        """The series of the first and last lead for :func:`~pipeline.plots.plot_area_means`."""
        series, dates = {}, {}
        for lead in dict.fromkeys((self.leads[0], self.leads[-1])):
            names = ("truth", *self.point_sources)
            series[lead] = {n: [float(means[k]) for _, means in self.area_series[lead]] for k, n in enumerate(names)}
            dates[lead] = [self.dates[issue + lead] for issue, _ in self.area_series[lead]]
        return series, dates

    def climatology_note(self) -> str:
        """Which climatology the scored days got, for metrics.md."""
        return "Climatology: " + ", ".join(
            f"{how} on {count} scored day(s)" for how, count in sorted(self.climatology_used.items())) + (
            " (training days within that many days of the same day of year; the training mean where none lies "
            "within ±45 days).")

    def diagnostics(self) -> dict:
        """Probabilistic: the model's rank histogram and reliability tables per lead."""
        return {lead: _diagnostics(self.ensembles[lead]["model"]) for lead in self.leads} if self.probabilistic else {}


def evaluate(weights_path: str | Path | Sequence[str | Path], data_dir: str | Path, split: str = "test",
             output_dir: str | Path = "outputs/evaluation", thresholds: list[float] | None = None,
             device: str = "auto", batch_size: int = 8, storage_options: dict | None = None,
             progress: bool = False, forcings_from: dict[str, str] | None = None,
             mask: str | Path | None = None) -> EvaluationReport:
    """Score the checkpoint ``weights_path`` (or several trained alike, forecasting together:
    see :class:`~pipeline.inference.Forecaster`) on ``split`` (train, val, test, all, or a
    period START..END) of ``data_dir``; ``batch_size`` windows per forward pass and per
    accumulator update. ``forcings_from`` reads forcings from other cube variables
    (``{"rainf": "rainf_fc"}``: scored with a rain forecast; :func:`~pipeline.inference.forcings_read_from`).
    ``mask``, a raster on the cube's grid, limits every score to the pixels it selects
    (:func:`~pipeline.rasters.read_mask`: a catchment), the default thresholds too."""
    check_thresholds(thresholds, "--thresholds")
    paths, checkpoints = read_checkpoints(weights_path, storage_options)
    ckpt = checkpoints[0]
    output_dir = location(output_dir, storage_options)
    check_writable(output_dir, "--output_dir")
    windows = split_windows(ckpt, data_dir, split, paths[0], storage_options, progress, forcings_from)
    ds, chosen, issues = windows.ds, windows.period, windows.issues
    grid = cube_grid(ds)
    selected = read_mask(mask, grid, f"the cube {windows.store}", "--mask") if mask is not None else None
    if selected is not None and not (selected & np.isfinite(np.asarray(ds[TARGET].data[issues[0]]))).any():
        raise RunoffError(f"--mask {mask}: selects only pixels without data in the cube {windows.store}")
    train_range = ckpt.splits["train"]
    thresholds = thresholds or wet_thresholds(ds, train_range.start, train_range.end, mask=selected)
    forecaster = Forecaster.load(checkpoints, device, batch_size=batch_size)
    leads = list(windows.spec.leads)
    point_maps = forecaster.point_maps if forecaster.probabilistic else []
    scores = Scoreboard(ds, train_range, leads, thresholds, point_maps, selected)
    from tqdm import tqdm

    with tqdm(total=len(issues), desc="evaluate", unit="window", disable=not progress) as bar:
        for batch, out in forecaster.forecasts(ds, issues, members=forecaster.probabilistic):
            scores.add(batch, out)
            bar.update(len(batch))
    metrics = scores.metrics()
    n = len(issues)
    long_names = {v: ds[v].attrs.get("long_name", "") for v in ds.data_vars}
    skill_lines = _skill_lines(metrics, ckpt.inputs_note(long_names, forcings_from), dict(zip(leads, point_maps)))
    notes = [scores.climatology_note()]
    if point_maps:
        notes.append(f"model: the map runoff predict writes, the mean or the median of the quantiles as "
                     f"the checkpoint's calibration chose ({point_maps_text(dict(zip(leads, point_maps)))}).")
    if selected is not None:
        notes.append(f"Scored inside {mask} (--mask): {int(selected.sum())} of the grid's {selected.size} pixels.")
    if len(paths) > 1:
        notes.append(f"Model: {len(paths)} checkpoints forecasting together ({', '.join(paths)}): "
                     + (f"their quantiles pooled, {forecaster.members} members." if forecaster.probabilistic
                        else "the mean of their maps."))
    if chosen.overlaps(train_range):
        notes.append(f"The scored days overlap the training split ({train_range.start} .. {train_range.end}): "
                     "those scores are in-sample.")
    units = target_units(ds)
    notes.append(f"Units: mse in ({units})²; rmse, mae, bias{', crps' if scores.probabilistic else ''} and the "
                 f"thresholds in {units}.")
    area = scores.area_metrics()
    area_lines = _area_section(area, n, grid.crs.is_geographic)
    markdown = _markdown(metrics, chosen, n, skill_lines, notes, units, area_lines)
    summary = "\n".join(skill_lines) + "\n\n" + _markdown(metrics, chosen, n, [], notes, units, area_lines,
                                                           categorical=False)
    diagnostics = scores.diagnostics()
    files = _write_outputs(metrics, area, markdown, output_dir, {
        "split": split, "start": chosen.start.isoformat(), "end": chosen.end.isoformat(), "windows": n,
        "thresholds": thresholds, "units": units, "checkpoint": paths[0] if len(paths) == 1 else paths,
        "cube": str(windows.store), **({"forcings_from": forcings_from} if forcings_from else {}),
        **({"point_maps": dict(zip(map(str, leads), point_maps))} if point_maps else {}),
        **({"mask": str(mask)} if mask is not None else {})},
        diagnostics)
    files.append(output_dir / "area_mean.csv")
    with atomic_output(files[-1]) as tmp:
        tmp.write_text("\n".join(scores.area_table()) + "\n")
    files.append(plot_area_means(*scores.area_plot_series(), output_dir / "area_mean.png", units=units,
                                 title=f"mean over the scored area, {split} split, {n} windows"))
    if scores.probabilistic:
        for lead in leads:
            files.append(plot_ensemble_diagnostics(
                scores.ensembles[lead]["model"].ranks, scores.ensembles[lead]["model"].reliability(),
                output_dir / f"ensemble_lead{lead}.png", title=f"lead {lead} d, {split} split, {n} windows"))
    files += _write_pixel_maps(scores.pixels, grid, output_dir, leads[0], split, paths)
    return EvaluationReport(metrics, markdown, summary, files, n, diagnostics, area)


def _with_mse_skill(rows: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """``rows`` (continuous scores per source) with each source's MSE skill against both baselines."""
    for row in rows.values():
        for base in ("persistence", "climatology"):
            row[f"skill_vs_{base}"] = skill(row["mse"], rows[base]["mse"])
    return rows


def _write_pixel_maps(pixels: PixelScores, grid: Grid, output_dir: Path, lead: int, split: str,
                      weights_paths: list[str]) -> list[Path]:
    """The model's per-pixel NSE and KGE at ``lead``: a GeoTIFF on the cube's grid and a PNG each."""
    files = []
    for name, values in pixels.compute().items():
        label = name.upper()
        tags = {"metric": f"{label} per pixel", "lead_days": lead, "split": split,
                "checkpoint": checkpoint_names(weights_paths)}
        stem = output_dir / f"{name}_map_lead{lead}"
        files.append(write_geotiff(values, grid, stem.with_suffix(".tif"), tags,
                                   description=f"{label} per pixel, lead {lead} d", units="1"))
        files.append(plot_map(values, grid, stem.with_suffix(".png"),
                              title=f"{label} per pixel, lead {lead} d, {split} split", label=label,
                              vmin=-1.0, vmax=1, cmap="RdYlGn"))
    return files


def _diagnostics(scores: EnsembleScores) -> dict:
    """The model's rank histogram and reliability tables (with the observed frequency's
    5-95% band over test days resampled in blocks of ``BAND_BLOCK_DAYS``), as plain lists
    for metrics.json."""
    return {"rank_histogram": scores.ranks.tolist(),
            "reliability": {f"{thr:g}": dict(zip(RELIABILITY_ROWS, (row.tolist() for row in table)))
                            for thr, table in scores.reliability().items()}}


def _add_ensemble_scores(rows: dict[str, dict[str, float]], scores: dict[str, dict[str, float]],
                         thresholds: list[float]) -> None:
    """Each source's ensemble scores into its row, with CRPS skill against both reference
    ensembles and Brier skill against the climatological one."""
    for source, values in scores.items():
        rows[source].update(values)
        for base in ("persistence", "climatology"):
            rows[source][f"crps_skill_vs_{base}"] = skill(values["crps"], scores[base]["crps"])
        for thr in thresholds:
            key = f"brier@{thr:g}"
            rows[source][f"brier_skill@{thr:g}"] = skill(values[key], scores["climatology"][key])


def _write_outputs(metrics: dict, area: dict, markdown: str, output_dir: Path, meta: dict,
                   diagnostics: dict) -> list[Path]:
    json_path, md_path = output_dir / "metrics.json", output_dir / "metrics.md"
    document = {"meta": meta, "leads": {str(k): v for k, v in metrics.items()},
                "area_mean": {str(k): v for k, v in area.items()}}
    if diagnostics:
        document["ensemble"] = {str(k): v for k, v in diagnostics.items()}
    for path, text in ((json_path, json.dumps(document, indent=2, allow_nan=True)), (md_path, markdown + "\n")):
        with atomic_output(path) as tmp:
            tmp.write_text(text)
    skill = plot_skill_by_lead(metrics, output_dir / "skill_by_lead.png")
    return [json_path, md_path, skill]
