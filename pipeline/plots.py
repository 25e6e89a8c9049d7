"""Figures: loss curves (training), side-by-side maps (inference), skill by lead (evaluation)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display needed (servers, CI)
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig: plt.Figure, path: str | Path) -> Path:
    """Save atomically: a reader never sees half a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def plot_loss_curves(history: Sequence[dict], path: str | Path) -> Path:
    """Training and validation loss per epoch (log scale), with the best epoch marked."""
    epochs = [h["epoch"] for h in history]
    fig, (ax, ax_skill) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="training")
    ax.plot(epochs, [h["val_loss"] for h in history], "s-", label="validation")
    best = min(history, key=lambda h: h["val_loss"])
    ax.axvline(best["epoch"], color="grey", ls=":", label=f"best (epoch {best['epoch']})")
    ax.set(xlabel="epoch", ylabel="masked MSE (normalised)", title="Loss", yscale="log")
    ax.legend()
    ax_skill.plot(epochs, [h["val_skill"] for h in history], "o-", color="tab:green")
    ax_skill.axhline(0, color="black", lw=0.8)
    ax_skill.set(xlabel="epoch", ylabel="1 - MSE / MSE persistence",
                 title="Validation skill against persistence")
    for a in (ax, ax_skill):
        a.grid(alpha=0.3)
    return _save(fig, path)
