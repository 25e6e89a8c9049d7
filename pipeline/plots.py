"""Figures: loss curves (training), side-by-side maps (inference), skill by lead, the area's
mean day by day, rank histograms and reliability diagrams (evaluation)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display needed (servers, CI)
import matplotlib.pyplot as plt  # noqa: E402

from .storage import atomic_output, location  # noqa: E402
from .verify import RELIABILITY_MIN_COUNT, reliability_gap  # noqa: E402


def _save(fig: plt.Figure, path: str | Path) -> Path:
    """Save atomically: a reader never sees half a PNG."""
    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)
    return location(path)


def plot_loss_curves(history: Sequence[dict], path: str | Path) -> Path:
    """Training and validation loss per epoch (log scale), with the best epoch marked."""
    epochs = [h["epoch"] for h in history]
    fig, (ax, ax_skill) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="training")
    ax.plot(epochs, [h["val_loss"] for h in history], "s-", label="validation")
    best = min(history, key=lambda h: h["val_loss"])
    ax.axvline(best["epoch"], color="grey", ls=":", label=f"best (epoch {best['epoch']})")
    ax.set(xlabel="epoch", ylabel="MSE / mean square of training qs", title="Loss (physical units)", yscale="log")
    ax.legend()
    ax_skill.plot(epochs, [h["val_skill"] for h in history], "o-", color="tab:green")
    ax_skill.axhline(0, color="black", lw=0.8)
    ax_skill.set(xlabel="epoch", ylabel="1 - MSE / MSE persistence",
                 title="Validation MSE skill against persistence")
    for a in (ax, ax_skill):
        a.grid(alpha=0.3)
    return _save(fig, path)


def _extent_km(grid) -> tuple[float, float, float, float]:
    a, _, c, _, e, f = grid.transform
    scale = 1.0 if grid.crs.is_geographic else 1000.0
    return (c / scale, (c + a * grid.width) / scale, (f + e * grid.height) / scale, f / scale)


def plot_comparison(prediction, grid, path: str | Path, *, valid_date: str, issue_date: str, lead: int,
                    truth=None, units: str = "kg m-2", scores: dict | None = None) -> Path:
    """Truth | prediction | error on one figure (prediction alone when the truth is unknown).

    Truth and prediction share one colour scale; the error uses a diverging scale
    centred on zero. Titles carry the dates, and the map's MSE and NSE when known.
    """
    import numpy as np

    extent = _extent_km(grid)
    axis_unit = "deg" if grid.crs.is_geographic else "km"
    panels = 1 if truth is None else 3
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.4), squeeze=False, layout="constrained")
    axes = axes[0]
    stack = prediction if truth is None else np.concatenate([truth[np.isfinite(truth)],
                                                             prediction[np.isfinite(prediction)]])
    finite = stack[np.isfinite(stack)]
    vmax = float(np.percentile(finite, 99.5)) if finite.size else 1.0
    vmax = max(vmax, 1e-3)
    cmap = plt.get_cmap("YlGnBu").copy()
    cmap.set_bad("lightgrey")
    shown = [("prediction", prediction)] if truth is None else [("truth", truth), ("prediction", prediction)]
    for ax, (label, field) in zip(axes, shown):
        im = ax.imshow(field, extent=extent, cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"{label}, {valid_date}" if label == "truth" else
                     f"{label} for {valid_date}\nissued {issue_date}, lead {lead} d")
        fig.colorbar(im, ax=ax, shrink=0.85, label=f"QS [{units}]")
    if truth is not None:
        error = prediction - truth
        finite_err = np.abs(error[np.isfinite(error)])
        lim = max(float(np.percentile(finite_err, 99.5)) if finite_err.size else 1.0, 1e-3)
        diverging = plt.get_cmap("RdBu_r").copy()
        diverging.set_bad("lightgrey")
        im = axes[2].imshow(error, extent=extent, cmap=diverging, vmin=-lim, vmax=lim, interpolation="nearest")
        score = ""
        if scores:
            score = f"\nMSE {scores['mse']:.3g}  NSE {scores['nse']:.2f}"
        axes[2].set_title(f"error (prediction - truth){score}")
        fig.colorbar(im, ax=axes[2], shrink=0.85, label=f"error [{units}]")
    for ax in axes:
        ax.set_xlabel(f"x [{axis_unit}]")
        ax.set_ylabel(f"y [{axis_unit}]")
    fig.suptitle("Surface runoff (QS) forecast")
    return _save(fig, path)


def plot_probabilistic(quantiles, probability, threshold: float, grid, path: str | Path, *, valid_date: str,
                       issue_date: str, lead: int, truth=None, units: str = "kg m-2") -> Path:
    """Truth | median | 10-90% spread | probability of exceeding ``threshold``, for one
    probabilistic forecast (``quantiles``: its 0.1, 0.5 and 0.9 quantile maps)."""
    import numpy as np

    extent = _extent_km(grid)
    axis_unit = "deg" if grid.crs.is_geographic else "km"
    low, median, high = quantiles
    panels = [("truth", truth)] if truth is not None else []
    panels += [("median", median), ("10-90% spread", high - low), (f"P(QS > {threshold:.3g})", probability)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 4.2), squeeze=False, layout="constrained")
    finite = np.concatenate([f[np.isfinite(f)] for f in (median, truth) if f is not None])
    vmax = max(float(np.percentile(finite, 99.5)) if finite.size else 1.0, 1e-3)
    for ax, (label, field) in zip(axes[0], panels):
        is_probability = label.startswith("P(")
        cmap = plt.get_cmap("magma_r" if is_probability else "YlGnBu").copy()
        cmap.set_bad("lightgrey")
        top = 1.0 if is_probability else (max(float(np.nanpercentile(field, 99.5)), 1e-3)
                                          if label.startswith("10-90") else vmax)
        im = ax.imshow(field, extent=extent, cmap=cmap, vmin=0, vmax=top, interpolation="nearest")
        fig.colorbar(im, ax=ax, shrink=0.85, label="probability" if is_probability else f"QS [{units}]")
        ax.set(title=label if label != "median" else f"median for {valid_date}\nissued {issue_date}, lead {lead} d",
               xlabel=f"x [{axis_unit}]", ylabel=f"y [{axis_unit}]")
    return _save(fig, path)


def plot_map(values, grid, path: str | Path, *, title: str, label: str, vmin: float | None = None,
             vmax: float | None = None, cmap: str = "viridis") -> Path:
    """One georeferenced map with a colour bar (e.g. the per-pixel NSE)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.8), layout="constrained")
    colours = plt.get_cmap(cmap).copy()
    colours.set_bad("lightgrey")
    im = ax.imshow(values, extent=_extent_km(grid), cmap=colours, vmin=vmin, vmax=vmax, interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.85, label=label)
    unit = "deg" if grid.crs.is_geographic else "km"
    ax.set(title=title, xlabel=f"x [{unit}]", ylabel=f"y [{unit}]")
    return _save(fig, path)


def plot_skill_by_lead(metrics: dict, path: str | Path) -> Path:
    """MSE skill of the model against persistence and climatology, and NSE, per lead time."""
    leads = sorted(metrics)
    fig, (ax, ax_nse) = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    for base, marker in (("persistence", "o"), ("climatology", "s")):
        ax.plot(leads, [metrics[lead]["model"][f"skill_vs_{base}"] for lead in leads], marker + "-",
                label=f"model vs {base}")
    ax.axhline(0, color="black", lw=0.8)
    ax.set(xlabel="lead time [days]", ylabel="1 - MSE / MSE baseline", title="MSE skill score", xticks=leads)
    for source, marker in (("model", "o"), ("persistence", "^"), ("climatology", "s")):
        ax_nse.plot(leads, [metrics[lead][source]["nse"] for lead in leads], marker + "-", label=source)
    ax_nse.set(xlabel="lead time [days]", ylabel="NSE", title="Nash-Sutcliffe efficiency", xticks=leads)
    for a in (ax, ax_nse):
        a.grid(alpha=0.3)
        a.legend()
    return _save(fig, path)


def plot_area_means(series: dict[int, dict[str, Sequence[float]]], dates: dict[int, Sequence], path: str | Path,
                    *, units: str, title: str) -> Path:
    """The truth's mean over the area day by day beside each source's forecast of it, one
    panel per lead in ``series`` (``{lead: {"truth": [...], source: [...]}}``, on the valid
    days ``dates[lead]``): a hydrograph of the catchment's mean runoff."""
    styles = {"truth": dict(color="black", lw=1.6), "model": dict(color="tab:blue", lw=1.2),
              "mean": dict(color="tab:cyan", lw=1.0, ls=(0, (3, 1, 1, 1))),
              "median": dict(color="tab:purple", lw=1.0, ls="-."),
              "persistence": dict(color="tab:orange", lw=1.0, ls="--"),
              "climatology": dict(color="tab:green", lw=1.0, ls=":")}
    fig, axes = plt.subplots(len(series), 1, figsize=(10, 2.9 * len(series)), squeeze=False, sharex=True,
                             layout="constrained")
    for ax, (lead, columns) in zip(axes[:, 0], series.items()):
        for source, values in columns.items():
            ax.plot(dates[lead], values, label=source, **styles.get(source, {}))
        ax.set(ylabel=f"mean QS [{units}]", title=f"lead {lead} d")
        ax.grid(alpha=0.3)
        ax.legend(ncol=len(columns), fontsize="small")
    axes[-1, 0].set_xlabel("valid day")
    fig.autofmt_xdate()
    fig.suptitle(title)
    return _save(fig, path)


def plot_ensemble_diagnostics(ranks, reliability: dict, path: str | Path, *, title: str,
                              min_count: int = RELIABILITY_MIN_COUNT) -> Path:
    """Rank histogram (flat for a reliable ensemble) beside the reliability diagram at each
    threshold (observed frequency against forecast probability, with bars over its 5-95%
    band across resampled days; bins holding fewer than ``min_count`` pixels are drawn
    hollow, and the legend gives the widest gap of the others from the diagonal)."""
    import numpy as np

    fig, (ax_rank, ax_rel) = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    ranks = np.asarray(ranks, np.float64)
    ax_rank.bar(np.arange(ranks.size), ranks / max(ranks.sum(), 1), width=1.0, color="tab:blue", alpha=0.8)
    ax_rank.axhline(1 / ranks.size, color="black", lw=0.8, ls="--", label="reliable")
    ax_rank.set(xlabel="rank of the truth among the members", ylabel="share of pixels", title="rank histogram")
    ax_rank.legend()
    ax_rel.plot([0, 1], [0, 1], color="black", lw=0.8, ls="--")
    for (threshold, table), colour in zip(reliability.items(), ("tab:orange", "tab:green", "tab:red", "tab:purple")):
        count, forecast, observed, low, high = table
        full = count >= min_count
        band = np.maximum([observed[full] - low[full], high[full] - observed[full]], 0)
        ax_rel.errorbar(forecast[full], observed[full], yerr=band, fmt="o-", color=colour, capsize=2,
                        label=f"> {threshold:.3g}: gap {reliability_gap(table, min_count):.3f}")
        ax_rel.plot(forecast[~full], observed[~full], "o", mfc="none", color=colour)
    ax_rel.set(xlabel="forecast probability", ylabel="observed frequency", title="reliability", xlim=(0, 1),
               ylim=(0, 1))
    ax_rel.legend(title="threshold")
    fig.suptitle(title)
    return _save(fig, path)
