"""Calibrate a trained probabilistic model after training and before ``best.pth`` is written.
First, on the training windows, how far the quantiles below their centre must widen
(:func:`fit_lower_spread`: the fit leaves that side too narrow on the very days it was
fitted on, where those are few). Then, on held-out windows (the validation split): the
spread of its quantiles per lead (:func:`calibrate_spread`, always), optionally the levels
its quantiles are read at, per lead and flow class (:func:`calibrate_levels`, ``runoff
train --calibrate_levels``), optionally where a located model's quantiles sit per lead:
where they are, or moved to the mean of its MSE-trained centre (:func:`choose_locations`,
``--calibrate_location``), and then which single map stands for its distribution, the
mean or the median of the quantiles, one choice for every lead (:func:`choose_point_maps`,
always). Each step streams over a DataLoader's batches and combines the sums of
data-parallel ranks, so it costs one inference pass over the split, not memory for it.
The spread is scored on at most :data:`CALIBRATION_PIXELS` pixels of a map (a regular
lattice of a larger one), so that its 26 trial factors cost little beside that pass on a
large grid; the levels cost about one pass more and are fitted on every pixel. Their batch
loop, :func:`model_outputs`, is also the one the trainer validates with (on every pixel).

:func:`calibrate_model` does these steps on the held-out windows in place; ``runoff
calibrate`` (:mod:`pipeline.recalibrate`) does them again on a trained checkpoint, over a
period of the user's choice. A model trained with ``--forcing_error`` is calibrated with
that error on its forcings (:mod:`pipeline.forcing_error`): the spread of forecasts made
with forecast rain.

Example
-------
>>> calibrate_model(model, val_loader, torch.device("cpu"), stats, levels=True)   # doctest: +SKIP
['median', 'median', 'median', 'median', 'median', 'median']
>>> model.spread_scale, len(model.config.level_calibration)                      # doctest: +SKIP
(tensor([0.8000, 0.9000, 1.0000, 1.0000, 1.0000, 1.1000]), 6)
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, contextmanager
from typing import Iterator

import torch
from torch.utils.data import DataLoader

from .checkpoint import POINT_MAPS
from .device import accumulator_dtype, autocast_for, loader_batches
from .distributed import Ranks
from .forcing_error import ForcingError
from .model import (TILE, ConvLSTMForecaster, map_passes, moved_to_centre, pinball, pinball_per_level,
                    quantile_levels, quantiles_median, to_physical, widen_below)
from .verify import spread_skill_ratio


CALIBRATION_PIXELS = 2**16  # pixels per map the spread is scored on: a 256x256 map, or a lattice of a larger one


def pixel_stride(height: int, width: int, max_pixels: int | None) -> int:
    """The step between the rows and columns kept of a ``height`` x ``width`` map so that
    at most ``max_pixels`` are kept (1: every pixel, also for ``None``).

    >>> pixel_stride(256, 256, 2**16), pixel_stride(1200, 1600, 2**16), pixel_stride(1200, 1600, None)
    (1, 6, 1)
    """
    if max_pixels is None:
        return 1
    stride = max(1, math.isqrt(max(height * width - 1, 0) // max_pixels))
    while -(-height // stride) * -(-width // stride) > max_pixels:
        stride += 1
    return stride


def model_outputs(model: ConvLSTMForecaster, loader: DataLoader, device: torch.device, precision: str = "auto",
                  with_centre: bool = False, max_pixels: int | None = None, forcing_error: ForcingError | None = None
                  ) -> Iterator[tuple[torch.Tensor, ...]]:
    """The model's output on each of ``loader``'s batches, in ``precision``: yields the
    batch's inputs, targets and mask on ``device``, and that output. Maps wider than
    :data:`~pipeline.model.TILE` come piece by piece (:func:`~pipeline.model.map_passes`,
    each piece's exact core), and a batch whose pieces hold more than
    :data:`~pipeline.model.PASS_PIXELS` pixels in fewer windows at a time, so that memory
    is bounded by one pass, not a batch of whole maps: every consumer sums over pixels.
    With ``max_pixels``, a map larger than that yields only a regular lattice of its pixels
    (every :func:`pixel_stride`-th row and column of the map, from the first, in each
    piece's core), for scores whose cost per pixel exceeds the forward pass's. The forcings
    pass through ``forcing_error`` first where one is given (:func:`~pipeline.forcing_error.window_errors`).
    Run it under ``torch.no_grad()``: it scores, it does not train."""
    for batch in loader_batches(loader, device):
        x, y, mask, forcings = (t.to(device, non_blocking=True) for t in (batch.x, batch.y, batch.mask,
                                                                        batch.forcings))
        if forcing_error is not None:
            forcings = forcing_error(forcings, batch.issue)
        margin = model.receptive_radius(x.shape[1])
        stride = pixel_stride(*x.shape[-2:], max_pixels)
        # a model that sees farther than a quarter of TILE gets larger pieces, not an error
        for windows, piece in map_passes(x.shape[0], *x.shape[-2:], max(TILE, 4 * margin), margin):
            region, core, inside = ((Ellipsis, *cut) for cut in piece)
            with autocast_for(device, precision):
                out = model(x[windows][region], forcings[windows][region], with_centre=with_centre)
            # the map's lattice (rows and columns 0, stride, 2 stride, ..) wherever the core starts
            kept = (Ellipsis, *(slice(-cut.start % stride, None, stride) for cut in piece.core))
            yield (x[windows][core][kept], y[windows][core][kept], mask[windows][core][kept],
                   out[inside][kept])


def _rescaled(model: ConvLSTMForecaster, centre: torch.Tensor, deviations: torch.Tensor, factor: torch.Tensor,
              stats: dict[str, float]) -> torch.Tensor:
    """Quantiles at ``deviations`` from their ``centre`` (normalised) times ``factor``, bounded
    as the model bounds them, in data units and clipped at 0: what forward gives at that factor."""
    return to_physical(model.clamp_to_ceiling(centre + factor * deviations), stats).clamp(min=0)


SPREAD_FACTORS = tuple(round(0.5 + 0.1 * k, 1) for k in range(26))  # 0.5 .. 3.0, tried per lead
CRPS_TOLERANCE = 0.01  # factors within 1% of the best validation CRPS count as equally good
CALIBRATIONS = ("spread_skill", "brier")  # the tie-breaks of calibrate_spread


def calibrate_spread(model: ConvLSTMForecaster, loader: DataLoader, device: torch.device,
                     stats: dict[str, float], ranks: Ranks = Ranks(), precision: str = "auto",
                     rule: str = "spread_skill", thresholds: tuple[float, ...] = (),
                     max_pixels: int | None = CALIBRATION_PIXELS, forcing_error: ForcingError | None = None
                     ) -> torch.Tensor:
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
      so that those probabilities are as reliable as the validation days can make them.

    Each factor is scored on every pixel kept, so a map larger than ``max_pixels`` is scored
    on a regular lattice of that many (:func:`model_outputs`); ``None`` scores every pixel.
    With ``forcing_error``, the windows' forcings carry that error (a model that will forecast
    with rain forecasts gets the spread of such forecasts)."""
    if rule not in CALIBRATIONS or (rule == "brier" and not thresholds):
        raise ValueError(f"rule {rule!r} with thresholds {thresholds}: one of {CALIBRATIONS}, brier with thresholds")
    model.eval()
    factors = torch.tensor(SPREAD_FACTORS, device=device).view(-1, 1, 1, 1, 1)
    # per factor and lead: pinball sum, members' variance sum, squared error of their mean,
    # then the Brier sum at each threshold
    sums = torch.zeros(3 + len(thresholds), len(SPREAD_FACTORS), model.config.leads,
                       dtype=accumulator_dtype(device), device=device)
    # the quantiles as trained, their lower side widened, rescaled, then bounded: what forward
    # gives at each factor
    with torch.no_grad(), model.unbounded(), _lower_side_as_trained(model) as lower:
        for _, y, mask, q in model_outputs(model, loader, device, precision, max_pixels=max_pixels,
                                           forcing_error=forcing_error):
            q = q.float()
            centre, truth, m = q.mean(dim=2, keepdim=True), to_physical(y, stats), mask.float()
            deviations = widen_below(q - centre, lower)
            for i, factor in enumerate(factors):
                values = _rescaled(model, centre, deviations, factor, stats)
                mean = values.mean(dim=2, keepdim=True)
                briers = [brier_per_pixel(values, truth, thr) for thr in thresholds]
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


LOWER_FACTORS = tuple(round(1.0 + 0.1 * k, 1) for k in range(31))  # 1.0 .. 4.0, tried per lead


@contextmanager
def _buffer_at(buffer: torch.Tensor, value: float) -> Iterator[torch.Tensor]:
    """Inside the block every entry of a model's ``buffer`` is ``value``; yields what it held,
    put back after."""
    fitted = buffer.clone()
    buffer.fill_(value)
    try:
        yield fitted
    finally:
        buffer.copy_(fitted)


def _lower_side_as_trained(model: ConvLSTMForecaster) -> AbstractContextManager[torch.Tensor]:
    """Inside the block ``model``'s quantiles keep their lower side as trained (``lower_spread``
    1), so that their mean is their centre; yields the factors it had, put back after."""
    return _buffer_at(model.lower_spread, 1.0)


def brier_per_pixel(values: torch.Tensor, truth: torch.Tensor, threshold: float) -> torch.Tensor:
    """The Brier score of ``P(X > threshold)`` read off quantiles ``values`` (..., Q, H, W) as
    the share above it, against ``truth`` (..., 1, H, W), both in data units: (..., 1, H, W)."""
    return ((values > threshold).float().mean(dim=-3, keepdim=True) - (truth > threshold).float()) ** 2


def fit_lower_spread(model: ConvLSTMForecaster, loader: DataLoader, device: torch.device,
                     stats: dict[str, float], ranks: Ranks = Ranks(), precision: str = "auto",
                     max_pixels: int | None = CALIBRATION_PIXELS, forcing_error: ForcingError | None = None
                     ) -> torch.Tensor:
    """A probabilistic model's ``lower_spread``, per lead: the factor of ``LOWER_FACTORS`` on
    the quantiles below their centre (in the model's log space) that minimises their pinball
    loss in data units on ``loader``'s windows, meant to be the training windows.

    The pinball loss in data units weighs a pixel by the size of its flow, so a short record
    fits the lower side of its small flows loosely: on the CWatM sample the truth fell below
    the wet cells' lowest quantile 18-28% of the time on the training days, not 2.5%, and
    widening that side alone lowered the test CRPS at every lead (docs/skill.md, "The
    quantiles below the centre widened"). Where the training days ask for no widening, the factor is 1: they cannot
    say that a side is too wide for new days. Scored as :func:`calibrate_spread` scores (a
    lattice of ``max_pixels`` per map, the forcings with ``forcing_error``), with the spread
    the model has."""
    model.eval()
    factors = torch.tensor(LOWER_FACTORS, device=device)
    sums = torch.zeros(len(LOWER_FACTORS), model.config.leads, dtype=accumulator_dtype(device), device=device)
    with torch.no_grad(), model.unbounded(), _lower_side_as_trained(model):
        for _, y, mask, q in model_outputs(model, loader, device, precision, max_pixels=max_pixels,
                                           forcing_error=forcing_error):
            q = q.float()
            centre, truth = q.mean(dim=2, keepdim=True), to_physical(y, stats)
            below = (q < centre).float() * mask.float()  # the quantiles a factor moves
            for i, factor in enumerate(factors):
                loss = pinball_per_level(_rescaled(model, centre, q - centre, factor, stats), truth) * below
                sums[i] += loss.sum(dim=(0, 2, 3, 4)).to(sums.dtype)
    return factors[ranks.sum(sums).argmin(dim=0)].to(model.lower_spread.dtype)


def calibrate_model(model: ConvLSTMForecaster, loader: DataLoader, device: torch.device,
                    stats: dict[str, float], ranks: Ranks = Ranks(), precision: str = "auto",
                    rule: str = "spread_skill", thresholds: tuple[float, ...] = (), levels: bool = False,
                    location: bool = False, max_pixels: int | None = CALIBRATION_PIXELS,
                    forcing_error: ForcingError | None = None) -> list[str]:
    """Calibrate a probabilistic model in place on ``loader``'s windows, from its quantiles as
    trained (spread 1, no levels, whatever an earlier calibration set; the lower side as
    :func:`fit_lower_spread` widened it on the training days, kept): its spread per lead
    (:func:`calibrate_spread` with ``rule``), then with ``levels`` its levels per lead and flow
    class (:func:`calibrate_levels`, fitted on the calibrated spread), and with ``location``
    (a located model, scored at ``thresholds``) where its quantiles sit per lead
    (:func:`choose_locations`; ``rule`` ``brier`` scores the spread at the thresholds too).
    The spread is scored on at most ``max_pixels`` pixels of each map, the levels and the
    location on every pixel; all on forcings with ``forcing_error`` where one is given.
    Returns the single map per lead of the calibrated quantiles (:func:`choose_point_maps`,
    on the same windows and forcings), for the checkpoint's ``point_maps``."""
    model.spread_scale.fill_(1.0)
    model.mean_at_centre.fill_(0.0)
    model.set_level_calibration([])
    model.spread_scale.copy_(calibrate_spread(model, loader, device, stats, ranks, precision, rule,
                                              thresholds if rule == "brier" else (), max_pixels, forcing_error))
    if levels:
        model.set_level_calibration(calibrate_levels(model, loader, device, stats, ranks, precision, forcing_error))
    if location:
        if not (model.config.quantile_location and thresholds):
            raise ValueError("location: needs a located model (quantile_location) and thresholds to score at")
        model.mean_at_centre.copy_(choose_locations(model, loader, device, stats, thresholds, ranks, precision,
                                                    forcing_error))
    return choose_point_maps(model, loader, device, stats, ranks, precision, forcing_error)


def choose_locations(model: ConvLSTMForecaster, loader: DataLoader, device: torch.device,
                     stats: dict[str, float], thresholds: tuple[float, ...], ranks: Ranks = Ranks(),
                     precision: str = "auto", forcing_error: ForcingError | None = None) -> torch.Tensor:
    """A located model's ``mean_at_centre``, per lead: 1 where its quantiles moved so that
    their mean is the centre's (:func:`~pipeline.model.moved_to_centre`) score better on
    ``loader``'s windows than the quantiles where they are by all three of: the Brier score
    of ``P(X > threshold)`` summed over ``thresholds`` (the wet p90 and p99 of the training
    split), the CRPS, and the squared error of the quantiles' mean; else 0.

    The exceedance maps lead, since the CRPS alone would move every lead: on world 0's river
    record the move lowered the CRPS at every lead of the calibration years and made the p99
    maps of leads 2-6 less reliable on the test years, and the Brier score chose lead 1
    alone, where it mended the p99. The CRPS and the mean's error must agree, so that a lead
    whose centre is the worse map is not moved for its exceedance maps alone: on CWatM the
    Brier score of 20 validation days alone moved leads whose test CRPS and median it made
    worse. Even so, on short calibration splits it did harm as often as good, hence an
    option (docs/skill.md, "Where the largest flows' quantiles sit"). Scored on every pixel,
    the forcings with ``forcing_error`` where one is given, with the calibrated spread."""
    model.eval()
    # per score (Brier sum, pinball, squared error of the mean), as they are and moved, per lead
    sums = torch.zeros(3, 2, model.config.leads, dtype=accumulator_dtype(device), device=device)
    with torch.no_grad(), _buffer_at(model.mean_at_centre, 0.0):  # the quantiles where they are
        for _, y, mask, out in model_outputs(model, loader, device, precision, with_centre=True,
                                             forcing_error=forcing_error):
            out = out.float()
            centre, quantiles = out[:, :, :1], out[:, :, 1:]
            moved = model.clamp_to_ceiling(moved_to_centre(quantiles, centre, stats))
            truth, m = to_physical(y, stats), mask.float()
            for k, values in enumerate((quantiles, moved)):
                values = to_physical(values, stats).clamp(min=0)
                briers = sum(brier_per_pixel(values, truth, thr) for thr in thresholds)
                error = (values.mean(dim=2, keepdim=True) - truth) ** 2
                for score, per_pixel in enumerate((briers, pinball(values, truth), error)):
                    sums[score, k] += (per_pixel * m).sum(dim=(0, 2, 3, 4)).to(sums.dtype)
    kept, moved = ranks.sum(sums).unbind(dim=1)
    return (moved < kept).all(dim=0).to(model.mean_at_centre.dtype)


MEDIAN_GAIN = 0.05  # the median stands for the distribution where its validation MSE is 5% below the mean's


def choose_point_maps(model: ConvLSTMForecaster, loader: DataLoader, device: torch.device,
                      stats: dict[str, float], ranks: Ranks = Ranks(), precision: str = "auto",
                      forcing_error: ForcingError | None = None) -> list[str]:
    """A probabilistic model's single map, one of :data:`~pipeline.checkpoint.POINT_MAPS`, the
    same at every lead: ``"median"`` of its quantiles where, on ``loader``'s windows (every
    valid pixel of every lead, in data units, the forcings with ``forcing_error`` where one is
    given), the median's squared error is at least ``MEDIAN_GAIN`` below the mean's; else
    ``"mean"``. Returned per lead, as the checkpoint's ``point_maps`` holds it.

    The mean of a distribution that is right minimises the expected squared error. Given a
    rain forecast, CWatM's quantiles reach too far up, and their median's MSE was up to half
    their mean's; on the synthetic river the mean is the better map (docs/skill.md, "The
    checkpoint picks its single map"). One choice from all leads' errors, because the few
    validation days of a short record cannot choose lead by lead: on CWatM the choice at
    lead 1 went the other way on the test days (same section). The margin keeps the mean
    where the split cannot tell the two apart."""
    model.eval()
    sums = torch.zeros(len(POINT_MAPS), dtype=accumulator_dtype(device), device=device)
    with torch.no_grad():
        for _, y, mask, q in model_outputs(model, loader, device, precision, forcing_error=forcing_error):
            values, truth, m = to_physical(q, stats).clamp(min=0), to_physical(y, stats), mask.float()
            for k, point in enumerate((values.mean(dim=2), quantiles_median(values))):
                sums[k] += (((point.unsqueeze(2) - truth) ** 2) * m).sum().to(sums.dtype)
    mean_sse, median_sse = ranks.sum(sums).tolist()
    return [POINT_MAPS[1] if median_sse < (1 - MEDIAN_GAIN) * mean_sse else POINT_MAPS[0]] * model.config.leads


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
                     stats: dict[str, float], ranks: Ranks = Ranks(), precision: str = "auto",
                     forcing_error: ForcingError | None = None) -> list[dict]:
    """A probabilistic model's level calibration, per lead (see
    :meth:`~pipeline.model.ConvLSTMForecaster.set_level_calibration`), fitted on ``loader``'s
    windows: the pixels are put in classes by the median of their quantiles (edges at
    ``LEVEL_CLASS_SHARES`` of the pixels), and each class's quantiles are read at the levels
    where the truth's PIT over that class reached the nominal ones (Kuleshov et al. 2018, per
    class). So a class whose truth lies above its median more often than half the time has
    its quantiles read higher. Streamed: per lead, a histogram of the medians, each bin with
    the PIT distribution of its pixels; under data-parallel training the ranks' sums are
    combined. ``forcing_error`` as in :func:`calibrate_spread`."""
    model.eval()
    q, leads = model.config.quantiles, model.config.leads
    dry = -stats["mean"] / stats["std"]  # a value of 0 in the model's normalised space
    edges = dry + torch.linspace(0, _MEDIAN_SPAN, _MEDIAN_BINS + 1, device=device)[1:-1]
    grid = torch.linspace(0, 1, _PIT_GRID, device=device)
    # per lead and median bin: the PIT CDF summed over its pixels at each grid point, then the medians' sum
    sums = torch.zeros(leads * _MEDIAN_BINS, _PIT_GRID + 1, dtype=accumulator_dtype(device), device=device)
    with torch.no_grad():
        for _, y, mask, quantiles in model_outputs(model, loader, device, precision, forcing_error=forcing_error):
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
