"""Forecast gridded surface runoff (QS) from daily rasters with a ConvLSTM.

Stages, one module each: :mod:`pipeline.rasters` (find and read daily rasters),
:mod:`pipeline.ingest` (rasters -> Zarr cube), :mod:`pipeline.cube` (open and
describe a cube), :mod:`pipeline.synth` (synthetic QS series).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("runoff-forecast")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
