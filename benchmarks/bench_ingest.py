"""Ingest throughput and memory, measured side by side in one run; prints ratios.

    python benchmarks/bench_ingest.py [--days 365] [--big-days 3650] [--height 224 --width 464]

Compares, on the same daily float32 deflate GeoTIFFs:
  * read limit: opening and reading every file with rasterio in one process;
  * runoff ingest (rasters -> Zarr cube, fresh store);
  * naive path: rioxarray.open_rasterio per file -> xr.concat -> to_zarr.
and the peak memory of `runoff ingest` subprocesses (with their workers) for --days and --big-days files.
Targets (issue 2): ingest >= 0.8x the read limit, >= 5x naive, RSS(big) <= 1.5x RSS(small).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import rasterio
import rioxarray
import xarray as xr

from common import Row, cube_parser, table
from pipeline.ingest import ingest
from pipeline.synth import write_series


def read_limit(files: list[Path]) -> float:
    start = time.perf_counter()
    for path in files:
        with rasterio.open(path) as src:
            src.read(1)
    return len(files) / (time.perf_counter() - start)


def runoff_ingest(folder: Path, store: Path) -> float:
    shutil.rmtree(store, ignore_errors=True)
    start = time.perf_counter()
    report = ingest(folder, store)
    return report.written / (time.perf_counter() - start)


def naive(files: list[Path], store: Path) -> float:
    shutil.rmtree(store, ignore_errors=True)
    start = time.perf_counter()
    arrays = [rioxarray.open_rasterio(p, masked=True).squeeze("band", drop=True) for p in files]
    xr.concat(arrays, dim="time").to_dataset(name="qs").to_zarr(store, zarr_format=3, consolidated=False)
    return len(files) / (time.perf_counter() - start)


def peak_memory_mb(folder: Path, store: Path) -> float:
    """Peak memory of a fresh ingest process and its forked workers: the largest sum of
    their PSS (proportional set size, so pages the workers share with the parent count
    once), sampled every 20 ms."""
    import psutil

    shutil.rmtree(store, ignore_errors=True)
    code = "import sys; from pipeline.ingest import ingest; ingest(sys.argv[1], sys.argv[2])"
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder), str(store)])
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        total = 0
        try:
            for p in [root, *root.children(recursive=True)]:
                total += p.memory_full_info().pss
        except psutil.Error:  # a worker ended between listing and reading it
            continue
        peak = max(peak, total)
        time.sleep(0.02)
    if proc.returncode:
        raise SystemExit(f"ingest of {folder} failed")
    return peak / 2**20


def parser() -> argparse.ArgumentParser:
    p = cube_parser(__doc__)
    p.add_argument("--big-days", type=int, default=3650)
    p.add_argument("--repeat", type=int, default=3, help="best of N interleaved rounds for the throughputs")
    return p


def measure(args: argparse.Namespace) -> list[Row]:
    """Throughputs side by side, then peak memory at --days and --big-days."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        small, big = tmp / "small", tmp / "big"
        write_series(small, days=args.days, height=args.height, width=args.width)
        files = sorted(small.glob("*.tif"))
        read_limit(files)  # warm the page cache for everyone
        runoff_ingest(small, tmp / "ours.zarr")  # and the imports
        # interleaved rounds, best of each: a machine that slows down mid-run hits all three
        rounds = [(read_limit(files), runoff_ingest(small, tmp / "ours.zarr"), naive(files, tmp / "naive.zarr"))
                  for _ in range(args.repeat)]
        limit, ours, slow = (max(r[i] for r in rounds) for i in range(3))
        grid = f"{args.days} days of {args.height}x{args.width}"
        rows = [Row(f"ingest / read limit ({grid}: {ours:.0f} vs {limit:.0f} days/s)", f"{ours / limit:.2f}x",
                    ">= 0.8x", ours / limit >= 0.8),
                Row(f"ingest / naive rioxarray concat ({ours:.0f} vs {slow:.0f} days/s)", f"{ours / slow:.2f}x",
                    ">= 5x", ours / slow >= 5)]
        if args.big_days:
            mem_small = peak_memory_mb(small, tmp / "mem_small.zarr")
            for name in ("ours.zarr", "naive.zarr", "mem_small.zarr"):
                shutil.rmtree(tmp / name, ignore_errors=True)
            write_series(big, days=args.big_days, height=args.height, width=args.width)
            mem_big = peak_memory_mb(big, tmp / "mem_big.zarr")
            rows.append(Row(f"ingest peak memory {args.big_days} / {args.days} days ({mem_big:.0f} / {mem_small:.0f} MB"
                            f" PSS)", f"{mem_big / mem_small:.2f}x", "<= 1.5x", mem_big / mem_small <= 1.5))
    return rows


def main() -> None:
    print(table(measure(parser().parse_args())))


if __name__ == "__main__":
    main()
