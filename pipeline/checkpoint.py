"""The checkpoint: its schema, atomic save, safe load, and the model it rebuilds.

A checkpoint is a plain dict, loadable with ``torch.load(..., weights_only=True)``, so a
forecast never unpickles code. This module is the only place that knows its keys;
everything else reads it through :class:`Checkpoint` (the neuralhydrology habit: the
config travels with the weights, and predicting needs this module and the model only).

Keys
----
format, package_version
    ``"runoff-checkpoint/1"`` and the package that wrote it.
model_config, model_state
    :class:`~pipeline.model.ModelConfig` as a dict, and the weights a forecast uses (the
    moving average of the training weights where ``train_config["ema_decay"]`` > 0).
live_model_state, ema_steps
    with averaging only: the optimiser's own weights and the number of steps averaged, for
    an exact ``--resume``.
norm_stats
    ``{variable: {"mean", "std", "rms", "max"}}`` over the training split: the mean and std
    of ``log1p`` values, the root mean square and the largest of the values themselves
    (``max`` since 2026-12-04: it bounds the forecasts, see :data:`pipeline.model.CEILING_FACTOR`).
input_days, leads, variables, forcings
    the window: past days, lead days, past inputs (target first) and inputs known on
    the lead days.
maps
    ``{variable: float32 tensor (height, width)}``: static inputs the checkpoint carries
    rather than the cube (``qs_climatology`` of ``--climatology_map``); absent when none.
grid, data, splits
    the cube's grid (CRS WKT, transform, height, width), its path, and the
    ``{"train"|"val"|"test": [start, end]}`` ISO dates.
train_config, world_size
    every training setting (``TrainConfig`` as a dict) and the number of ranks.
epoch, optimizer_state, scheduler_state, best_val_loss, best_epoch, bad_epochs, history, rng_state, epoch_windows
    where training stands, for an exact ``--resume``.
calibrated_on
    a probabilistic model's ``[start, end]`` ISO dates its spread (and levels) were
    calibrated on: the validation split in ``best.pth``, the period of ``runoff calibrate``;
    absent where the quantiles are as trained (the epoch checkpoints, ``last.pth``).
calibrated_forcing_error
    beside ``calibrated_on``: the log std of the forecast error its forcings were given
    there (``--forcing_error``; 0 or absent: the forcings as the cube holds them).
calibrated_forcing_error_area
    beside it: the log std of that error's factor over each whole map
    (``--forcing_error_area``; 0 or absent: none).
point_maps
    beside ``calibrated_on``: per lead, the single map that stands for a probabilistic
    model's distribution, ``"mean"`` or ``"median"`` of its quantiles, chosen on those days
    (:func:`~pipeline.calibration.choose_point_maps`: since 2026-12-07 one choice for all
    leads, before it one per lead); absent: the mean at every lead.

Example
-------
>>> ckpt = read_checkpoint("checkpoints/best.pth")        # doctest: +SKIP
>>> model = ckpt.build_model().eval()                       # doctest: +SKIP
>>> ckpt.leads, ckpt.variables, ckpt.grid.describe()        # doctest: +SKIP
"""

from __future__ import annotations

import datetime as dt
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from . import __version__
from .cube import SEASON_INPUTS, TARGET, Split
from .errors import RunoffError, first_line
from .model import ConvLSTMForecaster
from .rasters import Grid
from .storage import atomic_output, location

CHECKPOINT_FORMAT = "runoff-checkpoint/1"
POINT_MAPS = ("mean", "median")  # what a probabilistic model's single map can be, per lead


def grid_record(grid: Grid) -> dict:
    """A grid as the checkpoint stores it."""
    return {"crs_wkt": grid.crs_wkt, "transform": list(grid.transform), "height": grid.height, "width": grid.width}


def splits_record(splits: dict[str, Split]) -> dict[str, list[str]]:
    """Date splits as the checkpoint stores them."""
    return {name: [s.start.isoformat(), s.end.isoformat()] for name, s in splits.items()}


def run_record(*, model: ConvLSTMForecaster, norm_stats: dict, input_days: int, leads: list[int],
               variables: list[str], forcings: list[str], grid: Grid, data: str, splits: dict[str, Split],
               train_config: dict, world_size: int, maps: dict[str, np.ndarray] | None = None) -> dict:
    """The part of a checkpoint fixed for a whole run (what a forecast needs, and the settings)."""
    record = {"format": CHECKPOINT_FORMAT, "package_version": __version__,
              "model_config": model.config.to_dict(), "norm_stats": norm_stats,
              "input_days": int(input_days), "leads": list(leads), "variables": list(variables),
              "forcings": list(forcings), "grid": grid_record(grid), "data": str(data),
              "splits": splits_record(splits), "train_config": train_config, "world_size": int(world_size)}
    if maps:
        record["maps"] = {name: torch.from_numpy(np.ascontiguousarray(values, np.float32))
                          for name, values in maps.items()}
    return record


def with_calibration(state: dict, model: ConvLSTMForecaster, calibrated_on: Sequence[str], forcing_error: float,
                     forcing_error_area: float, point_maps: Sequence[str]) -> dict:
    """``state`` with the calibrated ``model``'s config and weights (on the CPU) in place of its
    own, and the record of that calibration: the days (``calibrated_on``, first and last),
    the forecast error the forcings were given there, and the single map per lead it chose."""
    return {**state, "model_config": model.config.to_dict(),
            "model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "calibrated_on": list(calibrated_on), "calibrated_forcing_error": forcing_error,
            "calibrated_forcing_error_area": forcing_error_area, "point_maps": list(point_maps)}


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint, read through typed properties (``state`` is the raw dict)."""

    state: dict

    @property
    def input_days(self) -> int:
        return int(self.state["input_days"])

    @property
    def leads(self) -> list[int]:
        return [int(lead) for lead in self.state["leads"]]

    @property
    def variables(self) -> list[str]:
        """Past-day inputs, the target first."""
        return list(self.state["variables"])

    @property
    def forcings(self) -> list[str]:
        """Inputs taken on the lead days (checkpoints from before forcings have none)."""
        return list(self.state.get("forcings", []))

    @property
    def maps(self) -> dict[str, np.ndarray]:
        """Static inputs carried by the checkpoint, ``(height, width)`` float32 by name."""
        return {name: values.numpy() for name, values in self.state.get("maps", {}).items()}

    @property
    def quantiles(self) -> int:
        """Quantiles per pixel and lead of a probabilistic model; 0 for a deterministic one."""
        return int(self.state.get("model_config", {}).get("quantiles", 0))

    @property
    def point_maps(self) -> list[str]:
        """Per lead, a probabilistic model's single map: ``"mean"`` or ``"median"`` of its
        quantiles, as calibrated (the mean at every lead where none was chosen)."""
        return list(self.state.get("point_maps", [POINT_MAPS[0]] * len(self.leads)))

    @property
    def norm_stats(self) -> dict[str, dict[str, float]]:
        return self.state["norm_stats"]

    @property
    def grid(self) -> Grid:
        g = self.state["grid"]
        return Grid(g["crs_wkt"], tuple(g["transform"]), g["height"], g["width"])

    @property
    def splits(self) -> dict[str, Split]:
        """The train / val / test date ranges the model was trained with."""
        return {name: Split(name, *(dt.date.fromisoformat(d) for d in ends))
                for name, ends in self.state["splits"].items()}

    def inputs_note(self, long_names: dict[str, str] | None = None, sources: dict[str, str] | None = None) -> str:
        """The model's inputs in words, printed beside every skill figure. A forcing whose
        ``long_names`` entry (the cube's ``long_name``) does not call it a forecast is taken
        as observed: in a hindcast it stands in for the forecast, a perfect one. One read
        from another variable (``sources``, ``--forcings rainf=rainf_fc``) is named so."""
        covariates = [v for v in self.variables if v != TARGET]
        parts = [f"inputs: {TARGET} on {self.input_days} past days"]
        if covariates:
            parts.append(f"covariates: {', '.join(covariates)}")
        for name in self.forcings:
            forecast = "forecast" in (long_names or {}).get(name, "").lower()
            source = (sources or {}).get(name)
            told = ", a forecast (its long_name says so)" if forecast else ""
            parts.append(f"forcings: {name} read from {source} (--forcings){told}" if source else
                         f"forcings: {name}{told or ', observed values used as a perfect forecast'}")
        return "; ".join(parts)

    def check_grid(self, grid: Grid, checkpoint: str, data: str) -> None:
        """One clear error when ``data`` (an option and its value) is not on the trained grid."""
        trained = self.grid
        if not trained.matches(grid):
            raise RunoffError(f"{checkpoint}: trained on grid {trained.describe()}, but {data} is on {grid.describe()}")

    def check_variables(self, names: Sequence[str], data: str) -> None:
        """One clear error when the cube ``data`` (an option and its value), holding the
        variables ``names``, lacks an input or a forcing of the model."""
        present = set(names) | set(self.state.get("maps", {})) | set(SEASON_INPUTS)
        lacking = [v for v in [*self.variables, *self.forcings] if v not in present]
        if lacking:
            raise RunoffError(f"{data}: the model needs variable(s) {', '.join(lacking)}, which the cube lacks "
                              f"(it has {', '.join(names)})")

    def check_combinable(self, other: "Checkpoint", mine: str, theirs: str) -> None:
        """One clear error unless ``other`` forecasts the same leads from the same inputs,
        grid and split days as this checkpoint, with the same normalisation, so that their
        forecasts can be combined (``mine`` and ``theirs``: the two paths). The networks
        themselves may differ (another seed, other hidden channels)."""
        differences = [what for what, a, b in (
            ("kind (deterministic or probabilistic)", bool(self.quantiles), bool(other.quantiles)),
            ("inputs", self.variables, other.variables), ("forcings", self.forcings, other.forcings),
            ("input days", self.input_days, other.input_days), ("leads", self.leads, other.leads),
            ("split days", self.splits, other.splits),
            ("normalisation", _stats_values(self.norm_stats), _stats_values(other.norm_stats))) if a != b]
        if not self.grid.matches(other.grid):
            differences.append("grid")
        if differences:
            raise RunoffError(f"--weights_path {theirs}: differs from {mine} in its {', '.join(differences)}; "
                              "checkpoints forecast together must share them (train them alike, e.g. with "
                              "another --seed)")

    def build_model(self) -> ConvLSTMForecaster:
        """The model with its trained weights (on the CPU, in training mode)."""
        return build_model(self.state)

    def describe(self, path: str) -> str:
        """A human summary, as ``runoff info`` prints it: the model, its inputs, grid and
        days, how far training went, and how a probabilistic model's spread was calibrated."""
        config, settings = self.state["model_config"], self.state.get("train_config", {})
        hidden = config["hidden_channels"]
        model = (f"ConvLSTM, {len(hidden)} layer(s) of {', '.join(map(str, hidden))} hidden channels, "
                 f"{config['kernel_size']}x{config['kernel_size']} kernels")
        if self.quantiles:
            model += f"; probabilistic, {self.quantiles} quantiles per pixel and lead"
        splits = ", ".join(f"{s.name} {s.start}..{s.end}" for s in self.splits.values())
        lines = [f"checkpoint  {path} ({self.state['format']}, written by runoff-forecast "
                 f"{self.state.get('package_version', '?')})",
                 f"model       {model}",
                 f"inputs      {self.inputs_note().removeprefix('inputs: ')}",
                 f"leads       {', '.join(map(str, self.leads))} day(s)",
                 f"grid        {self.grid.describe()}",
                 f"trained on  {self.state['data']}: {splits}"]
        if "epoch" in self.state:
            best = self.state.get("best_epoch")
            lines.append(f"training    epoch {self.state['epoch']} of {settings.get('epochs', '?')}"
                         + (f"; best epoch {best} (validation loss {self.state['best_val_loss']:.4g})"
                            if best else "")
                         + (f"; weights averaged (decay {settings['ema_decay']:g})"
                            if settings.get("ema_decay") else "")
                         + ("; forcings times a forecast error" + error_text(settings.get("forcing_error", 0.0),
                                                                             settings.get("forcing_error_area", 0.0),
                                                                             how="")
                            if settings.get("forcing_error") or settings.get("forcing_error_area") else ""))
        scale = self.state["model_state"].get("spread_scale")  # absent before the spread was calibrated
        if self.quantiles and scale is not None:
            scale = scale.tolist()
            days = self.state.get("calibrated_on")
            if days:
                how = f"calibrated on {days[0]}..{days[1]}"
                how += error_text(self.state.get("calibrated_forcing_error", 0.0),
                                  self.state.get("calibrated_forcing_error_area", 0.0))
            else:  # best.pth before 2026-12-05 was calibrated on the validation split without saying so
                how = "as trained" if all(f == 1 for f in scale) else "calibrated on the validation split"
            lines.append(f"spread      {spread_text(dict(zip(self.leads, scale)))} ({how}"
                         + ("; levels per flow class too" if config.get("level_calibration") else "") + ")")
            lower = self.state["model_state"].get("lower_spread")  # absent before 2026-12-07
            if lower is not None:
                lines.append(f"lower side  {spread_text(dict(zip(self.leads, lower.tolist())))} (the quantiles "
                             "below the centre, " + ("widened on the training days)" if days else "as trained)"))
            moved = self.state["model_state"].get("mean_at_centre")  # absent before 2026-12-07 (49th session)
            if moved is not None and bool(moved.any()):  # --calibrate_location moved some lead
                leads = location_text(dict(zip(self.leads, moved.tolist())))
                lines.append(f"location    moved to the centre's mean {leads} (chosen on the calibration days)")
            lines.append(f"single map  {point_maps_text(dict(zip(self.leads, self.point_maps)))} (of the quantiles; "
                         + ("chosen on the calibration days)" if "point_maps" in self.state else "none chosen)"))
        return "\n".join(lines)


def _stats_values(stats: dict[str, dict[str, float]]) -> dict[str, dict[str, float | None]]:
    """Normalisation statistics as comparable values (None for NaN, which equals nothing)."""
    return {name: {key: None if np.isnan(value) else float(value) for key, value in values.items()}
            for name, values in stats.items()}


def spread_text(factors: dict[int, float]) -> str:
    """The spread factor per lead as the logs print it.

    >>> spread_text({1: 0.8, 6: 1.1})
    'lead 1 x0.80, lead 6 x1.10'
    """
    return ", ".join(f"lead {lead} x{factor:.2f}" for lead, factor in factors.items())


def location_text(moved: dict[int, float]) -> str:
    """The leads at which a located model's quantiles are moved to its centre's mean
    (``mean_at_centre``), as the logs print them.

    >>> location_text({1: 1.0, 2: 0.0, 3: 1.0}), location_text({1: 0.0, 2: 0.0})
    ('at leads 1, 3', 'at no lead')
    """
    leads = [str(lead) for lead, flag in moved.items() if flag]
    return f"at lead{'s' if len(leads) > 1 else ''} {', '.join(leads)}" if leads else "at no lead"


def point_maps_text(maps: dict[int, str]) -> str:
    """The single map per lead as the logs print it: once where it is the same at every lead.

    >>> point_maps_text({1: "median", 2: "median", 3: "median"})
    'the median at every lead'
    >>> point_maps_text({1: "mean", 2: "median", 3: "median"})
    'lead 1 mean, lead 2 median, lead 3 median'
    """
    if len(set(maps.values())) == 1:
        return f"the {next(iter(maps.values()))} at every lead"
    return ", ".join(f"lead {lead} {point}" for lead, point in maps.items())


def error_text(sigma: float, area_sigma: float = 0.0, how: str = " with the forcings' forecast error") -> str:
    """How the logs say that a spread was calibrated with a forecast error on the forcings
    (``--forcing_error``, ``--forcing_error_area``): nothing for none.

    >>> error_text(0.5), error_text(0.0)
    (" with the forcings' forecast error (log std 0.5)", '')
    >>> error_text(0.3, 0.4)
    " with the forcings' forecast error (log std 0.3; log std 0.4 over the whole map)"
    """
    parts = ([f"log std {sigma:g}"] if sigma else []) + (
        [f"log std {area_sigma:g} over the whole map"] if area_sigma else [])
    return f"{how} ({'; '.join(parts)})" if parts else ""


def build_model(state_or_config: dict) -> ConvLSTMForecaster:
    """The model of a checkpoint dict (weights loaded) or of a model-config dict (fresh)."""
    if "model_config" in state_or_config:
        model = ConvLSTMForecaster.from_config(state_or_config["model_config"])
        model.load_state_dict(state_or_config["model_state"])
        return model
    return ConvLSTMForecaster.from_config(state_or_config)


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """``torch.save`` to a temporary file, then rename: a kill never leaves half a checkpoint."""
    with atomic_output(path) as tmp:
        torch.save(state, tmp)
    return location(path)


def load_checkpoint(path: str | Path, option: str = "--weights_path", storage_options: dict | None = None) -> dict:
    """The checkpoint dict at ``path`` (a path or URL), loaded with ``weights_only=True``;
    one clear error for anything that is not a runoff checkpoint."""
    path = location(path, storage_options)
    if not path.is_file():
        raise RunoffError(f"{option} {path}: no such file")
    try:
        with path.open("rb") as f:
            state = torch.load(f, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise RunoffError(f"{option} {path}: not a readable PyTorch checkpoint ({first_line(exc)[:120]})") from None
    except Exception as exc:  # the unpickler's own errors vary by torch version
        raise RunoffError(f"{option} {path}: not a runoff checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise RunoffError(f"{option} {path}: a PyTorch file, but not a runoff checkpoint")
    maps = state.get("point_maps")
    if maps is not None and (not isinstance(maps, list) or len(maps) != len(state.get("leads", []))
                             or any(point not in POINT_MAPS for point in maps)):
        raise RunoffError(f"{option} {path}: its point_maps {maps!r} must name, per lead, one of "
                          f"{' or '.join(POINT_MAPS)}")
    return state


def read_checkpoint(path: str | Path, option: str = "--weights_path",
                    storage_options: dict | None = None) -> Checkpoint:
    """:func:`load_checkpoint`, read through :class:`Checkpoint`."""
    return Checkpoint(load_checkpoint(path, option, storage_options))
