"""The spread calibration of a probabilistic model on a large grid: every pixel against a
lattice of at most ``CALIBRATION_PIXELS`` per map; prints measured ratios.

    python benchmarks/bench_calibration.py [--height 1200] [--width 1600] [--windows 2]

A synthetic cube with rain is written, a probabilistic model trained for one epoch on its
first days, and then ``runoff calibrate`` (:func:`pipeline.recalibrate.recalibrate`: the
spread, as ``runoff train --probabilistic`` calibrates it) runs twice over the same
``--windows`` later windows: scoring every pixel of each map, and on the lattice. It prints
how much longer every pixel takes, and on how many leads the two pick the same factor.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import Row, machine, table

from pipeline.calibration import CALIBRATION_PIXELS, pixel_stride
from pipeline.cube import cube_dates, open_cube
from pipeline.ingest import ingest
from pipeline.recalibrate import recalibrate
from pipeline.synth import write_series
from pipeline.train import TrainConfig, train

TRAIN_END, VAL_END = 13, 19  # day indices: 3 training windows and 1 validation window of 6 + 6 days


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--height", type=int, default=1200)
    p.add_argument("--width", type=int, default=1600)
    p.add_argument("--windows", type=int, default=2, help="windows calibrated on")
    p.add_argument("--max_pixels", type=int, default=CALIBRATION_PIXELS, help="the lattice's pixels per map")
    return p


def timed_calibration(checkpoint: Path, store: str, period: str, output: Path, max_pixels: int | None
                      ) -> tuple[float, list[float]]:
    """Seconds ``runoff calibrate`` took over ``period``, and the spread factor it picked per lead."""
    start = time.perf_counter()
    done = recalibrate(checkpoint, store, period, output, device="cpu", max_pixels=max_pixels)
    return time.perf_counter() - start, list(done.spread.values())


def measure(args: argparse.Namespace, folder: Path) -> list[Row]:
    days = VAL_END + args.windows + 6
    write_series(folder / "in", days=days, height=args.height, width=args.width, covariates=["rainf"])
    store = str(folder / "qs.zarr")
    ingest(folder / "in", store)
    dates = cube_dates(open_cube(store))
    train(TrainConfig(data_dir=store, epochs=1, leads=list(range(1, 7)), forcings=["rainf"], probabilistic=True,
                      train_end=str(dates[TRAIN_END]), val_end=str(dates[VAL_END]), device="cpu",
                      checkpoint_dir=str(folder / "ckpt"), output_dir=str(folder / "out")))
    period = f"{dates[VAL_END + 1]}..{dates[-1]}"
    every, every_factors = timed_calibration(folder / "ckpt" / "best.pth", store, period, folder / "every.pth", None)
    lattice, lattice_factors = timed_calibration(folder / "ckpt" / "best.pth", store, period, folder / "lattice.pth",
                                                 args.max_pixels)
    stride = pixel_stride(args.height, args.width, args.max_pixels)
    kept = -(-args.height // stride) * -(-args.width // stride)
    same = sum(a == b for a, b in zip(every_factors, lattice_factors))
    return [Row(f"runoff calibrate over {args.windows} window(s) of {args.height}x{args.width}: every pixel "
                f"({every:.1f} s) / a lattice of {kept} pixels, rows and columns {stride} apart ({lattice:.1f} s)",
                f"{every / lattice:.1f}x"),
            Row(f"leads whose spread factor the lattice picks as every pixel does (every pixel: "
                f"{', '.join(f'x{f:.2f}' for f in every_factors)}; lattice: "
                f"{', '.join(f'x{f:.2f}' for f in lattice_factors)})",
                f"{100 * same / len(every_factors):.0f}%")]


def main() -> None:
    args = parser().parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(args, Path(tmp))
    print(machine())
    print(table(rows))


if __name__ == "__main__":
    main()
