"""``runoff evaluate``: the model against persistence and climatology, per lead time.

All three forecast the same windows (those whose target days lie in the split), on
valid pixels only. Scores stream: each batch of windows updates one accumulator per lead
and source (:mod:`pipeline.verify`), so memory does not grow with the number of windows.
Writes ``metrics.json``, ``metrics.md`` (one table per lead),
``skill_by_lead.png`` and the per-pixel NSE and KGE maps of the first lead as a GeoTIFF (on
the cube's grid) and a PNG.

A probabilistic checkpoint's single map (``model``) is the mean of its quantiles, the map
``runoff predict`` writes; its median (``median``: the quantile map at 0.5, the ``_q50``
GeoTIFF) gets the same continuous scores beside it. It is also scored as an ensemble (its
quantiles as equally likely members) against two reference ensembles
(:mod:`pipeline.baselines`): the climatological one (training days around the same day of
year) and the persistence one (today's map plus persistence's training errors at that
lead). Per lead: CRPS and its skill against
both, spread/skill, the Brier score and its skill (against the climatological ensemble) at
each threshold, the reliability gap at each threshold (from the diagonal, and beyond the
band of resampled days), and ``ensemble_lead{L}.png`` (rank histogram and reliability
diagram).

Example
-------
>>> report = evaluate("checkpoints/best.pth", "stores/qs.zarr", split="test")   # doctest: +SKIP
>>> print(report.markdown)                                                       # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .baselines import (SOURCES, Climatology, ClimatologyEnsemble, PersistenceEnsemble, check_thresholds,
                        wet_thresholds)
from .checkpoint import read_checkpoint
from .cube import TARGET, Split, cube_dates, cube_grid, target_units
from .export import write_geotiff
from .inference import Forecaster, point_forecast, quantile_maps, read_days, split_windows
from .plots import plot_ensemble_diagnostics, plot_map, plot_skill_by_lead
from .storage import atomic_output, check_writable, location
from .verify import RELIABILITY_ROWS, EnsembleScores, PixelScores, ScoreTable, skill, widest_reliability_gap


@dataclass
class EvaluationReport:
    """Scores per lead and source, and the files written."""

    metrics: dict[int, dict[str, dict[str, float]]]
    markdown: str  # the whole of metrics.md
    summary: str  # the continuous scores only, for the terminal
    files: list[Path]
    windows: int
    ensemble: dict[int, dict] = field(default_factory=dict)  # probabilistic: rank histogram, reliability per lead


BAND_BLOCK_DAYS = 10  # consecutive valid days resampled together for the reliability band (docs/skill.md)
_MAIN_COLUMNS = ("mse", "rmse", "mae", "bias", "nse", "kge", "skill_vs_persistence", "skill_vs_climatology")
_ENSEMBLE_PREFIXES = ("crps", "brier", "spread_skill", "reliability_gap")


def _table(rows: dict[str, dict[str, float]], columns: list[str]) -> list[str]:
    """A markdown table of ``columns``, one line per source that has any of them."""
    lines = ["| source | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for source, row in rows.items():
        if not any(c in row for c in columns):
            continue
        lines.append(f"| {source} | " + " | ".join(f"{row.get(c, float('nan')):.4g}" for c in columns) + " |")
    return lines


def _skill_lines(metrics: dict[int, dict[str, dict[str, float]]], inputs: str) -> list[str]:
    """One line per lead: the model's MSE skill against both baselines (and when
    probabilistic its median's MSE skill against persistence, its CRPS skill and its widest
    reliability gap over the thresholds), and its inputs."""
    lines = []
    for lead, rows in metrics.items():
        model = rows["model"]
        median = f" (median {rows['median']['skill_vs_persistence']:+.3f})" if "median" in rows else ""
        gap = widest_reliability_gap(model)
        ensemble = (f"; CRPS skill vs persistence {model['crps_skill_vs_persistence']:+.3f}, vs climatology "
                    f"{model['crps_skill_vs_climatology']:+.3f}" if "crps" in model else "")
        ensemble += f"; reliability gap {gap:.3f}" if gap is not None else ""
        lines.append(f"lead {lead}: skill vs persistence {model['skill_vs_persistence']:+.3f}{median}, "
                     f"vs climatology {model['skill_vs_climatology']:+.3f}{ensemble}  ({inputs})")
    return lines


def _markdown(metrics: dict[int, dict[str, dict[str, float]]], split: Split, windows: int, skill_lines: list[str],
              notes: list[str], units: str, categorical: bool = True) -> str:
    """The skill lines, then one table per lead (continuous scores and skill), then the
    notes; with ``categorical`` a second table per lead of CSI/POD/FAR and FSS at each threshold
    (in ``units``, the target's)."""
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
    lines.append("skill = 1 - MSE_model / MSE_baseline (CRPS and Brier skill alike). Every source is scored on "
                 "the same windows and the same valid pixels.")
    lines += notes
    return "\n".join(lines)


def evaluate(weights_path: str | Path, data_dir: str | Path, split: str = "test",
             output_dir: str | Path = "outputs/evaluation", thresholds: list[float] | None = None,
             device: str = "auto", batch_size: int = 8, storage_options: dict | None = None,
             progress: bool = False) -> EvaluationReport:
    """Score the checkpoint on ``split`` (train, val, test, all, or a period START..END) of ``data_dir``;
    ``batch_size`` windows per forward pass and per accumulator update."""
    check_thresholds(thresholds, "--thresholds")
    ckpt = read_checkpoint(weights_path, storage_options=storage_options)
    output_dir = location(output_dir, storage_options)
    check_writable(output_dir, "--output_dir")
    windows = split_windows(ckpt, data_dir, split, weights_path, storage_options, progress)
    store, ds, chosen, spec, issues = windows.store, windows.ds, windows.period, windows.spec, windows.issues
    grid, dates = cube_grid(ds), cube_dates(ds)
    train_range = ckpt.splits["train"]
    clim = Climatology(ds, train_range.start, train_range.end)
    clim_used: dict[str, int] = {}  # which climatology each scored day got, for metrics.md
    thresholds = thresholds or wet_thresholds(ds, train_range.start, train_range.end)
    forecaster = Forecaster.load(ckpt, device, batch_size=batch_size)
    leads = list(spec.leads)
    probabilistic = forecaster.probabilistic
    point_sources = ("model", "median", *SOURCES[1:]) if probabilistic else SOURCES
    tables = {lead: {s: ScoreTable(thresholds) for s in point_sources} for lead in leads}
    if probabilistic:
        ensembles = {lead: {s: EnsembleScores(thresholds) for s in SOURCES} for lead in leads}
        clim_members = ClimatologyEnsemble(ds, train_range.start, train_range.end)
        persistence_members = PersistenceEnsemble(ds, train_range.start, train_range.end, leads)
    pixels = PixelScores(grid.shape)  # the model's per-pixel NSE and KGE at the first lead
    from tqdm import tqdm

    bar = tqdm(total=len(issues), desc="evaluate", unit="window", disable=not progress)
    for batch, out in forecaster.forecasts(ds, issues, members=probabilistic):
        pred = point_forecast(out) if probabilistic else out
        days = read_days(ds, TARGET, batch[0], batch[-1] + max(leads))  # truth and persistence of the batch
        for k, t in enumerate(batch):
            last_day = days[t - batch[0]]
            for li, lead in enumerate(leads):
                truth = days[t - batch[0] + lead]
                doy = dates[t + lead].timetuple().tm_yday - 1
                reference = {"model": pred[k, li], "persistence": last_day, "climatology": clim.for_day(doy)}
                if probabilistic:
                    reference["median"] = quantile_maps(out[k, li], [0.5])[0]
                how = clim.source(doy)
                clim_used[how] = clim_used.get(how, 0) + 1
                for source, values in reference.items():
                    tables[lead][source].accumulate(values, truth)
                if li == 0:
                    pixels.accumulate(pred[k, li], truth)
                if probabilistic:
                    block = (t + lead) // BAND_BLOCK_DAYS  # of the valid day: its truth is what persists
                    ensemble_members = {"model": out[k, li], "climatology": clim_members.for_day(doy),
                                        "persistence": persistence_members.members(last_day, lead)}
                    for source, values in ensemble_members.items():
                        ensembles[lead][source].accumulate(values, truth, block=block)
        bar.update(len(batch))
    bar.close()
    metrics: dict[int, dict[str, dict[str, float]]] = {}
    for lead in leads:
        rows = {s: tables[lead][s].compute() for s in point_sources}
        for s in point_sources:
            for base in ("persistence", "climatology"):
                rows[s][f"skill_vs_{base}"] = skill(rows[s]["mse"], rows[base]["mse"])
        if probabilistic:
            _add_ensemble_scores(rows, {s: ensembles[lead][s].compute() for s in SOURCES}, thresholds)
        metrics[lead] = rows
    n = len(issues)
    long_names = {v: ds[v].attrs.get("long_name", "") for v in ds.data_vars}
    skill_lines = _skill_lines(metrics, ckpt.inputs_note(long_names))
    notes = ["Climatology: " + ", ".join(
        f"{how} on {count} scored day(s)" for how, count in sorted(clim_used.items())) + " (training days within "
        "that many days of the same day of year; the training mean where none lies within ±45 days)."]
    if chosen.overlaps(train_range):
        notes.append(f"The scored days overlap the training split ({train_range.start} .. {train_range.end}): "
                     "those scores are in-sample.")
    units = target_units(ds)
    notes.append(f"Units: mse in ({units})²; rmse, mae, bias{', crps' if probabilistic else ''} and the thresholds "
                 f"in {units}.")
    markdown = _markdown(metrics, chosen, n, skill_lines, notes, units)
    summary = "\n".join(skill_lines) + "\n\n" + _markdown(metrics, chosen, n, [], notes, units, categorical=False)
    diagnostics = {lead: _diagnostics(ensembles[lead]["model"]) for lead in leads} if probabilistic else {}
    files = _write_outputs(metrics, markdown, output_dir, {
        "split": split, "start": chosen.start.isoformat(), "end": chosen.end.isoformat(), "windows": n,
        "thresholds": thresholds, "units": units, "checkpoint": str(weights_path), "cube": str(store)}, diagnostics)
    if probabilistic:
        for lead in leads:
            files.append(plot_ensemble_diagnostics(
                ensembles[lead]["model"].ranks, ensembles[lead]["model"].reliability(),
                output_dir / f"ensemble_lead{lead}.png", title=f"lead {lead} d, {split} split, {n} windows"))
    for name, values in pixels.compute().items():
        label = name.upper()
        tags = {"metric": f"{label} per pixel", "lead_days": leads[0], "split": split,
                "checkpoint": location(weights_path).name}
        stem = output_dir / f"{name}_map_lead{leads[0]}"
        files.append(write_geotiff(values, grid, stem.with_suffix(".tif"), tags,
                                   description=f"{label} per pixel, lead {leads[0]} d", units="1"))
        files.append(plot_map(values, grid, stem.with_suffix(".png"),
                              title=f"{label} per pixel, lead {leads[0]} d, {split} split", label=label,
                              vmin=-1.0, vmax=1, cmap="RdYlGn"))
    return EvaluationReport(metrics, markdown, summary, files, n, diagnostics)


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


def _write_outputs(metrics: dict, markdown: str, output_dir: Path, meta: dict, diagnostics: dict) -> list[Path]:
    json_path, md_path = output_dir / "metrics.json", output_dir / "metrics.md"
    document = {"meta": meta, "leads": {str(k): v for k, v in metrics.items()}}
    if diagnostics:
        document["ensemble"] = {str(k): v for k, v in diagnostics.items()}
    for path, text in ((json_path, json.dumps(document, indent=2, allow_nan=True)), (md_path, markdown + "\n")):
        with atomic_output(path) as tmp:
            tmp.write_text(text)
    skill = plot_skill_by_lead(metrics, output_dir / "skill_by_lead.png")
    return [json_path, md_path, skill]
