"""Find daily rasters, parse their dates, read one day, check the grid.

Every day of a series must lie on the same grid: same CRS, same affine transform,
same shape. :class:`Grid` carries that triple between stages.

Example
-------
>>> days = list_days("data/input")                       # doctest: +SKIP
>>> values, grid, attrs = read_raster(days[0].path)      # doctest: +SKIP
"""

from __future__ import annotations

import datetime as dt
import os
import re
import struct
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.errors import CRSError, NotGeoreferencedWarning, RasterioError
from rasterio.transform import Affine

from .errors import RunoffError, first_line

# GeoTIFF, PNG and the single-band GDAL formats hydrological models write: Esri ASCII grids,
# PCRaster maps, ERDAS Imagine, VRT, ENVI/BIL, Idrisi, SAGA, JPEG 2000.
RASTER_SUFFIXES = (".tif", ".tiff", ".png", ".asc", ".map", ".img", ".vrt", ".bil", ".rst", ".sdat", ".jp2")
# A PCRaster map stack names step N in an 8.3 name: IW000000.001 is step 1, IW000001.001 step 1001.
_STACK_NAME = re.compile(r"^[A-Za-z_]+(\d*)\.(\d{3})$")

# Tried in this order on the file name; the first pattern that gives a real date wins.
_DATE_PATTERNS = (
    (re.compile(r"(?<!\d)(\d{4})[-_](\d{2})[-_](\d{2})(?!\d)"), "%Y%m%d"),
    (re.compile(r"(?<!\d)(\d{8})(?!\d)"), "%Y%m%d"),
    (re.compile(r"(?<!\d)(\d{7})(?!\d)"), "%Y%j"),
)
_STRPTIME_TOKENS = {
    "%Y": r"\d{4}", "%y": r"\d{2}", "%m": r"\d{1,2}", "%d": r"\d{1,2}",
    "%j": r"\d{3}", "%b": r"[A-Za-z]{3}", "%B": r"[A-Za-z]+", "%%": "%",
}


@dataclass(frozen=True)
class Grid:
    """The georeferencing every day of a cube shares.

    ``transform`` is the affine (a, b, c, d, e, f) of the top-left pixel corner,
    as rasterio gives it; ``crs_wkt`` is the CRS as WKT.
    """

    crs_wkt: str
    transform: tuple[float, float, float, float, float, float]
    height: int
    width: int

    @classmethod
    def from_dataset(cls, src: rasterio.io.DatasetReader, crs: CRS | None = None,
                     transform: Affine | None = None) -> "Grid":
        crs = crs or src.crs
        transform = transform or src.transform
        return cls(crs.to_wkt(), tuple(transform)[:6], src.height, src.width)

    @property
    def crs(self) -> CRS:
        return CRS.from_wkt(self.crs_wkt)

    @property
    def affine(self) -> Affine:
        return Affine(*self.transform)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    def x_coords(self) -> np.ndarray:
        """Cell-centre x coordinates (for a north-up grid)."""
        a, _, c = self.transform[:3]
        return c + (np.arange(self.width) + 0.5) * a

    def y_coords(self) -> np.ndarray:
        """Cell-centre y coordinates (descending for a north-up grid)."""
        _, _, _, _, e, f = self.transform
        return f + (np.arange(self.height) + 0.5) * e

    def area_weights(self) -> np.ndarray:
        """Each cell's area relative to the others, (height, width): the cosine of the row's
        latitude on a geographic grid (a degree of longitude narrows towards the poles), 1 on
        a projected one (its cells are equal in map units).

        >>> grid = Grid(CRS.from_epsg(4326).to_wkt(), (1.0, 0.0, 10.0, 0.0, -60.0, 90.0), 3, 2)
        >>> grid.area_weights().round(3).tolist()
        [[0.5, 0.5], [1.0, 1.0], [0.5, 0.5]]
        """
        rows = np.cos(np.deg2rad(self.y_coords())) if self.crs.is_geographic else np.ones(self.height)
        return np.repeat(rows[:, None], self.width, axis=1)

    def matches(self, other: "Grid") -> bool:
        """Same shape, same CRS and the same transform to 1e-6 of a pixel."""
        if self.shape != other.shape:
            return False
        pixel = max(abs(self.transform[0]), abs(self.transform[4]))
        if any(abs(p - q) > 1e-6 * pixel for p, q in zip(self.transform, other.transform)):
            return False
        return self.crs_wkt == other.crs_wkt or self.crs == other.crs

    def describe(self) -> str:
        a, _, c, _, e, f = self.transform
        epsg = self.crs.to_epsg()
        crs = f"EPSG:{epsg}" if epsg else self.crs.to_string()[:40]
        return f"{crs}, {self.height}x{self.width} px, origin ({c:g}, {f:g}), pixel ({a:g}, {e:g})"


def check_png_scale(scale: float) -> None:
    """One clear error for a ``--png_scale`` (the value of the largest PNG code) that is not > 0."""
    if not scale > 0:
        raise RunoffError(f"--png_scale {scale:g}: the value of the largest PNG code must be > 0")


@dataclass(frozen=True)
class ReadOptions:
    """How to read rasters whose files do not say everything themselves.

    ``band``: which band of a multi-band file (1-based); ``png_scale``: physical value
    of the largest PNG code; ``crs``: CRS for files that lack one; ``like``: a
    reference GeoTIFF whose CRS and transform apply to PNGs without a world file;
    ``nodata``: the stored value that marks no data, in place of what the files declare.
    """

    band: int | None = None
    png_scale: float | None = None
    crs: str | None = None
    like: str | None = None
    nodata: float | None = None
    _like_grid: list = field(default_factory=list, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.band is not None and self.band < 1:
            raise RunoffError(f"--band {self.band}: bands count from 1")
        if self.png_scale is not None:
            check_png_scale(self.png_scale)

    def like_grid(self) -> Grid | None:
        if self.like is None:
            return None
        if not self._like_grid:
            try:
                with rasterio.open(self.like) as ref:
                    if ref.crs is None:
                        raise RunoffError(f"--like {self.like}: the reference raster has no CRS")
                    self._like_grid.append(Grid.from_dataset(ref))
            except RasterioError as exc:
                raise RunoffError(f"--like {self.like}: cannot read it ({exc})") from None
        return self._like_grid[0]

    def user_crs(self) -> CRS | None:
        if self.crs is None:
            return None
        try:
            return CRS.from_user_input(self.crs)
        except CRSError:
            raise RunoffError(f"--crs {self.crs!r}: not a CRS that PROJ knows") from None


@dataclass(frozen=True)
class DayFile:
    """One raster and the day it holds."""

    date: dt.date
    path: Path


def find_rasters(folder: str | Path) -> list[Path]:
    """Return the raster files (``RASTER_SUFFIXES``, any case, and PCRaster map stacks)
    directly in ``folder``, hidden files skipped, sorted."""
    folder = Path(folder)
    with os.scandir(folder) as entries:  # scandir knows file types without a stat per file
        return sorted(folder / e.name for e in entries
                      if not e.name.startswith(".") and (os.path.splitext(e.name)[1].lower() in RASTER_SUFFIXES
                                                         or _STACK_NAME.match(e.name)) and e.is_file())


def _format_regex(date_format: str) -> re.Pattern:
    parts, i = [], 0
    while i < len(date_format):
        token = date_format[i:i + 2]
        if token in _STRPTIME_TOKENS:
            parts.append(_STRPTIME_TOKENS[token])
            i += 2
        else:
            parts.append(re.escape(date_format[i]))
            i += 1
    return re.compile("".join(parts))


def parse_date(name: str, date_format: str | None = None) -> dt.date | None:
    """Date in a file name: YYYYMMDD, YYYY-MM-DD, YYYY_MM_DD or YYYYDDD, or ``date_format``.

    >>> parse_date("QS_20210314.tif")
    datetime.date(2021, 3, 14)
    >>> parse_date("GLDAS_NOAH025_D.A2021073.tif")
    datetime.date(2021, 3, 14)
    >>> parse_date("qs-14.03.2021.tif", "%d.%m.%Y")
    datetime.date(2021, 3, 14)
    """
    stem = Path(name).stem
    if date_format:
        for match in _format_regex(date_format).finditer(stem):
            try:
                return dt.datetime.strptime(match.group(0), date_format).date()
            except ValueError:
                continue
        return None
    for pattern, fmt in _DATE_PATTERNS:
        for match in pattern.finditer(stem):
            try:
                return dt.datetime.strptime("".join(match.groups()), fmt).date()
            except ValueError:
                continue
    return None


def _tag_date(path: Path) -> dt.date | None:
    try:
        with rasterio.open(path) as src:
            stamp = src.tags().get("TIFFTAG_DATETIME")
    except RasterioError:
        return None
    if not stamp:
        return None
    try:
        return dt.datetime.strptime(stamp.strip()[:10], "%Y:%m:%d").date()
    except ValueError:
        return None


def stack_step(name: str) -> int | None:
    """The step of a PCRaster map stack file name, or None.

    >>> stack_step("IW000000.001"), stack_step("IW000001.001"), stack_step("QS_20210314.tif")
    (1, 1001, None)
    """
    match = _STACK_NAME.match(name)
    return int(match.group(1) + match.group(2)) if match else None


def list_days(folder: str | Path, date_format: str | None = None, start: dt.date | None = None) -> list[DayFile]:
    """Every raster in ``folder`` with its date, sorted by date.

    PCRaster map stacks carry a step number only: step N is ``start`` + N - 1 days.

    Raises :class:`RunoffError` for an empty or missing folder, a file without a
    parseable date, and two files for one date.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise RunoffError(f"{folder}: no such folder")
    files = find_rasters(folder)
    if not files:
        raise RunoffError(f"{folder}: no raster files ({', '.join(RASTER_SUFFIXES)} or a PCRaster stack) "
                          f"in this folder")
    days: dict[dt.date, Path] = {}
    for path in files:
        step = stack_step(path.name)
        if step is not None and start is None:
            raise RunoffError(f"{path}: step {step} of a PCRaster map stack; pass --start YYYY-MM-DD "
                              f"(the date of step 1)")
        date = start + dt.timedelta(days=step - 1) if step is not None else \
            parse_date(path.name, date_format) or _tag_date(path)
        if date is None:
            how = f"--date_format {date_format!r}" if date_format else \
                "YYYYMMDD, YYYY-MM-DD, YYYY_MM_DD, YYYYDDD or TIFFTAG_DATETIME"
            raise RunoffError(f"{path}: no date found in the file name ({how}); rename it or pass --date_format")
        if date in days:
            raise RunoffError(f"{days[date]} and {path} are both for {date.isoformat()}; keep one")
        days[date] = path
    return [DayFile(d, days[d]) for d in sorted(days)]


# Byte size of each TIFF field type; ImageWidth, ImageLength, SamplesPerPixel and the GeoTIFF
# tags (ModelPixelScale, ModelTiepoint, ModelTransformation, GeoKeyDirectory, GeoDoubleParams,
# GeoAsciiParams)
_TIFF_TYPE_BYTES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 16: 8, 17: 8, 18: 8}
_GRID_TAGS = frozenset((256, 257, 277, 33550, 33922, 34264, 34735, 34736, 34737))
_MAX_TAGS, _MAX_TAG_BYTES = 4096, 2**20  # far above any real GeoTIFF's


def georeferencing_key(path: str | Path) -> bytes | None:
    """The raw bytes of a GeoTIFF's size, band count and internal georeferencing tags, or None.

    Two files with equal keys lie on the same grid (and have as many bands), so only
    one of them needs GDAL to build its CRS through PROJ, which is most of the cost of
    opening a small GeoTIFF.
    None where the tags alone would not decide the grid: not a TIFF, no GeoKeys or no
    internal geotransform, or a side-car ``.aux.xml`` (GDAL reads it before the tags).

    >>> georeferencing_key("README.md") is None
    True
    """
    if os.path.exists(f"{path}.aux.xml"):
        return None
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            order = {b"II": "<", b"MM": ">"}.get(head[:2])
            if order is None or len(head) < 16:
                return None
            magic = struct.unpack_from(order + "H", head, 2)[0]
            if magic == 42:  # classic TIFF
                ifd, count, entry, pointer = struct.unpack_from(order + "I", head, 4)[0], "H", "HHI4s", "I"
            elif magic == 43:  # BigTIFF
                ifd, count, entry, pointer = struct.unpack_from(order + "Q", head, 8)[0], "Q", "HHQ8s", "Q"
            else:
                return None
            f.seek(ifd)
            n = struct.unpack(order + count, f.read(struct.calcsize(count)))[0]
            if n > _MAX_TAGS:  # not an image directory: a damaged file, left to GDAL
                return None
            entry_bytes, inline = struct.calcsize(order + entry), struct.calcsize(pointer)
            entries = f.read(n * entry_bytes)
            parts, found = [head[:4]], set()
            for i in range(n):
                tag, kind, values, value = struct.unpack_from(order + entry, entries, i * entry_bytes)
                if tag not in _GRID_TAGS:
                    continue
                size = values * _TIFF_TYPE_BYTES.get(kind, 0)
                if size > _MAX_TAG_BYTES:
                    return None
                if size > inline:
                    f.seek(struct.unpack(order + pointer, value)[0])
                    value = f.read(size)
                    if len(value) < size:
                        return None
                parts.append(struct.pack(order + "HHQ", tag, kind, values) + value[:size])
                found.add(tag)
    except (OSError, struct.error):
        return None
    if not {256, 257, 34735} <= found or not found & {33922, 34264}:
        return None
    return b"".join(parts)


# catch_warnings swaps the process's filters: two threads inside it at once can restore each
# other's, and one thread's open would then warn. Opens take a few tenths of a millisecond.
_OPEN_QUIETLY = threading.Lock()


def _open(path: Path, georeferenced: bool = True) -> rasterio.io.DatasetReader:
    try:
        with _OPEN_QUIETLY, warnings.catch_warnings():
            # a raster without georeferencing is a RunoffError naming the file and the fix, or
            # is georeferenced by --like or by a known grid: rasterio's generic warning would only
            # repeat that
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(path) if georeferenced else rasterio.open(path, GEOREF_SOURCES="NONE")
    except RasterioError as exc:
        raise RunoffError(f"{path}: not a readable raster ({first_line(exc)})") from None


def _grid_of(src: rasterio.io.DatasetReader, path: Path, options: ReadOptions) -> Grid:
    is_png = src.driver == "PNG"
    georeferenced = not src.transform.is_identity or bool(src.gcps[0])
    like = options.like_grid() if is_png else None
    if like is not None:
        if (src.height, src.width) != like.shape:
            raise RunoffError(f"{path}: {src.height}x{src.width} px, but --like {options.like} "
                              f"is {like.height}x{like.width} px")
        return like
    if not georeferenced:
        hint = "add a world file (.pgw) and --crs, or pass --like REFERENCE.tif" if is_png \
            else "the file has no geotransform"
        raise RunoffError(f"{path}: not georeferenced; {hint}")
    crs = src.crs or options.user_crs()
    if crs is None:
        raise RunoffError(f"{path}: has no CRS; pass --crs (e.g. --crs EPSG:4326)")
    return Grid.from_dataset(src, crs=crs)


def _band(src: rasterio.io.DatasetReader, path: Path, options: ReadOptions) -> int:
    if options.band is not None:
        if not 1 <= options.band <= src.count:
            raise RunoffError(f"{path}: --band {options.band} asked for, but the file has {src.count} band(s)")
        return options.band
    if src.count != 1:
        colour = (" (3 or 4 bands in a PNG are usually the colours of a rendered map, not its values: "
                  "export the values as one band)" if src.driver == "PNG" and src.count in (3, 4) else "")
        raise RunoffError(f"{path}: has {src.count} bands; choose one with --band N{colour}")
    return 1


def read_grid(path: str | Path, options: ReadOptions = ReadOptions()) -> Grid:
    """Georeferencing of one raster, from its header only."""
    path = Path(path)
    with _open(path) as src:
        _band(src, path, options)
        return _grid_of(src, path, options)


def read_raster(path: str | Path, options: ReadOptions = ReadOptions(),
                out: np.ndarray | None = None, grid: Grid | None = None) -> tuple[np.ndarray, Grid, dict]:
    """Read one day: float32 values with NaN for nodata, its :class:`Grid`, and CF attributes.

    Packed values are unpacked: ``stored * scale + offset`` where the band declares a scale
    or offset (GDAL's band metadata, as rioxarray's ``mask_and_scale`` reads it), and PNG
    codes become ``code / max_code * png_scale``. With
    ``out`` (a float32 array of the raster's shape) the values are read into it. With
    ``grid``, the caller vouches for the file's grid (see :func:`georeferencing_key`), and
    GDAL does not read its georeferencing.
    """
    path = Path(path)
    with _open(path, georeferenced=grid is None) as src:
        band = _band(src, path, options)
        if grid is None:
            grid = _grid_of(src, path, options)
        if out is not None and out.shape != (src.height, src.width):
            raise RunoffError(f"{path}: {src.height}x{src.width} px, expected {out.shape[0]}x{out.shape[1]}")
        is_png = src.driver == "PNG"
        if is_png and options.png_scale is None:
            raise RunoffError(f"{path}: PNG codes need a physical scale; pass --png_scale "
                              f"(the value of code {np.iinfo(src.dtypes[band - 1]).max})")
        native = np.dtype(src.dtypes[band - 1])
        try:
            if native == np.float32 and out is not None:
                raw = src.read(band, out=out)  # no copy: straight into the caller's block
            else:
                raw = src.read(band)
        except RasterioError as exc:
            raise RunoffError(f"{path}: cannot read its pixels ({first_line(exc)})") from None
        nodata = src.nodatavals[band - 1] if options.nodata is None else options.nodata
        scale, offset = src.scales[band - 1], src.offsets[band - 1]
        tags = {**src.tags(), **src.tags(band)}
        unit = src.units[band - 1] if src.units else None
    values = raw if raw.dtype == np.float32 else raw.astype(np.float32)
    if out is not None and values is not out:
        out[...] = values
        values = out
    invalid = ~np.isfinite(values) if native.kind == "f" else None
    if nodata is not None and not np.isnan(nodata):
        invalid = (raw == nodata) if invalid is None else (invalid | (raw == nodata))
    elif not is_png:
        refuse_undeclared_fill(path, raw)
    if is_png:
        values *= np.float32(options.png_scale / np.iinfo(native).max)
    if scale != 1 or offset != 0:
        values *= np.float32(scale)
        values += np.float32(offset)
    if invalid is not None:
        values[invalid] = np.nan
    attrs = {}
    units = tags.get("units") or tags.get("UNITS") or unit
    if units:
        attrs["units"] = units
    long_name = tags.get("long_name") or tags.get("LONG_NAME")
    if long_name:
        attrs["long_name"] = long_name
    return values, grid, attrs


# Values that land-surface-model products and GIS tools write for "no data". A file that
# holds one without declaring a nodata value would put it into the cube as runoff.
_FILL_VALUES = np.array([-9999, -99999, -999, -32768, -32767])
_FILL_MAGNITUDE = 1e15  # float32 max, 1e20, netCDF's default fill 9.97e36


def refuse_undeclared_fill(source: str | Path, raw: np.ndarray) -> None:
    """One clear error when ``raw`` (values where no nodata was declared) holds a common fill value."""
    if raw.size == 0 or raw.dtype.kind not in "if":
        return  # unsigned codes hold no negative fill
    low, high = np.fmin.reduce(raw, axis=None), np.fmax.reduce(raw, axis=None)  # NaN skipped (masked cells)
    if low > _FILL_VALUES.max() and high < _FILL_MAGNITUDE:
        return  # no value can be a fill: two passes instead of the membership test
    if raw.dtype.kind == "f":
        fills = np.isin(raw, _FILL_VALUES) | (np.abs(raw) >= _FILL_MAGNITUDE)
    else:
        limits = np.iinfo(raw.dtype)
        fills = np.isin(raw, _FILL_VALUES[(_FILL_VALUES >= limits.min) & (_FILL_VALUES <= limits.max)])
    if fills.any():
        value = raw[fills][0]
        text = f"{float(value):g}"
        if raw.dtype.type(float(text)) != value:  # e.g. float32's largest value: spell it so it reads back
            text = repr(float(value))
        raise RunoffError(f"{source}: {int((raw == value).sum())} cell(s) hold {text}, a fill value, but the file "
                          f"does not declare it as nodata; pass --nodata {text}")


def raster_env() -> rasterio.Env:
    """GDAL settings for reading many files from one folder.

    Without them GDAL lists the whole folder at every open to look for side-car
    files, which makes reading N files of one folder cost O(N^2).
    """
    return rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="TRUE")


def read_mask(path: str | Path, expected: Grid, expected_from: str, option: str) -> np.ndarray:
    """The pixels a raster selects on ``expected``'s grid: where it is neither nodata nor 0
    (a catchment rasterised in a GIS onto the cube's grid). One error naming ``option`` and
    the file for a file off that grid or one that selects nothing.

    >>> read_mask("basin.tif", cube_grid(ds), "the cube stores/qs.zarr", "--mask")   # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise RunoffError(f"{option} {path}: no such file")
    values, grid, _ = read_raster(path)
    if not grid.matches(expected):
        raise RunoffError(f"{option} {grid_error(path, grid, expected, expected_from)}")
    selected = np.isfinite(values) & (values != 0)
    if not selected.any():
        raise RunoffError(f"{option} {path}: selects no pixel (every one is 0 or nodata)")
    return selected


def grid_error(path: Path, grid: Grid, expected: Grid, expected_from: str) -> RunoffError:
    """The one-line error for a raster that does not lie on the expected grid."""
    return RunoffError(f"{path}: grid {grid.describe()} differs from {expected_from}: {expected.describe()}")


RESAMPLING = ("bilinear", "average", "nearest")


def resample_onto(values: np.ndarray, source: Grid, grid: Grid, method: str, out: np.ndarray) -> None:
    """Resample one day's ``values`` on ``source`` onto ``grid`` into ``out`` (rasterio's
    warp, as rioxarray's ``reproject_match`` does), NaN staying nodata: e.g. a rain forecast
    that comes on a coarser grid than the runoff."""
    from rasterio.enums import Resampling
    from rasterio.warp import reproject

    out[...] = np.nan
    with raster_env():
        reproject(values, out, src_transform=source.affine, src_crs=source.crs, src_nodata=np.nan,
                  dst_transform=grid.affine, dst_crs=grid.crs, dst_nodata=np.nan,
                  resampling=Resampling[method])


def check_grids(paths: Iterable[Path], expected: Grid | None, options: ReadOptions,
                expected_from: str = "", threads: int = 4) -> Grid:
    """Check, from headers only, that every raster lies on ``expected`` (or the first file's grid).

    Returns the common grid; raises :class:`RunoffError` naming the first file that differs.
    """
    from concurrent.futures import ThreadPoolExecutor

    paths = list(paths)
    if not paths:
        raise RunoffError("no rasters to check")

    def header(path: Path) -> Grid:
        with raster_env():
            return read_grid(path, options)

    first = header(paths[0])
    if expected is None:
        expected, expected_from = first, f"the first file {paths[0]}"
    elif not first.matches(expected):
        raise grid_error(paths[0], first, expected, expected_from)
    key = georeferencing_key(paths[0])  # files with the first one's tags need no header of their own
    rest = [path for path in paths[1:] if key is None or georeferencing_key(path) != key]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for path, grid in zip(rest, pool.map(header, rest)):
            if not grid.matches(expected):
                raise grid_error(path, grid, expected, expected_from)
    return expected
