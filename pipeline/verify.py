"""Verification metrics as streaming accumulators, on valid pixels only (where both the
forecast and the truth are finite). Imports nothing else of the package.

Each score keeps sums, not maps: ``accumulate`` a forecast and its truth (one map or a
stack), ``merge`` two accumulators (e.g. of two ranks or two halves), ``compute`` the
scores. Memory does not grow with the number of maps (the pysteps verification habit).

- :class:`ContinuousScores`: MSE, RMSE, MAE, bias, NSE, KGE, pooled over pixels and maps.
- :class:`EventScores`: CSI, POD, FAR at thresholds, and the fractions skill score (FSS)
  over square neighbourhoods of given sizes.
- :class:`PixelScores`: per-pixel NSE and KGE maps over the time axis.
- :class:`ScoreTable`: all of the above for one forecast source.
- :func:`area_means`: the (area-weighted) means of maps over the pixels valid in all of
  them, to score a basin's mean as a series.
- :class:`EnsembleScores`: CRPS, spread/skill, rank histogram, and Brier score and
  reliability at thresholds, of an ensemble (members, or the quantiles of a probabilistic
  forecast taken as equally likely members).
- :class:`ChanceReliability`: how wide the same ensemble's reliability gaps would be by
  chance alone, were it calibrated (it keeps a few bytes per pixel of every map, unlike
  the others).

The functions :func:`mse`, :func:`nse`, :func:`kge`, :func:`contingency`, :func:`fss`,
:func:`nse_map`, :func:`kge_map`, :func:`crps`... are one-shot shortcuts over the same accumulators.

>>> import numpy as np
>>> truth = np.array([1.0, 2.0, 3.0, np.nan]); pred = np.array([1.0, 2.0, 4.0, 9.0])
>>> mse(pred, truth), nse(pred, truth)
(0.3333333333333333, 0.5)
>>> halves = ContinuousScores().accumulate(pred[:2], truth[:2])
>>> halves.merge(ContinuousScores().accumulate(pred[2:], truth[2:])).compute()["mse"]
0.3333333333333333
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.ndimage import uniform_filter

FSS_SCALES = (1, 3, 9, 27)
_NAN = float("nan")


def _valid(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, truth = np.asarray(pred, np.float64), np.asarray(truth, np.float64)
    ok = np.isfinite(pred) & np.isfinite(truth)
    return pred[ok], truth[ok]


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b > 0 else _NAN


class _Moments:
    """Count, means, centred second moments and co-moment of forecast ``p`` and truth ``t``,
    merged as Chan et al. do (no cancellation from raw sums of squares). Arrays of any
    shape: scalars for pooled scores, (H, W) for per-pixel maps."""

    def __init__(self, shape: tuple[int, ...] = ()) -> None:
        self.n, self.mp, self.mt, self.m2p, self.m2t, self.cpt = (np.zeros(shape) for _ in range(6))

    def add(self, n, mp, mt, m2p, m2t, cpt) -> None:
        total = self.n + n
        with np.errstate(invalid="ignore", divide="ignore"):
            share = np.where(total > 0, n / np.where(total > 0, total, 1), 0.0)
        dp, dt_ = mp - self.mp, mt - self.mt
        self.m2p = self.m2p + m2p + dp * dp * self.n * share
        self.m2t = self.m2t + m2t + dt_ * dt_ * self.n * share
        self.cpt = self.cpt + cpt + dp * dt_ * self.n * share
        self.mp, self.mt, self.n = self.mp + dp * share, self.mt + dt_ * share, total

    def merge(self, other: "_Moments") -> None:
        self.add(other.n, other.mp, other.mt, other.m2p, other.m2t, other.cpt)

    def kge(self) -> np.ndarray:
        """KGE where defined (>= 2 values, truth with variance and a non-zero mean), else NaN."""
        with np.errstate(invalid="ignore", divide="ignore"):
            r = np.where(self.m2p > 0, self.cpt / np.sqrt(self.m2p * self.m2t), 0.0)
            out = 1 - np.sqrt((r - 1) ** 2 + (np.sqrt(self.m2p / self.m2t) - 1) ** 2 + (self.mp / self.mt - 1) ** 2)
        return np.where((self.n > 1) & (self.m2t > 0) & (self.mt != 0), out, np.nan)


class ContinuousScores:
    """Pooled continuous scores from error sums and merged moments (float64)."""

    def __init__(self) -> None:
        self.errors = np.zeros(4)  # n, sum of squared, absolute and signed errors
        self.moments = _Moments()

    def accumulate(self, pred: np.ndarray, truth: np.ndarray) -> "ContinuousScores":
        """Add the valid pixels of ``pred`` against ``truth`` (any equal shapes)."""
        p, t = _valid(pred, truth)
        if p.size:
            e = p - t
            self.errors += (p.size, e @ e, np.abs(e).sum(), e.sum())
            dp, dt_ = p - p.mean(), t - t.mean()
            self.moments.add(p.size, p.mean(), t.mean(), dp @ dp, dt_ @ dt_, dp @ dt_)
        return self

    def merge(self, other: "ContinuousScores") -> "ContinuousScores":
        self.errors += other.errors
        self.moments.merge(other.moments)
        return self

    def compute(self) -> dict[str, float]:
        """``mse``, ``rmse``, ``mae``, ``bias``, ``nse``, ``kge`` (NaN where undefined)."""
        n, sse, sae, se = self.errors
        if n == 0:
            return dict.fromkeys(("mse", "rmse", "mae", "bias", "nse", "kge"), _NAN)
        m2t = float(self.moments.m2t)
        return {"mse": float(sse / n), "rmse": float(np.sqrt(sse / n)), "mae": float(sae / n),
                "bias": float(se / n), "nse": float(1 - sse / m2t) if m2t > 0 else _NAN,
                "kge": float(self.moments.kge())}


class EventScores:
    """Contingency counts (hits, misses, false alarms) at each threshold, and the FSS
    numerator and denominator at each threshold and neighbourhood size, for the event
    ``value >= threshold``. Pixels invalid in either map count as no event for the FSS."""

    def __init__(self, thresholds: Sequence[float], scales: Sequence[int] = FSS_SCALES) -> None:
        self.thresholds, self.scales = [float(t) for t in thresholds], [int(s) for s in scales]
        self.counts = np.zeros((len(self.thresholds), 3))
        self.fractions = np.zeros((len(self.thresholds), len(self.scales), 2))

    def accumulate(self, pred: np.ndarray, truth: np.ndarray) -> "EventScores":
        """Add one map (H, W) or a stack of maps (N, H, W)."""
        pred, truth = np.asarray(pred, np.float64), np.asarray(truth, np.float64)
        pred, truth = pred.reshape((-1,) + pred.shape[-2:]), truth.reshape((-1,) + truth.shape[-2:])
        ok = np.isfinite(pred) & np.isfinite(truth)
        for i, thr in enumerate(self.thresholds):
            fc, ob = (pred >= thr) & ok, (truth >= thr) & ok
            self.counts[i] += (np.sum(fc & ob), np.sum(~fc & ob), np.sum(fc & ~ob))
            for j, scale in enumerate(self.scales):
                for p, t in zip(fc.astype(np.float64), ob.astype(np.float64)):
                    fp = uniform_filter(p, size=scale, mode="constant")
                    ft = uniform_filter(t, size=scale, mode="constant")
                    self.fractions[i, j] += (np.sum((fp - ft) ** 2), np.sum(fp ** 2) + np.sum(ft ** 2))
        return self

    def merge(self, other: "EventScores") -> "EventScores":
        self.counts += other.counts
        self.fractions += other.fractions
        return self

    def compute(self) -> dict[str, float]:
        """``csi@{thr}``, ``pod@{thr}``, ``far@{thr}`` and ``fss{scale}@{thr}`` (thr to 3 digits)."""
        row = {}
        for i, thr in enumerate(self.thresholds):
            hits, misses, false_alarms = self.counts[i]
            row[f"csi@{thr:.3g}"] = _ratio(hits, hits + misses + false_alarms)
            row[f"pod@{thr:.3g}"] = _ratio(hits, hits + misses)
            row[f"far@{thr:.3g}"] = _ratio(false_alarms, hits + false_alarms)
            for j, scale in enumerate(self.scales):
                num, den = self.fractions[i, j]
                row[f"fss{scale}@{thr:.3g}"] = float(1 - num / den) if den > 0 else _NAN
        return row


class PixelScores:
    """Per-pixel sums and moments over the time axis, for NSE and KGE maps of shape (H, W)."""

    def __init__(self, shape: tuple[int, int]) -> None:
        self.sse = np.zeros(shape)
        self.moments = _Moments(tuple(shape))

    def accumulate(self, pred: np.ndarray, truth: np.ndarray) -> "PixelScores":
        """Add one map (H, W) or a stack (N, H, W)."""
        pred, truth = np.asarray(pred, np.float64), np.asarray(truth, np.float64)
        pred, truth = pred.reshape((-1,) + pred.shape[-2:]), truth.reshape((-1,) + truth.shape[-2:])
        ok = np.isfinite(pred) & np.isfinite(truth)
        n = ok.sum(axis=0)
        p, t = np.where(ok, pred, 0.0), np.where(ok, truth, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mp, mt = np.where(n > 0, p.sum(axis=0) / n, 0.0), np.where(n > 0, t.sum(axis=0) / n, 0.0)
        dp, dt_ = np.where(ok, p - mp, 0.0), np.where(ok, t - mt, 0.0)
        self.sse += ((p - t) ** 2).sum(axis=0)
        self.moments.add(n, mp, mt, (dp * dp).sum(axis=0), (dt_ * dt_).sum(axis=0), (dp * dt_).sum(axis=0))
        return self

    def merge(self, other: "PixelScores") -> "PixelScores":
        self.sse += other.sse
        self.moments.merge(other.moments)
        return self

    def compute(self) -> dict[str, np.ndarray]:
        """``nse`` and ``kge`` maps, float32, NaN where a pixel has < 2 values or no variance."""
        m = self.moments
        with np.errstate(invalid="ignore", divide="ignore"):
            nse_map_ = np.where((m.n > 1) & (m.m2t > 0), 1 - self.sse / m.m2t, np.nan)
        return {"nse": nse_map_.astype(np.float32), "kge": m.kge().astype(np.float32)}


class ScoreTable:
    """Every pooled score of one forecast source: continuous and event scores."""

    def __init__(self, thresholds: Sequence[float], scales: Sequence[int] = FSS_SCALES) -> None:
        self.continuous, self.events = ContinuousScores(), EventScores(thresholds, scales)

    def accumulate(self, pred: np.ndarray, truth: np.ndarray) -> "ScoreTable":
        self.continuous.accumulate(pred, truth)
        self.events.accumulate(pred, truth)
        return self

    def merge(self, other: "ScoreTable") -> "ScoreTable":
        self.continuous.merge(other.continuous)
        self.events.merge(other.events)
        return self

    def compute(self) -> dict[str, float]:
        return {**self.continuous.compute(), **self.events.compute()}


def area_means(maps: Sequence[np.ndarray], weights: np.ndarray | None = None) -> np.ndarray:
    """The means of several maps (H, W), each weighted by ``weights`` (relative cell areas;
    equal if None), over the pixels where every map is finite: one value per map, all over
    the same area (NaN where no pixel is). Scored with :class:`ContinuousScores`, the series
    of a basin's mean runoff gives the scores hydrologists compute on a catchment's totals.

    >>> area_means([np.array([[1.0, np.nan, 2.0]]), np.array([[3.0, 5.0, 6.0]])], np.array([[1.0, 1.0, 3.0]]))
    array([1.75, 5.25])
    """
    stack = np.asarray(maps, np.float64).reshape(len(maps), -1)
    ok = np.isfinite(stack).all(axis=0)
    w = np.where(ok, 1.0 if weights is None else np.asarray(weights, np.float64).ravel(), 0.0)
    total = w.sum()
    if total <= 0:
        return np.full(len(stack), _NAN)
    return np.where(ok, stack, 0.0) @ w / total


# --- one-shot shortcuts -------------------------------------------------------------------

RELIABILITY_BINS = 10
RELIABILITY_RESAMPLES = 200  # Poisson-bootstrap replicates behind the reliability band
RELIABILITY_MIN_COUNT = 100  # the fewest pixels a bin needs to count in the reliability gap
PIXELS_PER_PASS = 2**16  # pixels EnsembleScores scores at once: ~0.1 GB of work arrays, and faster than more (cache)
# the rows of a reliability table, as metrics.json names them
RELIABILITY_ROWS = ("count", "forecast_probability", "observed_frequency", "observed_frequency_5",
                    "observed_frequency_95")


class EnsembleScores:
    """Scores of an ensemble forecast ``members`` (M, ...) against ``truth`` (...), pooled
    over valid pixels (every member and the truth finite):

    * ``crps``: the continuous ranked probability score of the members' empirical
      distribution, ``mean|X - y| - mean|X - X'| / 2`` (in data units; 0 is perfect);
    * ``spread_skill``: ``sqrt((M + 1) / M * mean variance) / RMSE of the ensemble mean``
      (1 for a reliable ensemble, below 1 when it is too narrow);
    * ``rank_histogram``: where the truth falls among the sorted members (ties, such as a
      dry truth among dry members, share their ranks at random), M + 1 counts;
    * at each threshold: the Brier score ``brier@{thr}`` of the probability ``P(X > thr)``
      and the reliability table (forecast probability in ``RELIABILITY_BINS`` bins: count,
      mean probability, observed frequency, and the 5-95% band of that frequency), summed
      up by its largest distance from the diagonal ``reliability_gap@{thr}`` and the
      largest part of a distance outside the band ``reliability_gap_beyond_band@{thr}``
      (over the bins of at least ``RELIABILITY_MIN_COUNT`` pixels; see :func:`reliability_gap`).

    The band is how far the observed frequency moves when the maps are resampled (a
    Poisson bootstrap, streamed: each ``accumulate`` call draws its weight in every
    replicate). Pixels of one map are not independent, so pass one map (one issue day and
    lead) per call: the band then treats days as the independent units, and is wider
    than a count of pixels alone would suggest. Consecutive days are not independent
    either (a river recedes over weeks): maps given the same ``block`` share their weights,
    so that a block of days is resampled as one (a block bootstrap). The weights of a block
    depend only on ``seed`` and the block, so accumulators that saw parts of one block
    (ranks of a data-parallel run) merge into the same band.

    >>> truth = np.array([0.0, 1.0, 4.0])
    >>> members = np.array([[0.0, 0.0, 3.0], [0.0, 2.0, 5.0]])
    >>> round(EnsembleScores([2.0]).accumulate(members, truth).compute()["crps"], 4)
    0.3333
    """

    def __init__(self, thresholds: Sequence[float] = (), seed: int = 0) -> None:
        self.thresholds = [float(t) for t in thresholds]
        self.count = 0
        self.crps_sum = self.variance_sum = self.error_sum = 0.0
        self.members: int | None = None
        self.ranks: np.ndarray | None = None
        self.brier = np.zeros(len(self.thresholds))
        self.bins = np.zeros((len(self.thresholds), 3, RELIABILITY_BINS))  # count, sum p, sum observed
        # per threshold, the count and the observed sum of each bin in each bootstrap replicate
        self.resampled = np.zeros((len(self.thresholds), 2, RELIABILITY_RESAMPLES, RELIABILITY_BINS))
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        self._resample_rng = np.random.default_rng([seed, 1])  # its own stream: ranks stay as they were

    def accumulate(self, members: np.ndarray, truth: np.ndarray, block: int | None = None) -> "EnsembleScores":
        """Add one map's ``members`` (M, ...) and ``truth`` (...); ``block``: which block of
        days it belongs to for the band (None: a block of its own). The pixels are scored
        ``PIXELS_PER_PASS`` at a time, so that the float64 work arrays stay small on a large grid."""
        members, truth = np.asarray(members), np.asarray(truth).reshape(-1)
        m = members.shape[0]
        if self.members is None:
            self.members, self.ranks = m, np.zeros(m + 1, np.int64)
        elif m != self.members:
            raise ValueError(f"an ensemble of {m} members after one of {self.members}")
        flat = members.reshape(m, -1)
        bins = np.zeros_like(self.bins)  # this map's reliability bins: its weight in the band is drawn once
        for start in range(0, truth.size, PIXELS_PER_PASS):
            part = slice(start, start + PIXELS_PER_PASS)
            self._accumulate_pixels(np.asarray(flat[:, part], np.float64), np.asarray(truth[part], np.float64), bins)
        self.bins += bins
        if self.thresholds and bins[:, 0].any():
            rng = self._resample_rng if block is None else np.random.default_rng([self.seed, 1, block])
            weights = rng.poisson(1.0, RELIABILITY_RESAMPLES)[:, None]
            self.resampled += weights * bins[:, [0, 2], None]  # count and observed sum
        return self

    def _accumulate_pixels(self, members: np.ndarray, y: np.ndarray, bins: np.ndarray) -> None:
        m = members.shape[0]
        ok = np.isfinite(y) & np.isfinite(members).all(axis=0)
        x, y = np.sort(members[:, ok], axis=0), y[ok]
        if not y.size:
            return
        # sum over pairs |x_i - x_j| = 2 * sum_i (2i - m + 1) x_(i) for sorted x (i from 0)
        weights = (2 * np.arange(m) - m + 1)[:, None]
        self.crps_sum += float((np.abs(x - y).mean(axis=0) - (weights * x).sum(axis=0) / m**2).sum())
        self.variance_sum += float(x.var(axis=0, ddof=1).sum()) if m > 1 else 0.0
        self.error_sum += float(((x.mean(axis=0) - y) ** 2).sum())
        self.ranks += np.bincount(_ranks(x, y, self._rng), minlength=m + 1)
        self.count += y.size
        for k, thr in enumerate(self.thresholds):
            p, o = (x > thr).mean(axis=0), (y > thr).astype(np.float64)
            self.brier[k] += float(((p - o) ** 2).sum())
            b = _reliability_bin(p)
            bins[k, 0] += np.bincount(b, minlength=RELIABILITY_BINS)
            bins[k, 1] += np.bincount(b, weights=p, minlength=RELIABILITY_BINS)
            bins[k, 2] += np.bincount(b, weights=o, minlength=RELIABILITY_BINS)

    def merge(self, other: "EnsembleScores") -> "EnsembleScores":
        if other.members is not None:
            if self.members is None:
                self.members, self.ranks = other.members, np.zeros_like(other.ranks)
            self.ranks += other.ranks
        self.count += other.count
        self.crps_sum += other.crps_sum
        self.variance_sum += other.variance_sum
        self.error_sum += other.error_sum
        self.brier += other.brier
        self.bins += other.bins
        self.resampled += other.resampled
        return self

    def compute(self) -> dict[str, float]:
        n, m = self.count, self.members or 1
        scores = {"crps": _ratio(self.crps_sum, n),
                  "spread_skill": spread_skill_ratio(self.variance_sum, self.error_sum, m)
                  if self.error_sum > 0 else _NAN}
        for k, thr in enumerate(self.thresholds):
            scores[f"brier@{thr:g}"] = _ratio(self.brier[k], n)
        for thr, table in self.reliability().items():
            for beyond_band in (False, True):
                scores[f"{_gap_prefix(beyond_band)}{thr:g}"] = reliability_gap(table, beyond_band=beyond_band)
        return scores

    def reliability(self) -> dict[float, np.ndarray]:
        """Per threshold, rows (count, mean forecast probability, observed frequency, its 5%
        and 95% resampled values) x bins; NaN where a bin is empty."""
        out = {}
        for k, thr in enumerate(self.thresholds):
            count = self.bins[k, 0]
            resampled_count, resampled_observed = self.resampled[k]
            with np.errstate(invalid="ignore", divide="ignore"):
                frequencies = resampled_observed / resampled_count
                band = [np.full(RELIABILITY_BINS, np.nan) for _ in range(2)]
                for i in np.flatnonzero(count):
                    kept = frequencies[:, i][np.isfinite(frequencies[:, i])]
                    band[0][i], band[1][i] = np.quantile(kept, [0.05, 0.95]) if kept.size else (np.nan, np.nan)
                out[thr] = np.stack([count, self.bins[k, 1] / count, self.bins[k, 2] / count, *band])
        return out


def _gap_prefix(beyond_band: bool) -> str:
    """The key of :meth:`EnsembleScores.compute`'s reliability gaps, before the threshold."""
    return "reliability_gap_beyond_band@" if beyond_band else "reliability_gap@"


def widest_reliability_gap(scores: dict[str, float], beyond_band: bool = False) -> float | None:
    """The widest reliability gap over the thresholds in ``scores`` (a row of
    :meth:`EnsembleScores.compute`), or with ``beyond_band`` the widest part of one beyond
    its band; None for a row without them (a deterministic model's).

    >>> widest_reliability_gap({"crps": 0.5, "reliability_gap@1": 0.04, "reliability_gap@10": 0.12})
    0.12
    """
    gaps = [value for key, value in scores.items() if key.startswith(_gap_prefix(beyond_band))]
    return max(gaps) if gaps else None


def reliability_gap(table: np.ndarray, min_count: int = RELIABILITY_MIN_COUNT, beyond_band: bool = False) -> float:
    """The largest distance from the diagonal in a reliability table of
    :meth:`EnsembleScores.reliability`, over the bins holding at least ``min_count``
    pixels: |mean forecast probability - observed frequency|, or with ``beyond_band`` how
    far the mean probability lies outside the observed frequency's 5-95% band (0 where the
    band holds it: a gap the test days cannot tell from chance). 0 when no bin is that full.

    >>> table = np.array([[500, 300], [0.15, 0.55], [0.10, 0.80], [0.05, 0.70], [0.14, 0.90]])
    >>> round(reliability_gap(table), 2), round(reliability_gap(table, beyond_band=True), 2)
    (0.25, 0.15)
    """
    count, forecast, observed, low, high = np.asarray(table, np.float64)
    full = count >= min_count
    if not full.any():
        return 0.0
    if beyond_band:
        gaps = np.maximum(np.maximum(low - forecast, forecast - high), 0.0)
    else:
        gaps = np.abs(forecast - observed)
    return float(gaps[full].max())


CHANCE_DRAWS = 100  # forecasts calibrated by construction that ChanceReliability scores


class ChanceReliability:
    """How wide the reliability gaps of an ensemble forecast would be by chance alone, on the
    same maps: the gaps of forecasts with the same members that are calibrated by
    construction, ``draws`` of them.

    Each draw replaces every truth by a member of its own forecast: the one at the level
    ``(u + c) mod 1``, where ``u`` is the truth's level among the members (its rank, ties
    broken at random, in (0, 1)) and ``c`` is uniform, one per ``block`` of days and draw.
    Such a level is uniform whatever the forecast, so each pixel's new truth exceeds a
    threshold with exactly the forecast probability: every gap the draws show is chance.
    The levels keep the truth's pattern over the pixels of a map and the days of a block
    (a forecast misses a storm on many pixels at once), which is what makes a reliability
    bin of a few hundred pixels move by far more than that many independent pixels would.
    Before the shift, the normal scores of ``u`` are standardised within each reliability
    bin over all maps, so that a miss that the bin makes on every day (the gap to measure:
    a bias, a spread too wide or too narrow there) is not taken for chance.

    :meth:`compute` gives, per threshold and draw, the widest gap over the bins the forecast
    itself fills with at least ``min_count`` pixels (:func:`reliability_gap`). Unlike the
    other accumulators it keeps, per valid pixel of every map, its level (4 bytes) and how
    many members exceed each threshold (2 bytes each); ``merge`` joins two in order.

    >>> rng = np.random.default_rng(0)
    >>> p = rng.integers(0, 11, (50, 400)) / 10                  # 50 maps of 400 pixels
    >>> members = (np.arange(10)[:, None] < p[:, None] * 10) * 2.0  # (maps, 10 members, pixels)
    >>> chance = ChanceReliability([1.0], draws=20)
    >>> for day in range(50):                                   # outcomes as likely as forecast
    ...     _ = chance.accumulate(members[day], (rng.random(400) < p[day]) * 2.0, block=day)
    >>> float(np.median(chance.compute()[1.0])) < 0.05          # 2000 independent pixels a bin
    True
    """

    def __init__(self, thresholds: Sequence[float], draws: int = CHANCE_DRAWS, seed: int = 0,
                 min_count: int = RELIABILITY_MIN_COUNT) -> None:
        if draws < 1:
            raise ValueError(f"draws must be >= 1, got {draws}")
        self.thresholds, self.draws, self.seed, self.min_count = [float(t) for t in thresholds], draws, seed, min_count
        self.members: int | None = None
        self.levels: list[np.ndarray] = []  # per map, the truth's level among the members, (pixels,)
        self.above: list[np.ndarray] = []  # per map, the members above each threshold, (thresholds, pixels)
        self.blocks: list[tuple] = []  # per map, its block
        self._rng = np.random.default_rng([seed, 2])

    def accumulate(self, members: np.ndarray, truth: np.ndarray, block: int | None = None) -> "ChanceReliability":
        """Add one map's ``members`` (M, ...) and ``truth`` (...); maps given the same
        ``block`` share their shifts (None: a block of its own)."""
        members, truth = np.asarray(members), np.asarray(truth).reshape(-1)
        m = members.shape[0]
        if self.members is None:
            self.members = m
        elif m != self.members:
            raise ValueError(f"an ensemble of {m} members after one of {self.members}")
        x = members.reshape(m, -1)
        ok = np.isfinite(truth) & np.isfinite(x).all(axis=0)
        x, y = x[:, ok], truth[ok]
        # a tie (a dry truth among dry members) takes any of its ranks at random: where it falls
        # among them says nothing of a pattern, and one rank for all would move a block's dry pixels as one
        self.levels.append(((_ranks(x, y, self._rng) + 0.5) / (m + 1)).astype(np.float32))
        self.above.append(np.stack([(x > thr).sum(axis=0) for thr in self.thresholds]).astype(np.uint16)
                          if self.thresholds else np.zeros((0, y.size), np.uint16))
        self.blocks.append(("own", len(self.blocks)) if block is None else ("block", int(block)))
        return self

    def merge(self, other: "ChanceReliability") -> "ChanceReliability":
        """Add ``other``'s maps after this one's (its own blocks stay blocks of their own)."""
        if other.members is not None:
            if self.members is not None and other.members != self.members:
                raise ValueError(f"an ensemble of {other.members} members after one of {self.members}")
            self.members = other.members
        self.blocks += [("own", n + len(self.blocks)) if kind == "own" else (kind, n) for kind, n in other.blocks]
        self.levels += other.levels
        self.above += other.above
        return self

    def _shifts(self, block: tuple) -> np.ndarray:
        """The shift ``c`` of every draw for ``block``: a block's shifts depend only on the
        seed and the block, so that other accumulators (other leads) give the same."""
        return np.random.default_rng([self.seed, 3 if block[0] == "block" else 4, block[1]]).random(self.draws)

    def compute(self) -> dict[float, np.ndarray]:
        """Per threshold, the widest reliability gap of each draw, (draws,); zeros where no
        bin holds ``min_count`` pixels."""
        from scipy.special import ndtr, ndtri

        out = {thr: np.zeros(self.draws) for thr in self.thresholds}
        if not self.levels or not self.thresholds:
            return out
        m = self.members
        score = ndtri(np.concatenate(self.levels).astype(np.float64))
        keys = sorted(set(self.blocks))
        index = {key: i for i, key in enumerate(keys)}
        pixel_block = np.concatenate([np.full(v.size, index[b], np.int64) for v, b in zip(self.levels, self.blocks)])
        shifts = np.stack([self._shifts(key) for key in keys], axis=1)  # (draws, blocks)
        above = np.concatenate(self.above, axis=1).astype(np.int64)
        for k, thr in enumerate(self.thresholds):
            p = above[k] / m
            b = _reliability_bin(p)
            count = np.bincount(b, minlength=RELIABILITY_BINS)
            if not (count >= self.min_count).any():
                continue
            with np.errstate(invalid="ignore", divide="ignore"):
                forecast = np.bincount(b, weights=p, minlength=RELIABILITY_BINS) / count
            levels = ndtr(_standardised_per_bin(score, b, count))
            unbanded = np.full(RELIABILITY_BINS, np.nan)
            for r in range(self.draws):
                # the member at level l exceeds thr iff floor(l * m) >= m - above
                exceeded = ((levels + shifts[r, pixel_block]) % 1.0) * m >= m - above[k]
                with np.errstate(invalid="ignore", divide="ignore"):
                    observed = np.bincount(b, weights=exceeded, minlength=RELIABILITY_BINS) / count
                out[thr][r] = reliability_gap(np.stack([count, forecast, observed, unbanded, unbanded]),
                                              self.min_count)
        return out


def _ranks(members: np.ndarray, truth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Where each truth (P,) falls among its members (M, P), 0..M; a truth tied with members
    takes one of its ranks among them at random (from ``rng``)."""
    below, ties = (members < truth).sum(axis=0), (members == truth).sum(axis=0)
    return below + np.floor(rng.random(truth.size) * (ties + 1)).astype(np.int64)


def _reliability_bin(p: np.ndarray) -> np.ndarray:
    """The reliability bin (0 .. RELIABILITY_BINS - 1) of each forecast probability ``p``."""
    return np.minimum((p * RELIABILITY_BINS).astype(np.int64), RELIABILITY_BINS - 1)


def _standardised_per_bin(score: np.ndarray, bins: np.ndarray, count: np.ndarray) -> np.ndarray:
    """``score`` less its mean and over its standard deviation within each bin (of
    ``bins``, holding ``count`` pixels): what is left is how each pixel's truth departs
    from its bin's, the pattern a calibrated forecast's truths would share."""
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.bincount(bins, weights=score, minlength=count.size) / count
        spread = np.sqrt(np.bincount(bins, weights=(score - mean[bins]) ** 2, minlength=count.size) / count)
    spread = np.where(spread > 0, spread, 1.0)
    return (score - mean[bins]) / spread[bins]


def crps(members: np.ndarray, truth: np.ndarray) -> float:
    """CRPS of the ensemble ``members`` (M, ...) against ``truth``, pooled (see :class:`EnsembleScores`).

    >>> crps(np.array([[1.0], [1.0]]), np.array([3.0]))
    2.0
    """
    return EnsembleScores().accumulate(members, truth).compute()["crps"]


def mse(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean squared error."""
    return ContinuousScores().accumulate(pred, truth).compute()["mse"]


def rmse(pred: np.ndarray, truth: np.ndarray) -> float:
    """Root mean squared error."""
    return ContinuousScores().accumulate(pred, truth).compute()["rmse"]


def mae(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean absolute error."""
    return ContinuousScores().accumulate(pred, truth).compute()["mae"]


def bias(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean error, forecast minus truth (positive: over-forecast)."""
    return ContinuousScores().accumulate(pred, truth).compute()["bias"]


def nse(pred: np.ndarray, truth: np.ndarray) -> float:
    """Nash-Sutcliffe efficiency: 1 - SSE / variance of the truth about its mean (1 is perfect)."""
    return ContinuousScores().accumulate(pred, truth).compute()["nse"]


def kge(pred: np.ndarray, truth: np.ndarray) -> float:
    """Kling-Gupta efficiency: 1 - sqrt((r-1)^2 + (alpha-1)^2 + (beta-1)^2), with r the
    correlation, alpha the ratio of standard deviations, beta the ratio of means."""
    return ContinuousScores().accumulate(pred, truth).compute()["kge"]


def contingency(pred: np.ndarray, truth: np.ndarray, threshold: float) -> dict[str, float]:
    """CSI, POD and FAR for the event ``value >= threshold`` (values of any shape)."""
    p, t = _valid(pred, truth)
    row = EventScores([threshold], scales=()).accumulate(p[None, None], t[None, None]).compute()
    return {name: row[f"{name}@{float(threshold):.3g}"] for name in ("csi", "pod", "far")}


def fss(pred: np.ndarray, truth: np.ndarray, threshold: float, scale: int) -> float:
    """Fractions skill score of ``value >= threshold`` over ``scale x scale`` neighbourhoods
    of maps (H, W) or stacks (N, H, W), pooled over all maps."""
    return EventScores([threshold], [scale]).accumulate(pred, truth).compute()[f"fss{scale}@{float(threshold):.3g}"]


def nse_map(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-pixel NSE over the time axis of (N, H, W) stacks; NaN where undefined."""
    return PixelScores(np.shape(truth)[-2:]).accumulate(pred, truth).compute()["nse"]


def kge_map(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-pixel KGE over the time axis of (N, H, W) stacks; NaN where undefined."""
    return PixelScores(np.shape(truth)[-2:]).accumulate(pred, truth).compute()["kge"]


def spread_skill_ratio(variance_sum, error_sum, members: int):
    """``sqrt((M + 1) / M * variance_sum / error_sum)``: an ensemble's spread over the RMSE of
    its mean, from the sums over pixels of the members' variance (ddof 1) and of the mean's
    squared error; 1 for a reliable ensemble of M members. Elementwise on arrays and tensors.

    >>> spread_skill_ratio(4.0, 5.0, 4)
    1.0
    """
    return ((members + 1) / members * variance_sum / error_sum) ** 0.5


def skill(score: float, reference: float) -> float:
    """``1 - score / reference`` (e.g. MSE skill against a baseline); NaN if the reference is 0."""
    return 1 - score / reference if reference > 0 else _NAN
