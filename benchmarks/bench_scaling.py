"""How cost grows: ingest time and peak memory against days; sampler throughput and
training step time against patch size. Prints the fitted growth and plots docs/scaling.png.

    python benchmarks/bench_scaling.py [--days 365,1825,3650] [--patches 64,128,256,512]

Growth is the slope of log(cost) against log(size): 1 is linear, 0 flat, 2 quadratic.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench_ingest import peak_memory_mb
from common import Row, machine, table
from pipeline.cube import Split, cube_dates, normalisation_stats, open_cube
from pipeline.ingest import ingest
from pipeline.model import ConvLSTMForecaster
from pipeline.sampler import WindowSampler, WindowSpec, window_issues
from pipeline.synth import write_series
from pipeline.device import keep_freed_memory
from pipeline.train import masked_mse


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def growth(sizes: list[int], costs: list[float]) -> float:
    """Slope of log(cost) on log(size)."""
    return float(np.polyfit(np.log(sizes), np.log(costs), 1)[0])


def ingest_costs(days: list[int], height: int, width: int, root: Path) -> tuple[list[float], list[float]]:
    """Seconds and peak memory (MB PSS, workers included) of a fresh ingest of the first N days."""
    write_series(root / "all", days=max(days), height=height, width=width)
    files = sorted((root / "all").glob("*.tif"))
    seconds, memory = [], []
    ingest(root / "all", root / "warm.zarr")  # imports and page cache, before the clock runs
    for n in days:
        folder = root / f"first{n}"
        folder.mkdir()
        for f in files[:n]:
            (folder / f.name).symlink_to(f)
        start = time.perf_counter()
        ingest(folder, root / f"time{n}.zarr")
        seconds.append(time.perf_counter() - start)
        memory.append(peak_memory_mb(folder, root / f"mem{n}.zarr"))
    return seconds, memory


def patch_costs(patches: list[int], root: Path, steps: int) -> tuple[list[float], list[float]]:
    """Warm sampler windows/s and one training step's seconds (batch 8, 16 hidden channels) per patch."""
    size = max(patches) + 32
    write_series(root / "big", days=60, height=size, width=size)
    store = str(root / "big.zarr")
    ingest(root / "big", store)
    ds = open_cube(store)
    dates = cube_dates(ds)
    split = Split("all", dates[0], dates[-1])
    spec = WindowSpec(6, (1,))
    stats = normalisation_stats(ds, ["qs"], split)
    issues = window_issues(ds, split, spec)
    rates, step_s = [], []
    keep_freed_memory(torch.device("cpu"))  # as `runoff train` does on CPU
    for patch in patches:
        sampler = WindowSampler(store, issues, spec, stats, patch=patch, shuffle=True)
        sum(1 for _ in sampler)  # the first pass decodes; measure the passes after it
        start, count = time.perf_counter(), 0
        for epoch in range(1, 4):
            sampler.set_epoch(epoch)
            count += sum(1 for _ in sampler)
        rates.append(count / (time.perf_counter() - start))

        torch.manual_seed(0)
        model = ConvLSTMForecaster(hidden_channels=16, kernel_size=3)
        optimiser = torch.optim.AdamW(model.parameters())
        x, y, mask = torch.randn(8, 6, 1, patch, patch), torch.randn(8, 1, 1, patch, patch), \
            torch.ones(8, 1, 1, patch, patch, dtype=torch.bool)
        times = []
        for _ in range(steps + 1):  # the first step warms up
            start = time.perf_counter()
            optimiser.zero_grad()
            masked_mse(model(x), y, mask).backward()
            optimiser.step()
            times.append(time.perf_counter() - start)
        step_s.append(float(np.median(times[1:])))
    return rates, step_s


def plot(path: Path, days, seconds, memory, patches, rates, step_s) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    ax = axes[0]
    ax.plot(days, seconds, "o-", label="ingest time (s)")
    ax.set_xlabel("days ingested")
    ax.set_ylabel("seconds")
    ax2 = ax.twinx()
    ax2.plot(days, memory, "s--", color="tab:red", label="peak memory (MB)")
    ax2.set_ylabel("peak memory, MB (PSS)")
    ax2.set_ylim(0, max(memory) * 1.3)
    ax.set_title(f"ingest: time x{growth(days, seconds):.2f}, memory x{growth(days, memory):.2f} (log-log slope)")
    ax.legend(loc="upper left")
    ax2.legend(loc="lower right")
    for ax, values, label in ((axes[1], rates, "sampler windows/s (warm)"),
                              (axes[2], step_s, "training step, s (batch 8, CPU)")):
        ax.loglog(patches, values, "o-", label=label)
        ref = values[0] * (np.array(patches) / patches[0]) ** (2 if ax is axes[2] else -2)
        ax.loglog(patches, ref, ":", color="grey", label="proportional to pixels" if ax is axes[2] else
                  "inverse to pixels")
        ax.set_xlabel("patch size (px)")
        ax.set_xticks(patches, [str(p) for p in patches])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(f"{label}: slope {growth(patches, values):.2f}")
        ax.legend()
    fig.suptitle(machine(), fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--days", default="365,1825,3650")
    parser.add_argument("--patches", default="64,128,256,512")
    parser.add_argument("--height", type=int, default=224)
    parser.add_argument("--width", type=int, default=464)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--plot", default="docs/scaling.png")
    args = parser.parse_args()
    days, patches = _ints(args.days), _ints(args.patches)
    with tempfile.TemporaryDirectory() as tmp:
        seconds, memory = ingest_costs(days, args.height, args.width, Path(tmp))
    with tempfile.TemporaryDirectory() as tmp:
        rates, step_s = patch_costs(patches, Path(tmp), args.steps)
    for n, s, m in zip(days, seconds, memory):
        print(f"ingest {n:5d} days: {s:6.1f} s ({n / s:4.0f} days/s), peak {m:5.0f} MB")
    for p, r, s in zip(patches, rates, step_s):
        print(f"patch {p:4d}: sampler {r:8.0f} windows/s, training step {s:7.3f} s")
    print(table([
        Row("ingest time against days (log-log slope)", f"{growth(days, seconds):.2f}", "1 (linear)"),
        Row("ingest peak memory against days", f"{growth(days, memory):.2f}", "0 (flat)"),
        Row("sampler windows/s against patch side", f"{growth(patches, rates):.2f}", "-2 (per pixel)"),
        Row("training step time against patch side", f"{growth(patches, step_s):.2f}", "2 (per pixel)"),
    ]))
    plot(Path(args.plot), days, seconds, memory, patches, rates, step_s)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
