"""Writers that keep the source grid: Cloud-Optimized GeoTIFF and CF NetCDF.

Both go through rioxarray, with the exact affine transform of the cube (not one
recomputed from rounded coordinates, rioxarray #739), a declared nodata value
(rioxarray #570) and atomic renames, so a kill never leaves half a file under its
final name. Any output may be an fsspec URL (``s3://bucket/forecasts``): it is written
to a local temporary file and uploaded in one PUT, which object stores make atomic.

Example
-------
>>> path = write_geotiff(values, grid, "outputs/predictions/QS_20200105_lead1.tif",
...                      tags={"lead": 1})                                    # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr

from .rasters import Grid
from .storage import atomic_output, location

NODATA = -9999.0


def grid_dataarray(values: np.ndarray, grid: Grid, name: str = "qs", attrs: Mapping | None = None) -> xr.DataArray:
    """A 2-D (y, x) DataArray on ``grid`` with its CRS and exact transform written."""
    if values.shape != grid.shape:
        raise ValueError(f"values {values.shape} do not match the grid {grid.shape}")
    da = xr.DataArray(values.astype(np.float32), dims=("y", "x"), name=name,
                      coords={"y": grid.y_coords(), "x": grid.x_coords()}, attrs=dict(attrs or {}))
    return da.rio.write_crs(grid.crs_wkt).rio.write_transform(grid.affine)


def write_geotiff(values: np.ndarray, grid: Grid, path: str | Path, tags: Mapping | None = None,
                  description: str = "qs", units: str = "kg m-2") -> Path:
    """Write one map as a COG: float32, NaN -> nodata -9999, deflate, internal overviews, tags."""
    da = grid_dataarray(values, grid, attrs={"long_name": description, "units": units})
    da = da.rio.write_nodata(NODATA, encoded=True)
    block = 512 if min(grid.shape) >= 1024 else 256 if min(grid.shape) >= 512 else 128
    # GDAL stops at one block by default; ask for levels down to ~64 px so that even a
    # small grid has internal overviews
    levels = max(1, int(np.ceil(np.log2(max(grid.shape) / 64))))
    with atomic_output(path) as tmp:
        da.rio.to_raster(tmp, driver="COG", compress="DEFLATE", predictor=3, blocksize=block,
                         overview_resampling="average", overview_count=levels,
                         tags={k: str(v) for k, v in (tags or {}).items()})
    return location(path)


def write_netcdf(ds: xr.Dataset, grid: Grid, path: str | Path) -> Path:
    """Write a CF NetCDF (netcdf4 engine) with the grid mapping of ``grid``."""
    ds = ds.assign_coords(y=grid.y_coords(), x=grid.x_coords())
    ds = ds.rio.write_crs(grid.crs_wkt).rio.write_transform(grid.affine).rio.write_coordinate_system()
    # merge, not replace: rioxarray keeps grid_mapping in .encoding
    encoding = {name: {**ds[name].encoding, "zlib": True, "complevel": 4, "_FillValue": np.float32(NODATA)}
                for name in ds.data_vars}
    with atomic_output(path) as tmp:
        ds.to_netcdf(tmp, engine="netcdf4", encoding=encoding)
    return location(path)
