"""Train a ConvLSTM on a cube: the loop alone. Masked MSE, AdamW, ReduceLROnPlateau, early
stopping, gradient clipping, mixed precision on accelerators, a checkpoint per epoch and
exact resume; under ``torchrun`` each rank trains a DistributedDataParallel replica on its
own share of the windows.

What the loop stands on lives below it: the windows (:mod:`pipeline.sampler`), the device
and precision (:mod:`pipeline.device`), the ranks (:mod:`pipeline.distributed`) and the
checkpoint's schema (:mod:`pipeline.checkpoint`).

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
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader

from .baselines import wet_thresholds
from .checkpoint import Checkpoint, load_checkpoint, run_record, save_checkpoint
from .cube import (CLIMATOLOGY_MAP, SEASON_INPUTS, TARGET, climatology_map, cube_dates, cube_grid, is_static,
                   make_splits, open_cube)
from .device import (accumulator_dtype, autocast_for, grad_scaler, keep_freed_memory, loader_batches,
                     queue_marker)
from .distributed import Ranks, data_parallel
from .errors import RunoffError, RunoffWarning
from .ingest import ensure_cube
from .model import QUANTILES, ConvLSTMForecaster, quantile_levels, quantiles_median, to_physical
from .plots import plot_loss_curves
from .sampler import WindowSampler, WindowSpec, check_windows, collate_windows, data_loader, window_issues
from .storage import atomic_output, check_writable, location
from .verify import skill, spread_skill_ratio

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
    predict_delta: bool = True  # forecast the change from the last day: untrained = persistence
    linear_response: bool = True  # that change linear in physical units, with gains set per pixel (needs predict_delta)
    probabilistic: bool = False  # QUANTILES quantiles per pixel and lead, trained by the pinball loss
    # probabilistic: a centre trained by the MSE, the quantiles placed off it (None: yes when probabilistic)
    quantile_location: bool | None = None
    calibration: str = "spread_skill"  # probabilistic: how calibrate_spread picks its factor (CALIBRATIONS)
    calibrate_levels: bool = False  # probabilistic: also calibrate_levels on the validation split
    clip_grad: float = 1.0
    ema_decay: float = 0.99  # forecasts use the weights' moving average over the steps, this decay per step (0: none)
    precision: str = "auto"  # auto (bf16 on CUDA where supported), fp32, bf16, fp16
    max_train_windows: int | None = None
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


def pinball(quantiles: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Pinball loss of quantiles (..., Q, H, W) at :func:`~pipeline.model.quantile_levels`
    against ``truth`` (..., 1, H, W), averaged over the levels: (..., 1, H, W). Twice it is
    the CRPS of the distribution the quantiles describe, as Q grows."""
    levels = quantile_levels(quantiles.shape[-3]).to(quantiles.device).view(-1, 1, 1)
    error = truth - quantiles
    return torch.maximum(levels * error, (levels - 1) * error).mean(dim=-3, keepdim=True)


def quantile_loss(stats: dict[str, float]) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The probabilistic objective: masked pinball loss in physical units, divided by the
    training values' root mean square (the pinball loss is in data units, not squared)."""
    scale = loss_scale(stats) ** 0.5

    def loss(pred: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.to(pred.dtype)
        per_pixel = pinball(to_physical(pred, stats), to_physical(y, stats))
        return (per_pixel * m).sum() / m.sum().clamp(min=1.0) / scale

    return loss


def located_quantile_loss(stats: dict[str, float]
                          ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The objective of a model with ``quantile_location``, whose output (``with_centre``)
    is its centre then its quantiles: the centre's :func:`physical_loss` (the MSE, as a
    deterministic model is trained) plus the quantiles' :func:`quantile_loss`."""
    mse, pinball_loss = physical_loss(stats), quantile_loss(stats)

    def loss(pred: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return mse(pred[:, :, :1], y, mask) + pinball_loss(pred[:, :, 1:], y, mask)

    return loss


def _objective(model: ConvLSTMForecaster) -> Callable[[dict[str, float]], Callable]:
    """The training loss's builder for ``model``: MSE, pinball, or both (a located quantile model)."""
    if model.config.quantile_location:
        return located_quantile_loss
    return quantile_loss if model.config.quantiles else physical_loss


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


def model_outputs(model: ConvLSTMForecaster, loader: DataLoader, device: torch.device, precision: str = "auto",
                  with_centre: bool = False) -> Iterator[tuple[torch.Tensor, ...]]:
    """The model's output on each of ``loader``'s batches, in ``precision``: yields the
    batch's inputs, targets and mask on ``device``, and that output. Run it under
    ``torch.no_grad()``: it scores, it does not train."""
    for batch in loader_batches(loader, device):
        x, y, mask, forcings = (t.to(device, non_blocking=True) for t in (batch.x, batch.y, batch.mask,
                                                                        batch.forcings))
        with autocast_for(device, precision):
            out = model(x, forcings, with_centre=with_centre)
        yield x, y, mask, out


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


SPREAD_FACTORS = tuple(round(0.5 + 0.1 * k, 1) for k in range(26))  # 0.5 .. 3.0, tried per lead
CRPS_TOLERANCE = 0.01  # factors within 1% of the best validation CRPS count as equally good
CALIBRATIONS = ("spread_skill", "brier")  # the tie-breaks of calibrate_spread


def calibrate_spread(model: ConvLSTMForecaster, loader: DataLoader, device: torch.device,
                     stats: dict[str, float], ranks: Ranks = Ranks(), precision: str = "auto",
                     rule: str = "spread_skill", thresholds: tuple[float, ...] = ()) -> torch.Tensor:
    """A probabilistic model's ``spread_scale``, per lead: a factor of ``SPREAD_FACTORS`` on
    the quantiles' spread around their centre (in the model's log space, so a multiplicative
    widening in data units), times the current scale.

    Near its minimum the CRPS in data units barely changes with the spread, and a short
    validation split cannot tell those factors apart. So of the factors whose validation
    pinball loss (the CRPS) is within ``CRPS_TOLERANCE`` of the best, ``rule`` takes:

    * ``spread_skill``: the one whose spread/skill ratio is closest to 1 (a quantile model
      fitted on training windows is usually too narrow on new ones, more so at long leads);
    * ``brier``: the one with the lowest Brier score of ``P(X > threshold)`` summed over
      ``thresholds`` (the exceedance maps' own: the wet p90 and p99 of the training split),
      so that those probabilities are as reliable as the validation days can make them."""
    if rule not in CALIBRATIONS or (rule == "brier" and not thresholds):
        raise ValueError(f"rule {rule!r} with thresholds {thresholds}: one of {CALIBRATIONS}, brier with thresholds")
    model.eval()
    factors = torch.tensor(SPREAD_FACTORS, device=device).view(-1, 1, 1, 1, 1)
    # per factor and lead: pinball sum, members' variance sum, squared error of their mean,
    # then the Brier sum at each threshold
    sums = torch.zeros(3 + len(thresholds), len(SPREAD_FACTORS), model.config.leads,
                       dtype=accumulator_dtype(device), device=device)
    with torch.no_grad():
        for _, y, mask, q in model_outputs(model, loader, device, precision):
            q = q.float()
            centre, truth, m = q.mean(dim=2, keepdim=True), to_physical(y, stats), mask.float()
            for i, factor in enumerate(factors):
                values = to_physical(centre + factor * (q - centre), stats).clamp(min=0)
                mean = values.mean(dim=2, keepdim=True)
                briers = [((values > thr).float().mean(dim=2, keepdim=True) - (truth > thr).float()) ** 2
                          for thr in thresholds]
                for k, per_pixel in enumerate((pinball(values, truth), values.var(dim=2, keepdim=True),
                                               (mean - truth) ** 2, *briers)):
                    sums[k, i] += (per_pixel * m).sum(dim=(0, 2, 3, 4)).to(sums.dtype)
    crps, variance, error, *briers = ranks.sum(sums)
    near_best = crps <= crps.min(dim=0).values * (1 + CRPS_TOLERANCE)
    if rule == "brier":
        mismatch = torch.stack(briers).sum(dim=0)
    else:
        mismatch = spread_skill_ratio(variance, error.clamp(min=1e-12), model.config.quantiles).log().abs()
    mismatch = torch.where(near_best, mismatch, torch.full_like(mismatch, float("inf")))
    best = torch.tensor(SPREAD_FACTORS, device=device)[mismatch.argmin(dim=0)]
    return model.spread_scale * best.to(model.spread_scale.dtype)


LEVEL_CLASS_SHARES = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995)  # shares of validation pixels below each class edge
LEVEL_CLASS_PIXELS = 500  # fewest validation pixels a class is fitted on
_MEDIAN_BINS, _MEDIAN_SPAN = 128, 10.0  # the medians' histogram: bins over 10 std above a dry median
_PIT_GRID = 101  # points of (0, 1) at which each class's PIT distribution is accumulated


def pit_intervals(quantiles: torch.Tensor, truth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where ``truth`` (..., 1, H, W) falls in the distribution of Q increasing ``quantiles``
    (..., Q, H, W) at the levels ``(k + 0.5) / Q``, linear between them: the PIT, as an
    interval ``(low, high)`` (..., H, W). A truth equal to some quantiles (a dry day among
    dry quantiles) spans their share of levels; one beyond the outer quantiles spans the
    outer half-level; elsewhere the interval is a point.

    >>> q = torch.tensor([0.0, 0.0, 2.0, 4.0]).view(4, 1, 1)
    >>> [[round(v.item(), 3) for v in pit_intervals(q, torch.tensor([[[y]]]))] for y in (0.0, 3.0, 9.0)]
    [[0.0, 0.5], [0.75, 0.75], [0.875, 1.0]]
    """
    q = quantiles.shape[-3]
    below, upto = (quantiles < truth).sum(dim=-3), (quantiles <= truth).sum(dim=-3)
    k = below.clamp(1, q - 1).unsqueeze(-3)
    low_q, high_q = quantiles.gather(-3, k - 1).squeeze(-3), quantiles.gather(-3, k).squeeze(-3)
    y = truth.squeeze(-3)
    inside = (below.float() - 0.5 + ((y - low_q) / (high_q - low_q).clamp(min=1e-12)).clamp(0, 1)) / q
    low = torch.where(below == 0, 0.0, torch.where(below == q, 1 - 0.5 / q, inside))
    high = torch.where(below == 0, 0.5 / q, torch.where(below == q, 1.0, inside))
    tied = upto > below
    return torch.where(tied, below / q, low), torch.where(tied, upto / q, high)


def calibrate_levels(model: ConvLSTMForecaster, loader: DataLoader, device: torch.device,
                     stats: dict[str, float], ranks: Ranks = Ranks(), precision: str = "auto") -> list[dict]:
    """A probabilistic model's level calibration, per lead (see
    :meth:`~pipeline.model.ConvLSTMForecaster.set_level_calibration`), fitted on ``loader``'s
    windows: the pixels are put in classes by the median of their quantiles (edges at
    ``LEVEL_CLASS_SHARES`` of the pixels), and each class's quantiles are read at the levels
    where the truth's PIT over that class reached the nominal ones (Kuleshov et al. 2018, per
    class). So a class whose truth lies above its median more often than half the time has
    its quantiles read higher. Streamed: per lead, a histogram of the medians, each bin with
    the PIT distribution of its pixels; under data-parallel training the ranks' sums are
    combined."""
    model.eval()
    q, leads = model.config.quantiles, model.config.leads
    dry = -stats["mean"] / stats["std"]  # a value of 0 in the model's normalised space
    edges = dry + torch.linspace(0, _MEDIAN_SPAN, _MEDIAN_BINS + 1, device=device)[1:-1]
    grid = torch.linspace(0, 1, _PIT_GRID, device=device)
    # per lead and median bin: the PIT CDF summed over its pixels at each grid point, then the medians' sum
    sums = torch.zeros(leads * _MEDIAN_BINS, _PIT_GRID + 1, dtype=accumulator_dtype(device), device=device)
    with torch.no_grad():
        for _, y, mask, quantiles in model_outputs(model, loader, device, precision):
            quantiles, y = quantiles.float().clamp(min=dry), y.float().clamp(min=dry)  # as clipped at 0 in data units
            median = quantiles_median(quantiles)  # (B, L, H, W)
            low, high = pit_intervals(quantiles, y)
            keep = mask[:, :, 0].bool()
            row = (torch.arange(leads, device=device).view(1, -1, 1, 1) * _MEDIAN_BINS
                   + torch.bucketize(median, edges))[keep]
            low, high, median = low[keep].unsqueeze(-1), high[keep].unsqueeze(-1), median[keep].unsqueeze(-1)
            for part in torch.split(torch.arange(row.numel(), device=device), 2 ** 20):  # bounded memory
                width = (high[part] - low[part]).clamp(min=1e-9)
                cdf = ((grid - low[part]) / width).clamp(0, 1)  # (N, grid): each pixel's PIT CDF
                sums.index_add_(0, row[part], torch.cat([cdf, median[part]], dim=1).to(sums.dtype))
    sums = ranks.sum(sums).view(leads, _MEDIAN_BINS, _PIT_GRID + 1).cpu().double()
    return [_class_levels(per_lead[:, :-1], per_lead[:, -1], q) for per_lead in sums]


def _class_levels(cdf: torch.Tensor, median_sum: torch.Tensor, q: int) -> dict:
    """One lead's classes from its median bins (``cdf``: bins x grid, PIT CDF sums; the
    last column is each bin's pixel count): centres and levels."""
    count = cdf[:, -1]
    if count.sum() < LEVEL_CLASS_PIXELS:  # too few pixels to fit: the quantiles as they are
        return {"centres": [0.0], "levels": [quantile_levels(q).tolist()]}
    share = count.cumsum(0) / count.sum()
    ends = sorted({int(torch.searchsorted(share, s)) for s in LEVEL_CLASS_SHARES} | {len(count) - 1})
    classes, start = [], 0
    for end in ends:  # a class too small joins the one above it; the last one, the one below
        if count[start:end + 1].sum() >= LEVEL_CLASS_PIXELS:
            classes.append([start, end])
            start = end + 1
    if start < len(count) and classes:
        classes[-1][1] = len(count) - 1
    grid = torch.linspace(0, 1, cdf.shape[1], dtype=torch.float64)
    centres, levels = [], []
    for start, end in classes:
        pixels = count[start:end + 1].sum()
        pit_cdf = cdf[start:end + 1].sum(0) / pixels
        centres.append(float(median_sum[start:end + 1].sum() / pixels))
        levels.append(_inverse_cdf(pit_cdf, grid, quantile_levels(q).double()).tolist())
    return {"centres": centres, "levels": levels}


def _inverse_cdf(cdf: torch.Tensor, grid: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Where the non-decreasing ``cdf`` (given at ``grid``) reaches each of ``levels``,
    linear between grid points."""
    k = torch.searchsorted(cdf, levels).clamp(1, len(grid) - 1)
    low, high = cdf[k - 1], cdf[k]
    return grid[k - 1] + (grid[k] - grid[k - 1]) * ((levels - low) / (high - low).clamp(min=1e-12)).clamp(0, 1)


def _calibrate_best(run: "_Run") -> None:
    """Calibrate the spread of the best epoch's weights on the validation split, and write
    it into ``best.pth`` (epoch checkpoints keep the spread as trained)."""
    if run.best_state is None:  # no improvement in this session: best.pth stays as it is
        return
    run.model.load_state_dict(run.best_state)
    scale = calibrate_spread(run.model, run.val_loader, run.ranks.device, run.record["norm_stats"][TARGET],
                             run.ranks, run.config.precision, run.config.calibration, run.thresholds)
    run.model.spread_scale.copy_(scale)
    run.log("spread calibrated on the validation split (best.pth): " +
            ", ".join(f"lead {lead} x{s:.2f}" for lead, s in zip(run.config.leads, scale.tolist())))
    if run.config.calibrate_levels:
        run.model.set_level_calibration([])  # fitted on the quantiles as the network gives them
        run.model.set_level_calibration(calibrate_levels(run.model, run.val_loader, run.ranks.device,
                                                         run.record["norm_stats"][TARGET], run.ranks,
                                                         run.config.precision))
        run.log("quantile levels calibrated per flow class on the validation split (best.pth): " + ", ".join(
            f"lead {lead} {len(c['centres'])} classes" for lead, c in zip(run.config.leads,
                                                                          run.model.config.level_calibration)))
    if run.ranks.is_main:
        best = run.checkpoint_dir / "best.pth"
        state = load_checkpoint(best)
        state["model_config"] = run.model.config.to_dict()
        state["model_state"] = {k: v.detach().cpu() for k, v in run.model.state_dict().items()}
        save_checkpoint(state, best)


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
    if config.quantile_location and not config.probabilistic:
        raise RunoffError("--quantile_location places a probabilistic model's quantiles: it needs --probabilistic")
    if config.calibrate_levels and not config.probabilistic:
        raise RunoffError("--calibrate_levels calibrates a probabilistic model's quantiles: it needs --probabilistic")
    if config.calibration != "spread_skill" and not config.probabilistic:
        raise RunoffError(f"--calibration {config.calibration} calibrates a probabilistic model's spread: "
                          f"it needs --probabilistic")
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
        return run.result(0)
    for epoch in range(run.start_epoch + 1, config.epochs + 1):
        if run.stopped:
            break
        fitted = _train_epoch(run, epoch)
        val = evaluate_loader(run.forecaster, run.val_loader, ranks.device, run.record["norm_stats"][TARGET], ranks,
                              config.precision)
        _end_epoch(run, epoch, fitted, val)
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


def _cube_for_ranks(config: TrainConfig, ranks: Ranks, checkpoint_dir: Path, output_dir: Path,
                    progress: bool) -> str:
    """Rank 0 checks the outputs and ingests a raster folder once; the others wait and
    stop with rank 0's message if it failed. Returns the cube's path."""
    outcome = None
    if ranks.is_main:
        try:
            check_writable(checkpoint_dir, "--checkpoint_dir")
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
    train_issues = issues["train"]
    if config.max_train_windows:
        train_issues = train_issues[:: max(1, len(train_issues) // config.max_train_windows)]
    if resume_state is not None:
        Checkpoint(resume_state).check_grid(grid, f"--resume {config.resume}", str(store))
    train_set = WindowSampler(store, train_issues, spec, resume_state["norm_stats"] if resume_state else {},
                              patch=config.patch, shuffle=True, seed=config.seed,
                              storage_options=config.storage_options, maps=maps)
    # a new run's statistics come from the read its first epoch needs anyway, where the cube allows
    stats = train_set.stats if resume_state is not None else train_set.fit_stats(splits["train"])
    val_set = WindowSampler(store, issues["val"], spec, stats, patch=None, shuffle=False,
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
               _objective(model)(stats[TARGET]),
               ds[TARGET].attrs.get("units", "kg m-2"), checkpoint_dir, output_dir, progress and ranks.is_main)
    run.log(Checkpoint(record).inputs_note({v: ds[v].attrs.get("long_name", "") for v in ds.data_vars}))
    run.last_path = checkpoint_dir / "model_epoch0.pth"
    if config.probabilistic and config.calibration == "brier":
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
            totals[0] += train_step(run.net, run.optimiser, run.scaler, x, y, mask, config.precision,
                                    config.clip_grad, forcings, run.loss, run.model.config.quantile_location)
            if run.averaged is not None:
                run.averaged.update_parameters(run.model)
            totals[1] += 1
            totals[2] += x.shape[0]
            seen.append(issue)
            bar.update(x.shape[0])
    bar.close()
    totals[3] += waited_s
    loss_sum, steps, samples, wait = ranks.sum(totals).tolist()  # also waits for the queued steps
    elapsed = time.perf_counter() - started
    return {"train_loss": loss_sum / max(steps, 1), "samples_per_s": samples / elapsed if elapsed > 0 else 0.0,
            "data_wait": wait / ranks.world_size / elapsed if elapsed > 0 else 0.0,
            "windows": ranks.gather(torch.cat(seen).tolist() if seen else [])}


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
        (config.kernel_size % 2 == 1 and config.kernel_size >= 1, "--kernel_size", config.kernel_size,
         "must be odd (1, 3, 5...)"),
        (bool(config.hidden_channels) and min(config.hidden_channels) >= 1, "--hidden_channels",
         config.hidden_channels, "must be >= 1"),
        (config.num_layers >= 1, "--num_layers", config.num_layers, "must be >= 1"),
        (config.lr > 0, "--lr", config.lr, "must be > 0"),
        (config.patience >= 1, "--patience", config.patience, "must be >= 1"),
        (0 <= config.ema_decay < 1, "--ema_decay", config.ema_decay, "must be in [0, 1): 0 for no averaging"),
        (config.patch >= 4, "--patch", config.patch, "must be >= 4 pixels"),
        (config.num_workers >= 0, "--num_workers", config.num_workers, "must be >= 0"),
        (config.calibration in CALIBRATIONS, "--calibration", config.calibration, f"must be one of {CALIBRATIONS}"),
    ]
    for ok, option, value, why in checks:
        if not ok:
            raise RunoffError(f"{option} {value}: {why}")
    if TARGET in config.forcings:
        raise RunoffError(f"--forcings {','.join(config.forcings)}: {TARGET} is the forecast itself, not a forcing")
    both = sorted(set(config.forcings) & set(config.covariates))
    if both:
        raise RunoffError(f"--forcings / --covariates: {','.join(both)} named in both; a variable is either a "
                          f"past input (--covariates) or known on the lead days (--forcings)")
    if len(config.hidden_channels) == 1:
        config.hidden_channels = config.hidden_channels * config.num_layers
    elif config.num_layers not in (1, len(config.hidden_channels)):
        raise RunoffError(f"--hidden_channels {config.hidden_channels}: give one size or one per layer "
                          f"(--num_layers {config.num_layers})")
    config.num_layers = len(config.hidden_channels)


if __name__ == "__main__":  # ``python -m pipeline.train ...`` (and torchrun) runs ``runoff train ...``
    from pipeline.__main__ import main

    sys.exit(main(["train", *sys.argv[1:]]))
