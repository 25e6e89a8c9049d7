"""``runoff evaluate``: the model against persistence and climatology, per lead time.

All three forecast the same windows (those whose target days lie in the split), on
valid pixels only. Writes ``metrics.json``, ``metrics.md`` (one table per lead),
``skill_by_lead.png`` and the per-pixel NSE and KGE maps of the first lead as a GeoTIFF (on
the cube's grid) and a PNG.

Example
-------
>>> report = evaluate("checkpoints/best.pth", "stores/qs.zarr", split="test")   # doctest: +SKIP
>>> print(report.markdown)                                                       # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cube import TARGET, Split, cube_dates, cube_grid, denormalise, open_cube
from .errors import RunoffError
from .export import atomic_output, location, write_geotiff
from .ingest import ensure_cube
from .plots import plot_map, plot_skill_by_lead
from .predict import forecast_window, window_inputs
from .sampler import WindowSpec, window_issues
from .train import (build_model, check_checkpoint_grid, check_writable, checkpoint_splits, load_checkpoint,
                    pick_device)
from .verify import SOURCES, climatology, kge_map, nse_map, score_table, wet_thresholds


@dataclass
class EvaluationReport:
    """Scores per lead and source, and the files written."""

    metrics: dict[int, dict[str, dict[str, float]]]
    markdown: str  # the whole of metrics.md
    summary: str  # the continuous scores only, for the terminal
    files: list[Path]
    windows: int


_MAIN_COLUMNS = ("mse", "rmse", "mae", "bias", "nse", "kge", "skill_vs_persistence", "skill_vs_climatology")


def _table(rows: dict[str, dict[str, float]], columns: list[str]) -> list[str]:
    lines = ["| source | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for source, row in rows.items():
        lines.append(f"| {source} | " + " | ".join(f"{row.get(c, float('nan')):.4g}" for c in columns) + " |")
    return lines


def _markdown(metrics: dict[int, dict[str, dict[str, float]]], split: Split, windows: int,
              categorical: bool = True) -> str:
    """One table per lead (continuous scores and skill); with ``categorical`` a second
    table per lead of CSI/POD/FAR and FSS at each threshold."""
    lines = [f"# Evaluation on the {split.name} split ({split.start} .. {split.end}), {windows} windows", ""]
    for lead, rows in metrics.items():
        lines += [f"## Lead {lead} day(s)", ""] + _table(rows, list(_MAIN_COLUMNS)) + [""]
        if categorical:
            extra = [k for k in rows["model"] if k not in _MAIN_COLUMNS]
            lines += [f"Events at thresholds (kg m-2), lead {lead}:", ""] + _table(rows, extra) + [""]
    lines.append("skill = 1 - MSE_model / MSE_baseline. Scores on valid pixels only.")
    return "\n".join(lines)


def evaluate(weights_path: str | Path, data_dir: str | Path, split: str = "test",
             output_dir: str | Path = "outputs/evaluation", thresholds: list[float] | None = None,
             device: str = "auto", storage_options: dict | None = None, progress: bool = False) -> EvaluationReport:
    """Score the checkpoint on ``split`` (train, val, test or all) of ``data_dir``."""
    state = load_checkpoint(weights_path, storage_options=storage_options)
    output_dir = location(output_dir, storage_options)
    check_writable(output_dir, "--output_dir")
    store = ensure_cube(data_dir, storage_options=storage_options, progress=progress)
    ds = open_cube(store, storage_options)
    grid = cube_grid(ds)
    check_checkpoint_grid(state, grid, f"--weights_path {weights_path}", f"--data_dir {data_dir}")
    dates = cube_dates(ds)
    ranges = checkpoint_splits(state)
    ranges["all"] = Split("all", dates[0], dates[-1])
    if split not in ranges:
        raise RunoffError(f"--split {split!r}: choose train, val, test or all")
    chosen = ranges[split]
    spec = WindowSpec(int(state["input_days"]), tuple(state["leads"]), tuple(state["variables"]))
    issues = window_issues(ds, chosen, spec)
    if issues.size == 0:
        raise RunoffError(f"--split {split}: no complete window with targets in {chosen.start}..{chosen.end} "
                          f"in {store} ({dates[0]}..{dates[-1]})")
    train_range = ranges["train"]
    clim, clim_ok = climatology(ds, train_range.start, train_range.end)
    thresholds = thresholds or wet_thresholds(ds, train_range.start, train_range.end)

    dev = pick_device(device)
    model = build_model(state).to(dev)
    stats = state["norm_stats"]
    leads = list(spec.leads)
    n, (h, w) = len(issues), grid.shape
    stacks = {s: np.full((len(leads), n, h, w), np.nan, np.float32) for s in SOURCES}
    truth = np.full((len(leads), n, h, w), np.nan, np.float32)
    qs = ds[TARGET]
    from tqdm import tqdm

    for k, t in enumerate(tqdm(issues, desc="evaluate", unit="window", disable=not progress)):
        window = window_inputs(ds, list(spec.variables), stats, int(t), spec.input_days)
        pred = denormalise(forecast_window(model, np.nan_to_num(window, nan=0.0), dev), stats[TARGET])
        last_day = np.asarray(qs.data[int(t)])
        for li, lead in enumerate(leads):
            valid = dates[int(t) + lead]
            truth[li, k] = np.asarray(qs.data[int(t) + lead])
            stacks["model"][li, k] = pred[li]
            stacks["persistence"][li, k] = last_day
            doy = valid.timetuple().tm_yday - 1
            stacks["climatology"][li, k] = clim[doy] if clim_ok[doy] else np.nan
    metrics: dict[int, dict[str, dict[str, float]]] = {}
    for li, lead in enumerate(leads):
        rows = {s: score_table(stacks[s][li], truth[li], thresholds) for s in SOURCES}
        for s in SOURCES:
            for base in ("persistence", "climatology"):
                base_mse = rows[base]["mse"]
                rows[s][f"skill_vs_{base}"] = 1 - rows[s]["mse"] / base_mse if base_mse > 0 else float("nan")
        metrics[lead] = rows
    markdown = _markdown(metrics, chosen, n)
    summary = _markdown(metrics, chosen, n, categorical=False)
    files = _write_outputs(metrics, markdown, output_dir, {
        "split": split, "start": chosen.start.isoformat(), "end": chosen.end.isoformat(), "windows": n,
        "thresholds": thresholds, "checkpoint": str(weights_path), "cube": str(store)})
    for name, score_map, vmin in (("nse", nse_map, -1.0), ("kge", kge_map, -1.0)):
        values = score_map(stacks["model"][0], truth[0])
        label = name.upper()
        tags = {"metric": f"{label} per pixel", "lead_days": leads[0], "split": split,
                "checkpoint": location(weights_path).name}
        stem = output_dir / f"{name}_map_lead{leads[0]}"
        files.append(write_geotiff(values, grid, stem.with_suffix(".tif"), tags,
                                   description=f"{label} per pixel, lead {leads[0]} d", units="1"))
        files.append(plot_map(values, grid, stem.with_suffix(".png"),
                              title=f"{label} per pixel, lead {leads[0]} d, {split} split", label=label,
                              vmin=vmin, vmax=1, cmap="RdYlGn"))
    return EvaluationReport(metrics, markdown, summary, files, n)


def _write_outputs(metrics: dict, markdown: str, output_dir: Path, meta: dict) -> list[Path]:
    json_path, md_path = output_dir / "metrics.json", output_dir / "metrics.md"
    for path, text in ((json_path, json.dumps({"meta": meta, "leads": {str(k): v for k, v in metrics.items()}},
                                               indent=2, allow_nan=True)), (md_path, markdown + "\n")):
        with atomic_output(path) as tmp:
            tmp.write_text(text)
    skill = plot_skill_by_lead(metrics, output_dir / "skill_by_lead.png")
    return [json_path, md_path, skill]
