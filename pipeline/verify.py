"""Verification metrics, on valid pixels only (where both forecast and truth are finite).

Continuous scores: MSE, RMSE, MAE, bias, NSE, KGE. Categorical scores at a
threshold: CSI, POD, FAR. Spatial: the fractions skill score (FSS) at a scale.

>>> import numpy as np
>>> truth = np.array([1.0, 2.0, 3.0, np.nan]); pred = np.array([1.0, 2.0, 4.0, 9.0])
>>> mse(pred, truth), nse(pred, truth)
(0.3333333333333333, 0.5)
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import uniform_filter


def _valid(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, truth = np.asarray(pred, np.float64), np.asarray(truth, np.float64)
    ok = np.isfinite(pred) & np.isfinite(truth)
    return pred[ok], truth[ok]


def mse(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean squared error."""
    p, t = _valid(pred, truth)
    return float(np.mean((p - t) ** 2)) if p.size else float("nan")


def rmse(pred: np.ndarray, truth: np.ndarray) -> float:
    """Root mean squared error."""
    return float(np.sqrt(mse(pred, truth)))


def mae(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean absolute error."""
    p, t = _valid(pred, truth)
    return float(np.mean(np.abs(p - t))) if p.size else float("nan")


def bias(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean error, forecast minus truth (positive: over-forecast)."""
    p, t = _valid(pred, truth)
    return float(np.mean(p - t)) if p.size else float("nan")


def nse(pred: np.ndarray, truth: np.ndarray) -> float:
    """Nash-Sutcliffe efficiency: 1 - SSE / variance of the truth about its mean (1 is perfect)."""
    p, t = _valid(pred, truth)
    denominator = np.sum((t - t.mean()) ** 2) if t.size else 0.0
    return float(1 - np.sum((p - t) ** 2) / denominator) if denominator > 0 else float("nan")


def kge(pred: np.ndarray, truth: np.ndarray) -> float:
    """Kling-Gupta efficiency: 1 - sqrt((r-1)^2 + (alpha-1)^2 + (beta-1)^2), with r the
    correlation, alpha the ratio of standard deviations, beta the ratio of means."""
    p, t = _valid(pred, truth)
    if p.size < 2 or t.std() == 0 or t.mean() == 0:
        return float("nan")
    r = np.corrcoef(p, t)[0, 1] if p.std() > 0 else 0.0
    alpha, beta = p.std() / t.std(), p.mean() / t.mean()
    return float(1 - np.sqrt((r - 1) ** 2 + (alpha - 1) ** 2 + (beta - 1) ** 2))


def contingency(pred: np.ndarray, truth: np.ndarray, threshold: float) -> dict[str, float]:
    """CSI, POD and FAR for the event ``value >= threshold``."""
    p, t = _valid(pred, truth)
    fc, ob = p >= threshold, t >= threshold
    hits, misses, false_alarms = np.sum(fc & ob), np.sum(~fc & ob), np.sum(fc & ~ob)
    div = lambda a, b: float(a / b) if b > 0 else float("nan")  # noqa: E731
    return {"csi": div(hits, hits + misses + false_alarms), "pod": div(hits, hits + misses),
            "far": div(false_alarms, hits + false_alarms)}


def fss(pred: np.ndarray, truth: np.ndarray, threshold: float, scale: int) -> float:
    """Fractions skill score of ``value >= threshold`` over ``scale x scale`` neighbourhoods.

    ``pred`` and ``truth`` are maps (H, W) or stacks (N, H, W); pixels invalid in either
    count as no event, and the score pools all maps.
    """
    pred, truth = np.atleast_3d(np.asarray(pred, np.float64).T).T, np.atleast_3d(np.asarray(truth, np.float64).T).T
    ok = np.isfinite(pred) & np.isfinite(truth)
    num = den = 0.0
    for p, t, valid in zip(pred, truth, ok):
        fp = uniform_filter(((p >= threshold) & valid).astype(np.float64), size=scale, mode="constant")
        ft = uniform_filter(((t >= threshold) & valid).astype(np.float64), size=scale, mode="constant")
        num += np.sum((fp - ft) ** 2)
        den += np.sum(fp ** 2) + np.sum(ft ** 2)
    return float(1 - num / den) if den > 0 else float("nan")


def kge_map(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-pixel KGE over the time axis of (N, H, W) stacks; NaN where undefined."""
    pred, truth = np.asarray(pred, np.float64), np.asarray(truth, np.float64)
    ok = np.isfinite(pred) & np.isfinite(truth)
    n = np.maximum(ok.sum(axis=0), 1)
    p, t = np.where(ok, pred, 0.0), np.where(ok, truth, 0.0)
    mp, mt = p.sum(axis=0) / n, t.sum(axis=0) / n
    dp, dt_ = np.where(ok, pred - mp, 0.0), np.where(ok, truth - mt, 0.0)
    sp, st = np.sqrt((dp ** 2).sum(axis=0) / n), np.sqrt((dt_ ** 2).sum(axis=0) / n)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(sp > 0, (dp * dt_).sum(axis=0) / n / (sp * st), 0.0)
        out = 1 - np.sqrt((r - 1) ** 2 + (sp / st - 1) ** 2 + (mp / mt - 1) ** 2)
    return np.where((ok.sum(axis=0) > 1) & (st > 0) & (mt != 0), out, np.nan).astype(np.float32)


def nse_map(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-pixel NSE over the time axis of (N, H, W) stacks; NaN where undefined."""
    pred, truth = np.asarray(pred, np.float64), np.asarray(truth, np.float64)
    ok = np.isfinite(pred) & np.isfinite(truth)
    count = ok.sum(axis=0)
    t = np.where(ok, truth, 0.0)
    mean = t.sum(axis=0) / np.maximum(count, 1)
    sse = np.where(ok, (pred - truth) ** 2, 0.0).sum(axis=0)
    var = np.where(ok, (truth - mean) ** 2, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where((var > 0) & (count > 1), 1 - sse / var, np.nan)
    return out.astype(np.float32)


# --- baselines and the evaluation run ---------------------------------------------------

SOURCES = ("model", "persistence", "climatology")
FSS_SCALES = (1, 3, 9, 27)


def climatology(ds, train_start, train_end, window: int = 15) -> tuple[np.ndarray, np.ndarray]:
    """Smoothed day-of-year mean of ``qs`` over the training days: (366, H, W), and a flag
    per day of year saying whether any training day contributed (±``window`` days, circular)."""
    days = ds["qs"].sel(time=slice(str(train_start), str(train_end)))
    doy = days.time.dt.dayofyear.values - 1
    values = np.asarray(days.values, np.float64)
    h, w = values.shape[1:]
    total, count = np.zeros((366, h, w)), np.zeros((366, h, w))
    for d in np.unique(doy):
        block = values[doy == d]
        total[d] = np.nansum(block, axis=0)
        count[d] = np.isfinite(block).sum(axis=0)
    kernel_total, kernel_count = np.zeros_like(total), np.zeros_like(count)
    for shift in range(-window, window + 1):  # circular moving sum over the year
        kernel_total += np.roll(total, shift, axis=0)
        kernel_count += np.roll(count, shift, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        clim = np.where(kernel_count > 0, kernel_total / kernel_count, np.nan)
    return clim.astype(np.float32), kernel_count.sum(axis=(1, 2)) > 0


def wet_thresholds(ds, train_start, train_end, quantiles=(0.9, 0.99)) -> list[float]:
    """Quantiles of the wet (> 0) training pixels, in data units."""
    values = np.asarray(ds["qs"].sel(time=slice(str(train_start), str(train_end))).values)
    wet = values[np.isfinite(values) & (values > 0)]
    if wet.size == 0:
        return [0.1]
    return [float(np.quantile(wet, q)) for q in quantiles]


def score_table(pred: np.ndarray, truth: np.ndarray, thresholds: list[float]) -> dict[str, float]:
    """Every metric of one forecast source against the truth (N, H, W), pooled."""
    row = {"mse": mse(pred, truth), "rmse": rmse(pred, truth), "mae": mae(pred, truth),
           "bias": bias(pred, truth), "nse": nse(pred, truth), "kge": kge(pred, truth)}
    for thr in thresholds:
        for name, value in contingency(pred, truth, thr).items():
            row[f"{name}@{thr:.3g}"] = value
        for scale in FSS_SCALES:
            row[f"fss{scale}@{thr:.3g}"] = fss(pred, truth, thr, scale)
    return row
