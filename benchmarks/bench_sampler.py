"""Sampler throughput, side by side in one run on one cube; prints ratios.

    python benchmarks/bench_sampler.py [--days 365] [--height 224 --width 464] [--windows 3000]

Compares 7x64x64 windows (6 input days + 1 target, one 64x64 patch) drawn from the same
Zarr cube by:
  * runoff's WindowSampler (Dask block reads, normalisation, masks, torch tensors);
  * xbatcher's BatchGenerator over xr.open_zarr(...) (pip install xbatcher);
  * a numpy gather from an array already in memory (the upper bound).
Then trains one epoch and reports the share of step time spent waiting for data.
Targets (issue 3): >= 20x xbatcher, >= 0.25x the in-memory gather, data wait < 5%.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np
import xarray as xr

from pipeline.cube import cube_dates, make_splits, normalisation_stats, open_cube
from pipeline.ingest import ingest
from pipeline.sampler import WindowSampler, WindowSpec, window_issues
from pipeline.synth import write_series
from pipeline.train import TrainConfig, train

PATCH, DAYS_PER_WINDOW = 64, 7


def runoff_sampler(store: str, n: int) -> float:
    ds = open_cube(store)
    dates = cube_dates(ds)
    split = make_splits(dates[0], dates[-1])["train"]
    spec = WindowSpec(6, (1,))
    stats = normalisation_stats(ds, ["qs"], split)
    issues = window_issues(ds, split, spec)
    sampler = WindowSampler(store, issues, spec, stats, patch=PATCH, shuffle=True)
    start = time.perf_counter()
    count = 0
    for epoch in itertools.count():
        sampler.set_epoch(epoch)
        for _ in sampler:
            count += 1
            if count >= n:
                return count / (time.perf_counter() - start)
    raise AssertionError("unreachable")


def xbatcher_generator(store: str, n: int) -> float:
    import xbatcher

    da = xr.open_zarr(store, consolidated=True).qs
    gen = xbatcher.BatchGenerator(da, input_dims={"time": DAYS_PER_WINDOW, "y": PATCH, "x": PATCH},
                                  input_overlap={"time": DAYS_PER_WINDOW - 1})
    start = time.perf_counter()
    count = 0
    for batch in gen:
        np.asarray(batch.values)
        count += 1
        if count >= n:
            break
    return count / (time.perf_counter() - start)


def numpy_gather(store: str, n: int) -> float:
    cube = xr.open_zarr(store, consolidated=True).qs.values
    t_max, h, w = cube.shape
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(n):
        t = rng.integers(0, t_max - DAYS_PER_WINDOW)
        y, x = rng.integers(0, h - PATCH), rng.integers(0, w - PATCH)
        np.ascontiguousarray(cube[t:t + DAYS_PER_WINDOW, y:y + PATCH, x:x + PATCH])
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--height", type=int, default=224)
    parser.add_argument("--width", type=int, default=464)
    parser.add_argument("--windows", type=int, default=3000)
    parser.add_argument("--xbatcher-windows", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_series(tmp / "in", days=args.days, height=args.height, width=args.width)
        store = str(tmp / "qs.zarr")
        ingest(tmp / "in", store)
        ours = runoff_sampler(store, args.windows)
        gather = numpy_gather(store, args.windows * 10)
        print(f"cube {args.days} days x {args.height}x{args.width}, windows {DAYS_PER_WINDOW}x{PATCH}x{PATCH}")
        print(f"  runoff WindowSampler        {ours:10.0f} windows/s")
        print(f"  numpy gather from memory    {gather:10.0f} windows/s")
        try:
            slow = xbatcher_generator(store, args.xbatcher_windows)
            print(f"  xbatcher BatchGenerator     {slow:10.0f} windows/s")
            print(f"  ratio sampler / xbatcher    {ours / slow:8.1f}x   (target >= 20)")
        except ImportError:
            print("  xbatcher not installed (pip install xbatcher): that ratio is not measured")
        print(f"  ratio sampler / numpy       {ours / gather:8.2f}x   (target >= 0.25)")
        result = train(TrainConfig(data_dir=store, epochs=2, batch_size=8, patch=PATCH, device="auto",
                                   checkpoint_dir=str(tmp / "ckpt"), output_dir=str(tmp / "out")))
        for epoch in result.history:  # epoch 1 includes the first decode of the cube
            print(f"  training epoch {epoch['epoch']}: {epoch['samples_per_s']:.1f} samples/s, data wait "
                  f"{epoch['data_wait']:.1%} of step time (target < 5%)")


if __name__ == "__main__":
    main()
