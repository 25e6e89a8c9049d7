"""Convert the real samples of ``../shared/data/real/`` into runoff cubes, for measuring skill
(never for the test suite). Until ``runoff ingest`` reads NetCDF, this writes each day as a
GeoTIFF with rioxarray (CRS EPSG:4326 from the 1-D lat/lon, m per day -> kg m-2) and ingests
the folder as a user would.

    python benchmarks/real_cube.py cwatm stores/bhima.zarr     # qs and rainf, 367 days, 31x33
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr

from pipeline.ingest import ingest

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"


def cwatm_days(folder: Path) -> dict[str, xr.DataArray]:
    """CWatM's daily runoff and precipitation (m per day) in kg m-2 per day, north up."""
    out = {}
    for name, (file, var) in {"qs": ("sum_runoff_daily.nc", "sum_runoff"),
                              "rainf": ("Precipitation_daily.nc", "Precipitation")}.items():
        da = xr.open_dataset(folder / file)[var].load() * 1000.0
        da = da.rename(lat="y", lon="x").sortby("y", ascending=False)
        out[name] = da.rio.write_crs("EPSG:4326")
    return out


def write_folder(days: dict[str, xr.DataArray], root: Path) -> None:
    for name, da in days.items():
        folder = root / ("Qs" if name == "qs" else name.capitalize())
        folder.mkdir(parents=True)
        for t in range(da.sizes["time"]):
            day = da.isel(time=t)
            stamp = np.datetime_as_string(day.time.values, unit="D").replace("-", "")
            day = day.where(np.isfinite(day), -9999.0).rio.write_nodata(-9999.0)
            day.astype("float32").rio.to_raster(folder / f"{name.upper()}_{stamp}.tif")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sample", choices=("cwatm",))
    p.add_argument("store")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_folder(cwatm_days(REAL / "cwatm_bhima"), Path(tmp))
        report = ingest(tmp, args.store, units="kg m-2")
    print(f"{report.store}: {report.written} day(s), {report.start} .. {report.end}, variables "
          f"{', '.join(report.variables)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
