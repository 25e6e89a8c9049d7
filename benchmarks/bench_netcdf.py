"""NetCDF ingest of hourly NLDAS-like files against two references; prints measured ratios.

    python benchmarks/bench_netcdf.py [--days 365] [--height 224] [--width 464]

Writes ``days`` x 24 hourly files (``NLDAS_NOAH0125_H.A20030101.0100.002.nc``, ``Qs`` in
kg m-2, zlib-compressed) and times, side by side in one run:

* ``runoff ingest`` of the folder into a new cube (daily sums);
* ``xr.open_mfdataset(files).resample(time="1D").sum().to_zarr(...)``, the xarray one-liner
  (target: ingest >= 2x faster);
* merely reading every file's ``Qs`` with netCDF4, one file after the other: a floor no
  ingest can beat by much on one core (target: ingest >= 0.7x its speed).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from common import Row, machine, table

from pipeline.ingest import ingest
from pipeline.netcdf import NetcdfOptions
from pipeline.synth import write_lsm_files


def write_files(folder: Path, days: int, height: int, width: int) -> list[Path]:
    start = np.datetime64("2003-01-01")
    paths = []
    for i in range(days):  # one day at a time: a year of hourly maps does not fit in memory at once
        paths += write_lsm_files(folder, "nldas", days=1, height=height, width=width, seed=i,
                                 start=str(start + i), resolution=0.125, origin=(-125.0, 53.0)).paths
    return paths


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def read_all(paths: list[Path]) -> None:
    import netCDF4

    for path in paths:
        with netCDF4.Dataset(path) as ds:
            ds["Qs"][:]


def xarray_one_liner(paths: list[Path], store: Path) -> None:
    import xarray as xr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = xr.open_mfdataset(paths, combine="by_coords")
        ds.resample(time="1D").sum().to_zarr(store, mode="w")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--days", type=int, default=365)
    p.add_argument("--height", type=int, default=224)
    p.add_argument("--width", type=int, default=464)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = write_files(tmp / "nldas", args.days, args.height, args.width)
        read = timed(lambda: read_all(paths))  # first: the page cache is as warm for the others
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ingest(paths[0], tmp / "warm-up.zarr", netcdf=NetcdfOptions(stamp="start"))  # imports, not timed
            ours = timed(lambda: ingest(tmp / "nldas", tmp / "qs.zarr"))
        one_liner = timed(lambda: xarray_one_liner(paths, tmp / "xr.zarr"))
    size = f"{args.days} days x 24 hourly files, {args.height}x{args.width}"
    rows = [
        Row(f"ingest against open_mfdataset().resample().sum().to_zarr(), {size} ({ours:.1f} / {one_liner:.1f} s)",
            f"{one_liner / ours:.2f}x", ">= 2x", one_liner / ours >= 2),
        Row(f"ingest against reading every file with netCDF4 ({ours:.1f} / {read:.1f} s)",
            f"{read / ours:.2f}x", ">= 0.7x", read / ours >= 0.7),
    ]
    print(machine())
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
