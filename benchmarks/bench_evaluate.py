"""Streaming evaluation and batched prediction; prints measured ratios.

    python benchmarks/bench_evaluate.py [--size 512] [--windows 100,400]

* Peak RSS of ``runoff evaluate --split all`` on two cubes of the same grid holding 100 and
  400 windows (target: the ratio stays <= 1.2: memory does not grow with the windows).
  Each evaluation runs in a fresh process, so its peak RSS (VmHWM) is its own.
* Forecast maps per second through ``Forecaster``, batched (8 issue days per forward pass)
  against one issue day at a time: on a 224x464 cube (target >= 2x on CPU) and on the
  48x64 grid of the skill benchmarks, where one map leaves the cores idle part of the time.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import Row, machine, table

from pipeline.cube import open_cube
from pipeline.ingest import ingest
from pipeline.synth import write_series
from pipeline.train import TrainConfig, train

EVALUATE = r"""
import sys
from pipeline.evaluate import evaluate
report = evaluate(sys.argv[1], sys.argv[2], split="all", output_dir=sys.argv[3], device="cpu")
hwm = [l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(report.windows, int(hwm) / 1024)
"""


def cube(folder: Path, days: int, size: int, seed: int = 0) -> str:
    write_series(folder / "in", days=days, height=size, width=size, seed=seed)
    ingest(folder / "in", folder / "qs.zarr")
    return str(folder / "qs.zarr")


def evaluate_rss(weights: Path, store: str, out: Path) -> tuple[int, float]:
    done = subprocess.run([sys.executable, "-c", EVALUATE, str(weights), store, str(out)], capture_output=True,
                          text=True, check=True)
    windows, rss = done.stdout.split()
    return int(windows), float(rss)


def maps_per_second(store: str, weights: Path, batch_size: int, issues: int) -> float:
    from pipeline.checkpoint import read_checkpoint
    from pipeline.inference import Forecaster

    ds = open_cube(store)
    forecaster = Forecaster.load(read_checkpoint(weights), "cpu", batch_size=batch_size)
    days = list(range(6, 6 + issues))
    list(forecaster.forecasts(ds, days[:1]))  # warm-up
    start = time.perf_counter()
    n = sum(len(batch) for batch, _ in forecaster.forecasts(ds, days))
    return n / (time.perf_counter() - start)


def batching_row(folder: Path, height: int, width: int, issues: int, target: float | None) -> Row:
    """Maps per second batched (8 issue days) over one at a time, with a model of 16 hidden
    channels trained for one short epoch on a synthetic cube of ``height`` x ``width``."""
    write_series(folder / "in", days=issues + 12, height=height, width=width)
    ingest(folder / "in", folder / "qs.zarr")
    model = train(TrainConfig(data_dir=str(folder / "qs.zarr"), epochs=1, patch=32, max_train_windows=8,
                              device="cpu", checkpoint_dir=str(folder / "ckpt"), output_dir=str(folder / "out")))
    one = maps_per_second(str(folder / "qs.zarr"), model.best_checkpoint, 1, issues)
    batched = maps_per_second(str(folder / "qs.zarr"), model.best_checkpoint, 8, issues)
    ratio = batched / one
    return Row(f"prediction {height}x{width}, 16 hidden, batches of 8 against 1 issue day ({batched:.2f} / "
               f"{one:.2f} maps/s)", f"{ratio:.2f}x", f">= {target:g}x" if target else "",
               ratio >= target if target else None)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--windows", default="100,400")
    p.add_argument("--issues", type=int, default=16, help="issue days timed for prediction")
    args = p.parse_args()
    few, many = (int(v) for v in args.windows.split(","))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        long_cube = cube(tmp / "long", many + 6, args.size)
        short_cube = cube(tmp / "short", few + 6, args.size)
        result = train(TrainConfig(data_dir=long_cube, epochs=1, hidden_channels=[8], patch=32, max_train_windows=16,
                                   device="cpu", checkpoint_dir=str(tmp / "ckpt"), output_dir=str(tmp / "out")))
        (n_few, rss_few), (n_many, rss_many) = (evaluate_rss(result.best_checkpoint, store, tmp / "eval")
                                                for store in (short_cube, long_cube))
        ratio = rss_many / rss_few
        rows.append(Row(f"evaluate peak RSS, {n_many} against {n_few} windows, {args.size}x{args.size} "
                        f"({rss_many:.0f} / {rss_few:.0f} MB)", f"{ratio:.2f}x", "<= 1.2x", ratio <= 1.2))
        for height, width, target in ((224, 464, 2.0), (48, 64, None)):
            rows.append(batching_row(tmp / f"grid{height}x{width}", height, width, args.issues, target))
    print(machine())
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
