"""What the benchmark scripts share: a measured row, one table of rows, a synthetic cube and its sampler."""

from __future__ import annotations

import argparse
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.baselines import wet_thresholds
from pipeline.cli import name_list
from pipeline.cube import SEASON_INPUTS, TARGET, cube_dates, make_splits, normalisation_stats, open_cube
from pipeline.errors import RunoffError
from pipeline.evaluate import BAND_BLOCK_DAYS
from pipeline.inference import Forecaster, read_checkpoints, read_days, split_windows
from pipeline.ingest import ingest
from pipeline.sampler import WindowSampler, WindowSpec, window_issues
from pipeline.synth import write_series
from pipeline.train import TrainConfig
from pipeline.verify import CHANCE_DRAWS, ChanceReliability, EnsembleScores, reliability_gap


@dataclass
class Row:
    """One measured comparison: ``measured`` is the figure (often a ratio), ``target`` the goal."""

    what: str
    measured: str
    target: str = ""
    met: bool | None = None  # None: a figure with no target


def table(rows: list[Row]) -> str:
    """The rows as one markdown table."""
    lines = ["| measurement | measured | target | met |", "|---|---:|---:|:---:|"]
    for r in rows:
        met = "" if r.met is None else ("yes" if r.met else "NO")
        lines.append(f"| {r.what} | {r.measured} | {r.target} | {met} |")
    return "\n".join(lines)


def machine() -> str:
    """One line naming the machine the figures come from."""
    import os

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA GPU"
    return (f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"torch {torch.__version__}, {gpu}")


def synthetic_cube(folder: Path, days: int, height: int, width: int) -> str:
    """Write ``days`` synthetic daily GeoTIFFs under ``folder/in`` and ingest them into
    ``folder/qs.zarr``; returns the store."""
    write_series(folder / "in", days=days, height=height, width=width)
    store = str(folder / "qs.zarr")
    ingest(folder / "in", store)
    return store


def training_sampler(store: str, patch: int) -> WindowSampler:
    """A fresh, shuffling sampler of the default training split's windows (6 days, lead 1),
    normalised with that split's statistics, as `runoff train` makes it."""
    ds = open_cube(store)
    dates = cube_dates(ds)
    split = make_splits(dates[0], dates[-1])["train"]
    spec = WindowSpec(6, (1,))
    return WindowSampler(store, window_issues(ds, split, spec), spec, normalisation_stats(ds, ["qs"], split),
                         patch=patch, shuffle=True)


def cube_parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser with the synthetic cube's size: ``--days``, ``--height``, ``--width``
    (365 days of the 224x464 demo grid)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--days", type=int, default=365)
    p.add_argument("--height", type=int, default=224)
    p.add_argument("--width", type=int, default=464)
    return p


def synthetic_regime_cube(folder: Path, days: int, height: int, width: int, seed: int = 0,
                          regime: str = "river") -> str:
    """A synthetic cube of ``regime`` (river or cells) with its rain, a noisy rain forecast
    and the soil store (``rainf``, ``rainf_fc``, ``soilm``) at ``folder/qs.zarr``, as
    `runoff synth --regime` writes it; the river regime also has its static map ``upstream_area``."""
    static = ["upstream_area"] if regime == "river" else []
    write_series(folder / "in", days=days, height=height, width=width, seed=seed, regime=regime,
                 covariates=["rainf", "rainf_fc", "soilm", *static])
    store = str(folder / "qs.zarr")
    ingest(folder / "in", store)
    return store


def skill_cube(args: argparse.Namespace, folder: Path) -> tuple[str, str]:
    """The cube a skill benchmark measures on (``--cube``, or a synthetic one of ``--regime``
    written under ``folder``) and the words naming it in the table's heading."""
    if args.cube:
        return args.cube, args.cube
    store = synthetic_regime_cube(folder, args.days, args.height, args.width, args.seed, args.regime)
    return store, f"synthetic {args.regime} regime {args.days} d {args.height}x{args.width}"


def skill_parser(doc: str | None) -> argparse.ArgumentParser:
    """The options the skill benchmarks share: the cube (a real one, or a synthetic regime
    and its size), its rain, the leads, the model's size, the training length and patch, the
    splits, the seed."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cube", help="a cube to measure on (default: a synthetic cube of --regime)")
    p.add_argument("--regime", default="river", choices=("river", "cells"), help="the synthetic regime")
    p.add_argument("--rain", default="rainf", help="the cube's rain variable")
    p.add_argument("--covariates", default=[], type=name_list,
                   help="cube variables read on the past days beside the target, comma-separated "
                   "(the synthetic cube has soilm; the river regime's also the static map upstream_area)")
    p.add_argument("--season", action="store_true", help="the day of year as an input, as runoff train --season")
    p.add_argument("--climatology_map", action="store_true",
                   help="also read each pixel's training mean of log1p(qs), as runoff train --climatology_map")
    p.add_argument("--days", type=int, default=730)
    p.add_argument("--height", type=int, default=48)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--leads", default="1-6", help="1-6 or 1,2,6")
    p.add_argument("--hidden_channels", type=int, default=16, help="hidden channels per ConvLSTM layer")
    p.add_argument("--num_layers", type=int, default=1, help="ConvLSTM layers")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--patience", type=int, default=6)
    p.add_argument("--patch", type=int, default=64)
    p.add_argument("--train_end")
    p.add_argument("--val_end")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ema_decay", type=float, default=TrainConfig.ema_decay,
                   help="the weights' moving average, as runoff train --ema_decay (0: the last step's weights)")
    return p


def skill_train_config(args: argparse.Namespace, cube: str, leads: list[int], folder: Path,
                       **settings) -> TrainConfig:
    """The training run that the options of :func:`skill_parser` describe, writing its
    checkpoints and outputs under ``folder``; ``settings`` are the benchmark's own."""
    return TrainConfig(data_dir=cube, epochs=args.epochs, patience=args.patience, leads=leads,
                       hidden_channels=[args.hidden_channels] * args.num_layers, patch=args.patch,
                       train_end=args.train_end, val_end=args.val_end, seed=args.seed, ema_decay=args.ema_decay,
                       covariates=args.covariates, climatology_map=args.climatology_map, season=args.season,
                       checkpoint_dir=str(folder / "ckpt"), output_dir=str(folder / "out"), **settings)


def covariates_note(args: argparse.Namespace) -> str:
    """The words a skill table's heading gives ``--covariates``, ``--climatology_map`` and
    ``--season``: none when there are none."""
    names = [*args.covariates, *(["qs_climatology (the training days' map)"] if args.climatology_map else []),
             *([f"{','.join(SEASON_INPUTS)} (the day of year)"] if args.season else [])]
    return f"; covariates (past days): {','.join(names)}" if names else ""


def reliability_by_chance(weights_paths: list[str], data_dir: str, split: str = "test",
                          forcings_from: dict[str, str] | None = None, draws: int = CHANCE_DRAWS,
                          block_days: int = BAND_BLOCK_DAYS) -> dict[int, tuple[float, np.ndarray]]:
    """Per lead, the widest reliability gap of the probabilistic checkpoints ``weights_paths``
    (forecasting together) on ``split`` of ``data_dir``, over the thresholds `runoff evaluate`
    uses by default, and the widest gaps (draws,) that forecasts with the same members,
    calibrated by construction (:class:`~pipeline.verify.ChanceReliability`, the truth's
    pattern kept over the maps of ``block_days`` consecutive valid days), show there by chance."""
    paths, checkpoints = read_checkpoints(weights_paths)
    ckpt = checkpoints[0]
    windows = split_windows(ckpt, data_dir, split, paths[0], forcings_from=forcings_from)
    train_range = ckpt.splits["train"]
    thresholds = wet_thresholds(windows.ds, train_range.start, train_range.end)
    forecaster = Forecaster.load(checkpoints, "auto")
    if not forecaster.probabilistic:
        raise RunoffError(f"--weights_path {paths[0]}: a deterministic checkpoint, without a reliability diagram")
    leads = list(ckpt.leads)
    model = {lead: EnsembleScores(thresholds) for lead in leads}
    chance = {lead: ChanceReliability(thresholds, draws=draws) for lead in leads}
    for issues, out in forecaster.forecasts(windows.ds, windows.issues, members=True):
        days = read_days(windows.ds, TARGET, issues[0], issues[-1] + max(leads))
        for k, t in enumerate(issues):
            for i, lead in enumerate(leads):
                truth = days[t - issues[0] + lead]
                model[lead].accumulate(out[k, i], truth)
                chance[lead].accumulate(out[k, i], truth, block=(t + lead) // block_days)
    return {lead: (max(reliability_gap(table) for table in model[lead].reliability().values()),
                   np.max(list(chance[lead].compute().values()), axis=0)) for lead in leads}
