"""Train a ConvLSTM on a cube: the loop alone. Masked MSE, AdamW, ReduceLROnPlateau, early
stopping, gradient clipping, mixed precision on accelerators, a checkpoint per epoch and
exact resume; under ``torchrun`` each rank trains a DistributedDataParallel replica on its
own share of the windows.

What the loop stands on lives below it: the windows (:mod:`pipeline.sampler`), the device
and precision (:mod:`pipeline.device`), the ranks (:mod:`pipeline.distributed`), the
checkpoint's schema (:mod:`pipeline.checkpoint`) and, for a probabilistic model, the
calibration of its best weights (:mod:`pipeline.calibration`).

Example
-------
>>> result = train(TrainConfig(data_dir="stores/qs.zarr", epochs=5))     # doctest: +SKIP
>>> result.best_checkpoint                                                # doctest: +SKIP
PosixPath('checkpoints/best.pth')
"""

from __future__ import annotations

import contextlib
import csv
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader

from .baselines import wet_thresholds
from .calibration import CALIBRATIONS, calibrate_model, fit_lower_spread, model_outputs
from .checkpoint import (Checkpoint, error_text, load_checkpoint, location_text, point_maps_text, run_record,
                         save_checkpoint, spread_text, with_calibration)
from .cube import (CLIMATOLOGY_MAP, SEASON_INPUTS, TARGET, climatology_map, cube_dates, cube_grid, evenly_spaced,
                   is_static, make_splits, open_cube, target_units)
from .device import (accumulator_dtype, autocast_for, grad_scaler, keep_freed_memory, loader_batches,
                     queue_marker)
from .distributed import Ranks, data_parallel
from .errors import RunoffError, RunoffWarning
from .forcing_error import check_forcing_errors, window_errors
from .ingest import ensure_cube
from .model import QUANTILES, ConvLSTMForecaster, pinball, signed_log1p, to_physical
from .plots import plot_loss_curves
from .sampler import WindowSampler, WindowSpec, check_windows, collate_windows, data_loader, window_issues
from .storage import atomic_output, check_writable, location
from .verify import skill

# Settings that fix the model's shape or its data: a resumed run must not change them.
_FROZEN_ON_RESUME = ("hidden_channels", "kernel_size", "num_layers", "input_days", "leads", "covariates",
                     "forcings", "predict_delta", "linear_response", "probabilistic", "quantile_location",
                     "climatology_map", "season")

# Training years below which --season warns: with fewer the day of year names a few storms, not a season.
SEASON_YEARS = 3

# What a checkpoint older than a setting did, where that differs from the setting's default.
_BEFORE_THE_SETTING = {"linear_response": False, "ema_decay": 0.0, "quantile_location": False}


@dataclass
class TrainConfig:
    """Every setting of a training run; saved in each checkpoint."""

    data_dir: str = "stores/qs.zarr"
    epochs: int = 50
    batch_size: int = 8
    hidden_channels: list[int] = field(default_factory=lambda: [16])
    kernel_size: int = 3
    num_layers: int = 1
    input_days: int = 6
    leads: list[int] = field(default_factory=lambda: [1])
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 8
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    checkpoint_dir: str = "checkpoints"
    output_dir: str = "outputs"
    resume: str | None = None
    patch: int = 64
    train_end: str | None = None
    val_end: str | None = None
    covariates: list[str] = field(default_factory=list)  # past days only
    climatology_map: bool = False  # also each pixel's training mean of log1p(qs), carried by the checkpoint
    season: bool = False  # also where each past day lies in the year (cube.SEASON_INPUTS, from the dates)
    forcings: list[str] = field(default_factory=list)  # on the lead days: known ahead (a rain forecast)
    # training only: the forcings times a smooth log-normal error of this log std (a forecast's error; 0: none)
    forcing_error: float = 0.0
    forcing_error_area: float = 0.0  # and times one log-normal factor per map of this log std (a storm's total)
    predict_delta: bool = True  # forecast the change from the last day: untrained = persistence
    linear_response: bool = True  # that change linear in physical units, with gains set per pixel (needs predict_delta)
    probabilistic: bool = False  # QUANTILES quantiles per pixel and lead, trained by the pinball loss
    # probabilistic: a centre trained by the MSE, the quantiles placed off it (None: yes when probabilistic)
    quantile_location: bool | None = None
    calibration: str = "spread_skill"  # probabilistic: how calibrate_spread picks its factor (CALIBRATIONS)
    calibrate_levels: bool = False  # probabilistic: also calibrate_levels on the validation split
    calibrate_location: bool = False  # located: also choose_locations on the validation split
    quantile_log_weight: float = 0.0  # probabilistic: weight of the log values' pinball loss beside the physical
    clip_grad: float = 1.0
    ema_decay: float = 0.99  # forecasts use the weights' moving average over the steps, this decay per step (0: none)
    precision: str = "auto"  # auto (bf16 on CUDA where supported), fp32, bf16, fp16
    max_train_windows: int | None = None
    max_val_windows: int | None = None  # validation windows each epoch, evenly spaced (None: all)
    storage_options: dict | None = None

    def __post_init__(self) -> None:
        if self.quantile_location is None:  # located by default: the targets it meets (docs/skill.md)
            self.quantile_location = self.probabilistic


@dataclass
class TrainResult:
    """What a finished run produced."""

    epochs_run: int
    best_epoch: int
    best_val_loss: float
    best_checkpoint: Path
    last_checkpoint: Path
    history: list[dict]


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the valid pixels only (sea and nodata do not count)."""
    mask = mask.to(pred.dtype)
    return ((pred - target) ** 2 * mask).sum() / mask.sum().clamp(min=1.0)


def loss_scale(stats: dict[str, float]) -> float:
    """The mean square of the training values, which the physical-unit losses are divided by
    so that they are of order one whatever the units (older checkpoints lack it: 1)."""
    return float(stats.get("rms", 1.0)) ** 2


def physical_loss(stats: dict[str, float]) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training objective: masked MSE in physical units (the score users read), divided
    by :func:`loss_scale`."""
    scale = loss_scale(stats)

    def loss(pred: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_mse(to_physical(pred, stats), to_physical(y, stats), mask) / scale

    return loss


def quantile_loss(stats: dict[str, float], log_weight: float = 0.0
                  ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The probabilistic objective: masked pinball loss in physical units, divided by the
    training values' root mean square (the pinball loss is in data units, not squared),
    plus ``log_weight`` times the pinball loss of the log values (``log1p``, over the
    training std of ``log1p``).

    Both terms are minimised by the same quantiles (a pinball loss of ``g(q) - g(y)``, for
    any increasing ``g``, is), so their sum is too; they weigh the pixels differently. In
    physical units the largest flows decide the fit; the log term weighs each pixel by its
    relative error, so the middling flows, where exceedance of the wet p90 is decided,
    count as well (docs/skill.md, "The pinball loss of the log values")."""
    scale = loss_scale(stats) ** 0.5

    def logged(values: torch.Tensor) -> torch.Tensor:
        # data units -> log1p over its training std; signed: a quantile below 0 (clipped at
        # inference) keeps a bounded, sloped loss
        return signed_log1p(values) / stats["std"]

    def loss(pred: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.to(pred.dtype)
        pred, y = to_physical(pred, stats), to_physical(y, stats)  # once, for both terms
        per_pixel = pinball(pred, y) / scale
        if log_weight:
            per_pixel = per_pixel + log_weight * pinball(logged(pred), logged(y))
        return (per_pixel * m).sum() / m.sum().clamp(min=1.0)

    return loss


def located_quantile_loss(stats: dict[str, float], log_weight: float = 0.0
                          ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The objective of a model with ``quantile_location``, whose output (``with_centre``)
    is its centre then its quantiles: the centre's :func:`physical_loss` (the MSE, as a
    deterministic model is trained) plus the quantiles' :func:`quantile_loss`."""
    mse, pinball_loss = physical_loss(stats), quantile_loss(stats, log_weight)

    def loss(pred: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return mse(pred[:, :, :1], y, mask) + pinball_loss(pred[:, :, 1:], y, mask)

    return loss


def _objective(model: ConvLSTMForecaster, stats: dict[str, float], quantile_log_weight: float = 0.0
               ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training loss of ``model``: MSE, pinball, or both (a located quantile model)."""
    if model.config.quantile_location:
        return located_quantile_loss(stats, quantile_log_weight)
    return quantile_loss(stats, quantile_log_weight) if model.config.quantiles else physical_loss(stats)


def _merge_resume(config: TrainConfig, explicit: set[str], state: dict) -> TrainConfig:
    """Settings of a resumed run: the checkpoint's, except what the user set explicitly
    (and that may change); shape and data settings must match."""
    saved = {**_BEFORE_THE_SETTING, **state["train_config"]}
    for key in _FROZEN_ON_RESUME:
        was = saved.get(key, getattr(TrainConfig(), key))  # checkpoints older than the setting had its default
        if key in explicit and getattr(config, key) != was:
            raise RunoffError(f"--resume {config.resume}: the checkpoint has {key}={was}, "
                              f"but --{key} {getattr(config, key)} was asked; drop the option to continue that run")
    merged = dict(saved)
    for key in explicit:
        merged[key] = getattr(config, key)
    merged["resume"] = config.resume
    return TrainConfig(**merged)


def train_step(net: torch.nn.Module, optimiser: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, precision: str = "auto",
               clip_grad: float = 1.0, forcings: torch.Tensor | None = None,
               loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = masked_mse,
               with_centre: bool = False) -> torch.Tensor:
    """One optimisation step on a batch already on the model's device: forward under
    autocast, ``loss_fn`` (in fp32), backward, gradient clipping, optimiser step. Returns the
    detached loss, still on the device (reading it would synchronise)."""
    optimiser.zero_grad(set_to_none=True)
    with autocast_for(x.device, precision):
        pred = net(x, forcings, with_centre=with_centre)
    loss = loss_fn(pred.float(), y, mask)
    scaler.scale(loss).backward()
    scaler.unscale_(optimiser)
    torch.nn.utils.clip_grad_norm_(net.parameters(), clip_grad)
    scaler.step(optimiser)
    scaler.update()
    return loss.detach()


def average_weights(model: ConvLSTMForecaster, decay: float, state: dict | None = None) -> AveragedModel:
    """An exponential moving average of ``model``'s parameters, ``decay`` per optimiser step
    (call ``update_parameters(model)`` after each). Forecasts from it are steadier than from
    the last step's weights, and early stopping follows it (docs/skill.md, "Weight
    averaging"). Its buffers stay the model's own: none is trained. ``state``: a checkpoint
    whose average to carry on (its ``model_state`` and ``ema_steps``)."""
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))
    if state is not None and state.get("ema_steps"):
        parameters = dict(model.named_parameters())
        averaged.module.load_state_dict({k: v for k, v in state["model_state"].items() if k in parameters},
                                        strict=False)
        averaged.n_averaged.fill_(state["ema_steps"])
    return averaged


def evaluate_loader(model: ConvLSTMForecaster, loader: DataLoader, device: torch.device,
                    stats: dict[str, float], ranks: Ranks = Ranks(), precision: str = "auto") -> dict[str, float]:
    """Validation scores in physical units (``stats``: the target's): the model's and
    persistence's MSE and the skill ``1 - MSE_model / MSE_persistence`` (``val_skill``), which
    is what ``runoff evaluate`` reports, of the forecast as users receive it (clipped at 0;
    a probabilistic model's: the mean of its quantiles); and ``val_loss``, what early stopping
    follows, on the training loss's scale: that MSE, or for a probabilistic model its pinball
    loss (half its CRPS), plus its centre's MSE where the centre is trained apart
    (``quantile_location``). Under data-parallel training each rank scores its shard and the
    sums are combined."""
    model.eval()
    located = model.config.quantile_location
    # valid pixels, SSE model, SSE persistence, pinball sum, SSE of a located model's centre
    sums = torch.zeros(5, dtype=accumulator_dtype(device), device=device)
    with torch.no_grad():
        for x, y, mask, pred in model_outputs(model, loader, device, precision, with_centre=located):
            m, truth = mask.float(), to_physical(y, stats)
            values = to_physical(pred, stats).clamp(min=0)  # as users receive it
            if located:
                sums[4] += (((values[:, :, :1] - truth) ** 2) * m).sum().to(sums.dtype)
                values = values[:, :, 1:]
            forecast = values.mean(dim=2, keepdim=True)
            last = to_physical(x[:, -1:, :1], stats).clamp(min=0).expand_as(truth)
            sums[0] += m.sum().to(sums.dtype)
            sums[1] += (((forecast - truth) ** 2) * m).sum().to(sums.dtype)
            sums[2] += (((last - truth) ** 2) * m).sum().to(sums.dtype)
            if values.shape[2] > 1:
                sums[3] += (pinball(values, truth) * m).sum().to(sums.dtype)
    count, sse, sse_p, pinball_sum, sse_centre = ranks.sum(sums).tolist()
    count = max(count, 1.0)
    val_loss = (pinball_sum / count / loss_scale(stats) ** 0.5 + sse_centre / count / loss_scale(stats)
                if model.config.quantiles else sse / count / loss_scale(stats))
    return {"val_skill": skill(sse, sse_p), "val_loss": val_loss, "val_mse": sse / count,
            "persistence_mse": sse_p / count}


def _calibrate_best(run: "_Run") -> None:
    """Widen the lower side of the best epoch's quantiles as the training windows ask,
    calibrate their spread on the validation split, and with ``calibrate_levels`` their
    levels per flow class, choose their single map, and write all into ``best.pth`` (epoch
    checkpoints keep the quantiles as trained). With ``--forcing_error`` the windows'
    forcings carry that error, as the forecasts' rain will."""
    if run.best_state is None:  # no improvement in this session: best.pth stays as it is
        return
    run.model.load_state_dict(run.best_state)
    config, leads, stats = run.config, run.config.leads, run.record["norm_stats"][TARGET]
    errors = window_errors(run.record, config.forcing_error, area_sigma=config.forcing_error_area)  # epoch 0's draws
    run.model.lower_spread.copy_(fit_lower_spread(run.model, run.train_loader, run.ranks.device, stats, run.ranks,
                                                  config.precision, forcing_error=errors))
    run.log("lower side of the quantiles widened on the training days (best.pth): "
            + spread_text(dict(zip(leads, run.model.lower_spread.tolist()))))
    point_maps = calibrate_model(run.model, run.val_loader, run.ranks.device, stats, run.ranks, config.precision,
                                 config.calibration, run.thresholds, config.calibrate_levels,
                                 location=config.calibrate_location, forcing_error=errors)
    run.log("spread calibrated on the validation split"
            + error_text(config.forcing_error, config.forcing_error_area) + " (best.pth): "
            + spread_text(dict(zip(leads, run.model.spread_scale.tolist()))))
    if config.calibrate_location:
        run.log("quantiles moved to the centre's mean (best.pth): " + location_text(
            dict(zip(leads, run.model.mean_at_centre.tolist()))))
    if config.calibrate_levels:
        run.log("quantile levels calibrated per flow class on the validation split (best.pth): " + ", ".join(
            f"lead {lead} {len(c['centres'])} classes" for lead, c in zip(leads, run.model.config.level_calibration)))
    run.log("single map, of the mean and the median of the quantiles (best.pth): "
            + point_maps_text(dict(zip(leads, point_maps))))
    if run.ranks.is_main:
        best = run.checkpoint_dir / "best.pth"
        save_checkpoint(with_calibration(load_checkpoint(best), run.model, run.record["splits"]["val"],
                                         config.forcing_error, config.forcing_error_area, point_maps), best)


def _write_history(history: list[dict], output_dir: Path) -> None:
    with atomic_output(output_dir / "history.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    plot_loss_curves(history, output_dir / "plots" / "loss_curves.png")


def train(config: TrainConfig, explicit: set[str] | None = None, progress: bool = False) -> TrainResult:
    """Run (or resume) training; see :class:`TrainConfig`. ``explicit`` names the settings
    the user gave on the command line (they override a resumed checkpoint's).

    Under ``torchrun --nproc_per_node N -m pipeline.train ...`` each rank trains a
    DistributedDataParallel replica on its own disjoint share of the windows; only rank 0
    writes checkpoints, history, plots and log lines.
    """
    resume_state = None
    if config.resume:
        resume_state = load_checkpoint(config.resume, "--resume", config.storage_options)
        config = _merge_resume(config, explicit if explicit is not None else set(), resume_state)
    if "linear_response" in (explicit or set()) and config.linear_response and not config.predict_delta:
        raise RunoffError("--linear_response forms the change from the last day: it cannot go with --no-predict_delta")
    if not config.probabilistic:  # options that act on a probabilistic model only
        for given, option, what in (
                (config.quantile_location, "--quantile_location", "places a probabilistic model's quantiles"),
                (config.quantile_log_weight, "--quantile_log_weight", "weighs a probabilistic model's loss"),
                (config.calibrate_levels, "--calibrate_levels", "calibrates a probabilistic model's quantiles"),
                (config.calibrate_location, "--calibrate_location", "places a probabilistic model's quantiles"),
                (config.calibration != "spread_skill", f"--calibration {config.calibration}",
                 "calibrates a probabilistic model's spread")):
            if given:
                raise RunoffError(f"{option} {what}: it needs --probabilistic")
    if config.calibrate_location and not config.quantile_location:
        raise RunoffError("--calibrate_location moves the quantiles onto the centre trained by the MSE: it cannot go "
                          "with --no-quantile_location")
    _validate(config)
    # the run lives in _fit's frame only: gone when the process group is released
    with data_parallel(config.device) as ranks, contextlib.ExitStack() as on_exit:
        return _fit(config, resume_state, ranks, progress, on_exit)


def _fit(config: TrainConfig, resume_state: dict | None, ranks: Ranks, progress: bool,
         on_exit: contextlib.ExitStack) -> TrainResult:
    """The epochs of a run: train, validate, schedule, stop early, checkpoint."""
    run = _start_run(config, resume_state, ranks, progress, on_exit)
    if resume_state is not None and (run.start_epoch >= config.epochs or run.stopped):
        why = "stopped early" if run.stopped else f"reached --epochs {config.epochs}"
        run.log(f"{config.resume}: this run already {why} at epoch {run.start_epoch}; nothing to do "
                f"(raise --epochs to train on)")
        result = run.result(0)
        if not result.best_checkpoint.exists():  # nothing written here: the best is the resumed run's
            beside = result.last_checkpoint.with_name("best.pth")  # last_checkpoint: the one resumed
            result = replace(result, best_checkpoint=beside if beside.exists() else result.last_checkpoint)
        return result
    for epoch in range(run.start_epoch + 1, config.epochs + 1):
        if run.stopped:
            break
        started = time.perf_counter()
        fitted = _train_epoch(run, epoch)
        trained = time.perf_counter()
        val = evaluate_loader(run.forecaster, run.val_loader, ranks.device, run.record["norm_stats"][TARGET], ranks,
                              config.precision)
        _end_epoch(run, epoch, fitted, val)
        if epoch == run.start_epoch + 1 and config.max_val_windows is None:
            hint = validation_hint(trained - started, time.perf_counter() - trained, len(run.val_loader.dataset))
            if hint:
                run.log(hint)
    if run.stopped and run.history[-1]["epoch"] < config.epochs and ranks.is_main:
        print(f"early stopping: no validation improvement for {config.patience} epochs "
              f"(best epoch {run.best_epoch})", file=sys.stderr)
    if config.probabilistic:
        _calibrate_best(run)
    return run.result(len(run.history))


@dataclass
class _Run:
    """What a training run holds while its epochs go by."""

    config: TrainConfig
    ranks: Ranks
    model: ConvLSTMForecaster
    net: torch.nn.Module  # the model, or its DistributedDataParallel wrapper
    optimiser: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau
    scaler: torch.amp.GradScaler
    train_set: WindowSampler
    train_loader: DataLoader
    val_loader: DataLoader
    record: dict  # the checkpoint's part fixed for the run (checkpoint.run_record)
    loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    units: str  # of the target; MSE is in its square
    checkpoint_dir: Path
    output_dir: Path
    progress: bool
    start_epoch: int = 0
    best_val: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    history: list[dict] = field(default_factory=list)
    last_path: Path | None = None
    best_state: dict | None = None  # the best epoch's weights of this session (probabilistic runs)
    thresholds: tuple[float, ...] = ()  # probabilistic: the wet p90 and p99 of the training split
    averaged: AveragedModel | None = None  # the weights' moving average (ema_decay > 0)

    @property
    def forecaster(self) -> ConvLSTMForecaster:
        """The weights validation scores and checkpoints carry as ``model_state``: the
        moving average where there is one, else the optimiser's own."""
        return self.model if self.averaged is None else self.averaged.module

    @property
    def stopped(self) -> bool:
        """Early stopping: no validation improvement for ``patience`` epochs."""
        return self.bad_epochs >= self.config.patience

    def log(self, line: str) -> None:
        if self.ranks.is_main:
            print(line, flush=True)

    def result(self, epochs_run: int) -> TrainResult:
        return TrainResult(epochs_run, self.best_epoch, self.best_val, self.checkpoint_dir / "best.pth",
                           self.last_path, self.history)

    def resume_from(self, state: dict) -> None:
        """The optimiser's weights, optimiser, scheduler, RNG and early-stopping state of a checkpoint."""
        self.model.load_state_dict(state.get("live_model_state", state["model_state"]))
        self.optimiser.load_state_dict(state["optimizer_state"])
        self.scheduler.load_state_dict(state["scheduler_state"])
        torch.set_rng_state(state["rng_state"])
        self.start_epoch = state["epoch"]
        self.best_val, self.best_epoch = state["best_val_loss"], state["best_epoch"]
        self.bad_epochs, self.history = state["bad_epochs"], list(state["history"])

    def checkpoint(self, epoch: int, windows: list) -> dict:
        """The whole checkpoint after ``epoch``."""
        averaging = ({} if self.averaged is None else
                     {"live_model_state": self.model.state_dict(), "ema_steps": int(self.averaged.n_averaged)})
        return {**self.record, "model_state": self.forecaster.state_dict(), **averaging,
                "optimizer_state": self.optimiser.state_dict(),
                "scheduler_state": self.scheduler.state_dict(), "epoch": epoch, "best_val_loss": self.best_val,
                "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs, "history": self.history,
                "rng_state": torch.get_rng_state(), "epoch_windows": windows}


def _check_no_run(checkpoint_dir: Path, option_value: str) -> None:
    """One clear error before a fresh run would overwrite another run's checkpoints."""
    held = [name for name in ("best.pth", "last.pth") if (checkpoint_dir / name).exists()]
    if held:
        raise RunoffError(f"--checkpoint_dir {option_value}: holds another run ({', '.join(held)}); continue it "
                          f"with --resume {checkpoint_dir / 'last.pth'}, or give another --checkpoint_dir "
                          "(nothing is overwritten)")


def _cube_for_ranks(config: TrainConfig, ranks: Ranks, checkpoint_dir: Path, output_dir: Path,
                    progress: bool) -> str:
    """Rank 0 checks the outputs and ingests a raster folder once; the others wait and
    stop with rank 0's message if it failed. Returns the cube's path."""
    outcome = None
    if ranks.is_main:
        try:
            check_writable(checkpoint_dir, "--checkpoint_dir")
            if config.resume is None:
                _check_no_run(checkpoint_dir, config.checkpoint_dir)
            check_writable(output_dir, "--output_dir")
            outcome = ("ok", ensure_cube(config.data_dir, storage_options=config.storage_options, progress=progress))
        except RunoffError as exc:
            outcome = ("error", str(exc))
    kind, store = ranks.gather(outcome)[0]
    if kind == "error":
        raise RunoffError(store)
    return store


def _start_run(config: TrainConfig, resume_state: dict | None, ranks: Ranks, progress: bool,
               on_exit: contextlib.ExitStack) -> _Run:
    """Open the cube, cut the splits into windows, build the samplers, loaders, model and
    optimiser (from ``resume_state`` when resuming)."""
    keep_freed_memory(ranks.device)
    checkpoint_dir = location(config.checkpoint_dir, config.storage_options)
    output_dir = location(config.output_dir, config.storage_options)
    store = _cube_for_ranks(config, ranks, checkpoint_dir, output_dir, progress)
    ds = open_cube(store, config.storage_options)
    grid = cube_grid(ds)
    variables = [TARGET] + [c for c in config.covariates if c != TARGET]
    for option, names in (("--covariates", variables), ("--forcings", config.forcings)):
        unknown = [v for v in names if v not in ds.data_vars]
        if unknown:
            raise RunoffError(f"{option} {','.join(unknown)}: not in the cube {store} "
                              f"(it has {', '.join(ds.data_vars)})")
    static = [v for v in config.forcings if is_static(ds, v)]
    if static:
        raise RunoffError(f"--forcings {','.join(static)}: a static map, the same on every day; name it in --covariates")
    dates = cube_dates(ds)
    splits = make_splits(dates[0], dates[-1], config.train_end, config.val_end)
    maps = {}
    if config.climatology_map:
        maps[CLIMATOLOGY_MAP] = (Checkpoint(resume_state).maps[CLIMATOLOGY_MAP] if resume_state is not None
                                 else climatology_map(ds, splits["train"]))
        variables.append(CLIMATOLOGY_MAP)
    if config.season:
        variables.extend(SEASON_INPUTS)
        years = ((splits["train"].end - splits["train"].start).days + 1) / 365.25
        if years < SEASON_YEARS and resume_state is None and ranks.is_main:
            warnings.warn(f"--season with {years:.1f} years of training days: on records shorter than "
                          f"{SEASON_YEARS} years it lost skill in every measurement (docs/skill.md); compare with "
                          "a run without it", RunoffWarning, stacklevel=2)
    spec = WindowSpec(config.input_days, tuple(config.leads), tuple(variables), tuple(config.forcings))
    issues = {name: window_issues(ds, split, spec) for name, split in splits.items()}
    for name in ("train", "val"):
        check_windows(issues[name], splits[name], spec, len(dates))
    train_issues = evenly_spaced(issues["train"], config.max_train_windows)
    val_issues = evenly_spaced(issues["val"], config.max_val_windows)
    if resume_state is not None:
        Checkpoint(resume_state).check_grid(grid, f"--resume {config.resume}", str(store))
    train_set = WindowSampler(store, train_issues, spec, resume_state["norm_stats"] if resume_state else {},
                              patch=config.patch, shuffle=True, seed=config.seed,
                              storage_options=config.storage_options, maps=maps)
    # a new run's statistics come from the read its first epoch needs anyway, where the cube allows
    stats = train_set.stats if resume_state is not None else train_set.fit_stats(splits["train"])
    val_set = WindowSampler(store, val_issues, spec, stats, patch=None, shuffle=False,
                            storage_options=config.storage_options, maps=maps)
    for sampler in (train_set, val_set):
        sampler.shard(ranks.rank, ranks.world_size)
    train_loader, val_loader = (on_exit.enter_context(_loader(dataset, config, ranks.device))
                                for dataset in (train_set, val_set))

    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model = ConvLSTMForecaster(len(variables), config.hidden_channels, config.kernel_size, config.num_layers,
                               leads=len(config.leads), predict_delta=config.predict_delta,
                               forcing_channels=max(config.leads) * len(config.forcings),
                               quantiles=QUANTILES if config.probabilistic else 0,
                               linear_response=config.linear_response and config.predict_delta,
                               stats=[stats[v] for v in [TARGET, *config.forcings]],
                               quantile_location=config.quantile_location).to(ranks.device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimiser, factor=0.5,
                                                           patience=max(1, config.patience // 3))
    net = model
    if ranks.world_size > 1:
        net = DistributedDataParallel(model, device_ids=[ranks.device.index] if ranks.device.type == "cuda" else None)
    record = run_record(model=model, norm_stats=stats, input_days=config.input_days, leads=config.leads,
                        variables=variables, forcings=config.forcings, grid=grid, data=store, splits=splits,
                        train_config=asdict(config), world_size=ranks.world_size, maps=maps)
    run = _Run(config, ranks, model, net, optimiser, scheduler, grad_scaler(ranks.device, config.precision),
               train_set, train_loader, val_loader, record,
               _objective(model, stats[TARGET], config.quantile_log_weight),
               target_units(ds), checkpoint_dir, output_dir, progress and ranks.is_main)
    run.log(Checkpoint(record).inputs_note({v: ds[v].attrs.get("long_name", "") for v in ds.data_vars}))
    if val_issues.size < issues["val"].size:
        run.log(f"validation on {val_issues.size} of the {issues['val'].size} validation windows, evenly spaced "
                f"(--max_val_windows)")
    run.last_path = checkpoint_dir / "model_epoch0.pth"
    if config.probabilistic and (config.calibration == "brier" or config.calibrate_location):
        run.thresholds = tuple(wet_thresholds(ds, splits["train"].start, splits["train"].end))
    if resume_state is not None:
        run.resume_from(resume_state)
        run.last_path = location(config.resume, config.storage_options)
    if config.ema_decay > 0:  # after resuming: the average starts from the resumed weights, or carries on its own
        run.averaged = average_weights(model, config.ema_decay, resume_state)
    return run


def _loader(dataset: WindowSampler, config: TrainConfig, device: torch.device):
    """The DataLoader of a sampler (see :func:`~pipeline.sampler.data_loader`).

    Workers persist across epochs (no process start-up per epoch, each keeps its decoded
    block); in-process batches are stacked straight into pinned memory, and workers'
    batches are pinned by the loader in this process."""
    pin, workers = device.type == "cuda", config.num_workers
    return data_loader(dataset, batch_size=config.batch_size, num_workers=workers,
                       pin_memory=pin and workers > 0,
                       collate_fn=partial(collate_windows, pin_memory=pin and workers == 0),
                       persistent_workers=workers > 0, multiprocessing_context="spawn" if workers else None)


def _train_epoch(run: _Run, epoch: int) -> dict:
    """One pass over this rank's training windows. Returns the mean loss, samples/s, the
    share of time the device waited for data, and every rank's windows."""
    from tqdm import tqdm

    config, ranks, device = run.config, run.ranks, run.ranks.device
    run.train_set.set_epoch(epoch)
    run.model.train()
    started, waited_s = time.perf_counter(), 0.0  # seconds spent waiting for the next batch
    # loss sum, steps, samples, seconds waiting for data: summed over ranks at the epoch's end
    totals = torch.zeros(4, dtype=accumulator_dtype(device), device=device)
    seen: list[torch.Tensor] = []
    bar = tqdm(total=len(run.train_set), unit="win", desc=f"epoch {epoch}/{config.epochs}",
               disable=not run.progress, leave=False)
    batches = loader_batches(run.train_loader, device)
    forcing_error = window_errors(run.record, config.forcing_error, epoch, config.forcing_error_area)
    # Join: ranks whose share holds fewer batches shadow the others' all-reduces
    with Join([run.net]) if ranks.world_size > 1 else contextlib.nullcontext():
        while True:
            waited, queued = time.perf_counter(), queue_marker(device)
            try:
                x, y, mask, issue, forcings = next(batches)
            except StopIteration:
                break
            if queued is None or queued.query():  # the device had run out of work: it waited too
                waited_s += time.perf_counter() - waited
            x, y, mask, forcings = (t.to(device, non_blocking=True) for t in (x, y, mask, forcings))
            if forcing_error is not None:
                forcings = forcing_error(forcings, issue)
            totals[0] += train_step(run.net, run.optimiser, run.scaler, x, y, mask, config.precision,
                                    config.clip_grad, forcings, run.loss, run.model.config.quantile_location)
            if run.averaged is not None:
                run.averaged.update_parameters(run.model)
            totals[1] += 1
            totals[2] += x.shape[0]
            seen.append(issue)
            bar.update(x.shape[0])
    bar.close()
    _take_main_rank_state(run)
    totals[3] += waited_s
    loss_sum, steps, samples, wait = ranks.sum(totals).tolist()  # also waits for the queued steps
    elapsed = time.perf_counter() - started
    return {"train_loss": loss_sum / max(steps, 1), "samples_per_s": samples / elapsed if elapsed > 0 else 0.0,
            "data_wait": wait / ranks.world_size / elapsed if elapsed > 0 else 0.0,
            "windows": ranks.gather(torch.cat(seen).tolist() if seen else [])}


def _on_cpu(value):
    """``value`` with every tensor in it (through dicts, lists and tuples) copied to the CPU."""
    if torch.is_tensor(value):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: _on_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(item) for item in value)
    return value


def _take_main_rank_state(run: _Run) -> None:
    """After an epoch, every rank takes the main rank's weights, their moving average and the
    optimiser's state. A rank whose share of the windows held fewer batches stops stepping
    before the others (Join lets them carry on), so its average and optimiser moments fall
    behind; without this, each rank would validate and calibrate another model than the
    one ``best.pth`` holds, and start the next epoch from it."""
    if run.ranks.world_size == 1:
        return
    state = run.ranks.from_main(_on_cpu({"model": run.model.state_dict(), "optimiser": run.optimiser.state_dict(),
                                         "averaged": None if run.averaged is None else run.averaged.state_dict()})
                                if run.ranks.is_main else None)
    if not run.ranks.is_main:
        run.model.load_state_dict(state["model"])
        run.optimiser.load_state_dict(state["optimiser"])
        if run.averaged is not None:
            run.averaged.load_state_dict(state["averaged"])


def validation_hint(train_s: float, val_s: float, windows: int) -> str | None:
    """A line for a run whose validation (whole maps) takes over twice its training
    (patches), as on a large grid: how many evenly spaced windows would take about as long
    as the training does.

    >>> validation_hint(80.0, 1600.0, 548)[:80]
    'validation took 1600 s against 80 s of training; --max_val_windows 27 would vali'
    >>> validation_hint(80.0, 100.0, 548) is None
    True
    """
    if val_s <= 2 * train_s:
        return None
    suggested = max(1, int(windows * train_s / val_s))
    return (f"validation took {val_s:.0f} s against {train_s:.0f} s of training; --max_val_windows {suggested} would "
            f"validate on evenly spaced windows in about the training time")


def _end_epoch(run: _Run, epoch: int, fitted: dict, val: dict[str, float]) -> None:
    """Scheduler and early stopping on the validation loss, the log line, and (rank 0) the
    epoch's checkpoint, ``last.pth``, ``best.pth`` when it improved, and the history."""
    run.scheduler.step(val["val_loss"])
    lr = run.optimiser.param_groups[0]["lr"]
    improved = val["val_loss"] < run.best_val
    if improved:
        run.best_val, run.best_epoch, run.bad_epochs = val["val_loss"], epoch, 0
        if run.config.probabilistic:  # calibrated at the end: keep the weights (every rank has them)
            run.best_state = {k: v.detach().clone() for k, v in run.forecaster.state_dict().items()}
    else:
        run.bad_epochs += 1
    run.history.append({"epoch": epoch, "train_loss": fitted["train_loss"], **val, "lr": lr,
                        "samples_per_s": fitted["samples_per_s"], "data_wait": fitted["data_wait"]})
    run.log(f"epoch {epoch:3d}/{run.config.epochs}  val skill vs persistence {val['val_skill']:+.3f} "
            f"(MSE {val['val_mse']:.4g} vs {val['persistence_mse']:.4g} ({run.units})²)  "
            f"loss train {fitted['train_loss']:.4f} val {val['val_loss']:.4f}  lr {lr:.1e}  "
            f"{fitted['samples_per_s']:6.1f} samples/s  data wait {fitted['data_wait']:5.1%}" + ("  *" if improved else ""))
    run.last_path = run.checkpoint_dir / f"model_epoch{epoch}.pth"
    if run.ranks.is_main:
        state = run.checkpoint(epoch, fitted["windows"])
        save_checkpoint(state, run.last_path)
        save_checkpoint(state, run.checkpoint_dir / "last.pth")  # what --resume continues from
        if improved:
            save_checkpoint(state, run.checkpoint_dir / "best.pth")
        _write_history(run.history, run.output_dir)


def _validate(config: TrainConfig) -> None:
    """One clear error per impossible setting; expands one hidden size to every layer."""
    checks = [
        (config.epochs >= 1, "--epochs", config.epochs, "must be >= 1"),
        (config.batch_size >= 1, "--batch_size", config.batch_size, "must be >= 1"),
        (config.input_days >= 1, "--input_days", config.input_days, "must be >= 1"),
        (bool(config.leads) and min(config.leads) >= 1, "--leads", config.leads, "lead times must be >= 1 day"),
        (list(config.leads) == sorted(set(config.leads)), "--leads", config.leads,
         "lead times must increase, each given once (1-6, or 1,3,6)"),
        (config.kernel_size % 2 == 1 and config.kernel_size >= 1, "--kernel_size", config.kernel_size,
         "must be odd (1, 3, 5...)"),
        (bool(config.hidden_channels) and min(config.hidden_channels) >= 1, "--hidden_channels",
         config.hidden_channels, "must be >= 1"),
        (config.num_layers >= 1, "--num_layers", config.num_layers, "must be >= 1"),
        (config.lr > 0, "--lr", config.lr, "must be > 0"),
        (config.weight_decay >= 0, "--weight_decay", config.weight_decay, "must be >= 0"),
        (config.clip_grad > 0, "clip_grad", config.clip_grad, "must be > 0"),
        (config.seed >= 0, "--seed", config.seed, "must be >= 0"),
        (config.max_train_windows is None or config.max_train_windows >= 1, "--max_train_windows",
         config.max_train_windows, "must be >= 1 (leave it out for every window)"),
        (config.max_val_windows is None or config.max_val_windows >= 1, "--max_val_windows",
         config.max_val_windows, "must be >= 1 (leave it out for every window)"),
        (config.patience >= 1, "--patience", config.patience, "must be >= 1"),
        (0 <= config.ema_decay < 1, "--ema_decay", config.ema_decay, "must be in [0, 1): 0 for no averaging"),
        (config.patch >= 4, "--patch", config.patch, "must be >= 4 pixels"),
        (config.num_workers >= 0, "--num_workers", config.num_workers, "must be >= 0"),
        (config.quantile_log_weight >= 0, "--quantile_log_weight", config.quantile_log_weight, "must be >= 0"),
        (config.calibration in CALIBRATIONS, "--calibration", config.calibration, f"must be one of {CALIBRATIONS}"),
    ]
    for ok, option, value, why in checks:
        if not ok:
            raise RunoffError(f"{option} {value}: {why}")
    check_forcing_errors({"--forcing_error": config.forcing_error, "--forcing_error_area": config.forcing_error_area},
                         bool(config.forcings), "it perturbs the forcings: it needs --forcings")
    if TARGET in config.forcings:
        raise RunoffError(f"--forcings {','.join(config.forcings)}: {TARGET} is the forecast itself, not a forcing")
    both = sorted(set(config.forcings) & set(config.covariates))
    if both:
        raise RunoffError(f"--forcings / --covariates: {','.join(both)} named in both; a variable is either a "
                          f"past input (--covariates) or known on the lead days (--forcings): to read its past "
                          f"days too, ingest it a second time under another name (docs/skill.md)")
    if len(config.hidden_channels) == 1:
        config.hidden_channels = config.hidden_channels * config.num_layers
    elif config.num_layers not in (1, len(config.hidden_channels)):
        raise RunoffError(f"--hidden_channels {config.hidden_channels}: give one size or one per layer "
                          f"(--num_layers {config.num_layers})")
    config.num_layers = len(config.hidden_channels)


if __name__ == "__main__":  # ``python -m pipeline.train ...`` (and torchrun) runs ``runoff train ...``
    from pipeline.__main__ import main

    sys.exit(main(["train", *sys.argv[1:]]))
