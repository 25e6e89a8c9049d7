"""Reference forecasts a model must beat: persistence (tomorrow looks like today) and
climatology (the mean of the training days around the same day of year), their
ensembles for probabilistic scores (:class:`ClimatologyEnsemble`,
:class:`PersistenceEnsemble`), and the event thresholds the scores use by default.

Both read the cube day by day: memory holds a few maps, never the training split.

>>> import numpy as np, pandas as pd, xarray as xr
>>> times = pd.date_range("2019-01-01", periods=60, freq="D")
>>> ds = xr.Dataset({"qs": (("time", "y", "x"), np.ones((60, 2, 2), np.float32))}, coords={"time": times})
>>> clim = Climatology(ds, "2019-01-01", "2019-02-15")
>>> float(clim.for_day(40)[0, 0]), clim.source(40)
(1.0, '±15 days')
>>> clim.source(200)  # no training day within ±15 or ±45 days of day 200: the training mean
'training mean'
"""

from __future__ import annotations

import datetime as dt
from collections import OrderedDict
from typing import Sequence

import numpy as np
import xarray as xr

from .cube import evenly_spaced
from .errors import RunoffError

SOURCES = ("model", "persistence", "climatology")
ENSEMBLE_MEMBERS = 30  # members of each reference ensemble


def _day_of_year(times: xr.DataArray) -> np.ndarray:
    return times.dt.dayofyear.values - 1  # 0..365


def _add_days(total: np.ndarray, count: np.ndarray, days) -> None:
    """Add the finite values of ``days`` (T, H, W) to ``total`` and their number to ``count``."""
    block = np.asarray(days, np.float64)
    ok = np.isfinite(block)
    total += np.where(ok, block, 0.0).sum(axis=0)
    count += ok.sum(axis=0)


def _mean(total: np.ndarray, count: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan).astype(np.float32)


class Climatology:
    """Day-of-year mean of ``qs`` over the training days ``train_start .. train_end``.

    The map for day of year ``d`` averages the training days within ``±window`` days of
    ``d`` (circular over the year). Where no training day lies that close (a short
    training split), it widens to ``±wide`` days, then to the mean of all training days;
    :meth:`source` says which was used. Per-day-of-year sums are read from the cube when
    first needed and the last few kept, so that consecutive days cost one read each.
    """

    def __init__(self, ds: xr.Dataset, train_start: str | dt.date, train_end: str | dt.date, window: int = 15,
                 wide: int = 45, variable: str = "qs") -> None:
        self.days = ds[variable].sel(time=slice(str(train_start), str(train_end)))
        self.window, self.wide = window, wide
        doy = _day_of_year(self.days.time)
        self._indices = {int(d): np.flatnonzero(doy == d) for d in np.unique(doy)}
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._mean: np.ndarray | None = None
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()

    def _width(self, doy: int) -> int | None:
        """The narrowest window (``window`` or ``wide``) that holds a training day, else None."""
        for width in (self.window, self.wide):
            if any((doy + s) % 366 in self._indices for s in range(-width, width + 1)):
                return width
        return None

    def source(self, doy: int) -> str:
        """What :meth:`for_day` averages for day of year ``doy`` (0-based)."""
        width = self._width(doy)
        return "training mean" if width is None else f"±{width} days"

    def _sums(self, doy: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Sum and count of the training days on day of year ``doy``, cached: the days of a
        ``±width`` window and the next day's, not more (each is two float64 maps: 2.8 GB for
        ±45 days of 1200x1600)."""
        if doy in self._cache:
            self._cache.move_to_end(doy)
            return self._cache[doy]
        shape = self.days.shape[1:]
        total, count = np.zeros(shape), np.zeros(shape)
        if doy in self._indices:
            _add_days(total, count, self.days.data[self._indices[doy]])  # this day in every year
        self._cache[doy] = (total, count)
        while len(self._cache) > 2 * width + 2:
            self._cache.popitem(last=False)
        return total, count

    def training_mean(self) -> np.ndarray:
        """Mean of every training day (H, W), read once."""
        if self._mean is None:
            shape = self.days.shape[1:]
            total, count = np.zeros(shape), np.zeros(shape)
            chunks = getattr(self.days.data, "chunks", None)  # Dask: whole chunks at a time
            step = max(1, chunks[0][0]) if chunks and chunks[0] else max(1, self.days.shape[0])
            for start in range(0, self.days.shape[0], step):
                _add_days(total, count, self.days.data[start:start + step])
            self._mean = _mean(total, count)
        return self._mean

    def for_day(self, doy: int) -> np.ndarray:
        """The climatological map (H, W) for day of year ``doy`` (0-based), float32."""
        if doy not in self._maps:
            self._maps[doy] = self._average(doy)
            if len(self._maps) > 8:  # the leads of a window and its neighbours
                self._maps.popitem(last=False)
        return self._maps[doy]

    def _average(self, doy: int) -> np.ndarray:
        width = self._width(doy)
        if width is None:
            return self.training_mean()
        shape = self.days.shape[1:]
        total, count = np.zeros(shape), np.zeros(shape)
        for s in range(-width, width + 1):
            if (doy + s) % 366 in self._indices:
                t, c = self._sums((doy + s) % 366, width)
                total += t
                count += c
        return _mean(total, count)


def _spread_picks(count: int, members: int) -> np.ndarray:
    """``members`` indices spread evenly over ``count`` items (repeating some when fewer)."""
    return np.linspace(0, count - 1, members).round().astype(int)


class ClimatologyEnsemble:
    """The climatological ensemble for a day of year: ``members`` training days within
    ``±window`` days of it (widened as :class:`Climatology` does: ±``wide``, then every
    training day), spread evenly over those days, as maps (members, H, W). The members of
    the last ``cached`` days of year asked for are kept: a forecast issued each day asks for
    the next ``max(leads)`` valid days, so that many are read once each.

    >>> import numpy as np, pandas as pd, xarray as xr
    >>> times = pd.date_range("2019-01-01", periods=60, freq="D")
    >>> values = np.arange(60, dtype=np.float32)[:, None, None] * np.ones((1, 2, 2), np.float32)
    >>> ds = xr.Dataset({"qs": (("time", "y", "x"), values)}, coords={"time": times})
    >>> members = ClimatologyEnsemble(ds, "2019-01-01", "2019-02-15", members=4).for_day(20)
    >>> members.shape, members[:, 0, 0].tolist()
    ((4, 2, 2), [5.0, 15.0, 25.0, 35.0])
    """

    def __init__(self, ds: xr.Dataset, train_start: str | dt.date, train_end: str | dt.date, window: int = 15,
                 wide: int = 45, members: int = ENSEMBLE_MEMBERS, variable: str = "qs", cached: int = 8) -> None:
        self.days = ds[variable].sel(time=slice(str(train_start), str(train_end)))
        self.doy = _day_of_year(self.days.time)
        self.window, self.wide, self.members, self.cached = window, wide, members, cached
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()

    def _candidates(self, doy: int) -> np.ndarray:
        for width in (self.window, self.wide):
            gap = np.abs((self.doy - doy + 183) % 366 - 183)  # circular distance in days
            found = np.flatnonzero(gap <= width)
            if found.size:
                return found
        return np.arange(self.days.shape[0])

    def for_day(self, doy: int) -> np.ndarray:
        """Members (M, H, W) for day of year ``doy`` (0-based), float32; the last ``cached`` kept."""
        if doy not in self._maps:
            found = self._candidates(doy)
            picks = found[_spread_picks(found.size, self.members)]  # sorted: one read of those days
            self._maps[doy] = np.asarray(self.days.data[picks], np.float32)
            if len(self._maps) > self.cached:
                self._maps.popitem(last=False)
        return self._maps[doy]


class PersistenceEnsemble:
    """Today's map plus the errors persistence made at each lead on ``members`` training
    days spread over the split (``y[t + lead] - y[t]``, whole maps, so that the errors keep
    their spatial pattern), clipped at 0: the spread persistence has earned.

    >>> import numpy as np, pandas as pd, xarray as xr
    >>> times = pd.date_range("2019-01-01", periods=40, freq="D")
    >>> values = np.arange(40, dtype=np.float32)[:, None, None] * np.ones((1, 2, 2), np.float32)
    >>> ds = xr.Dataset({"qs": (("time", "y", "x"), values)}, coords={"time": times})
    >>> ensemble = PersistenceEnsemble(ds, "2019-01-01", "2019-01-30", leads=[1, 2], members=3)
    >>> ensemble.members(np.zeros((2, 2), np.float32), 2)[:, 0, 0].tolist()
    [2.0, 2.0, 2.0]
    """

    def __init__(self, ds: xr.Dataset, train_start: str | dt.date, train_end: str | dt.date,
                 leads: list[int], members: int = ENSEMBLE_MEMBERS, variable: str = "qs") -> None:
        days = ds[variable].sel(time=slice(str(train_start), str(train_end)))
        issues = np.arange(days.shape[0] - max(leads))
        if issues.size == 0:
            raise ValueError("the training split is shorter than the longest lead")
        picks = issues[_spread_picks(issues.size, members)]
        today = np.asarray(days.data[picks], np.float32)  # read once for every lead
        self._errors = {lead: np.asarray(days.data[picks + lead], np.float32) - today for lead in leads}

    def members(self, today: np.ndarray, lead: int) -> np.ndarray:
        """Members (M, H, W) for ``lead`` from today's map (H, W)."""
        return np.maximum(today[None] + self._errors[lead], 0)


def climatology(ds: xr.Dataset, train_start, train_end, window: int = 15) -> tuple[np.ndarray, np.ndarray]:
    """Every day of year at once, without fallback: (366, H, W) maps, and a flag per day of
    year saying whether a training day lay within ±``window`` days (small cubes and tests)."""
    clim = Climatology(ds, train_start, train_end, window=window, wide=window)
    covered = np.array([clim._width(d) is not None for d in range(366)])
    shape = clim.days.shape[1:]
    maps = np.stack([clim.for_day(d) if covered[d] else np.full(shape, np.nan, np.float32) for d in range(366)])
    return maps, covered


def check_thresholds(thresholds: Sequence[float] | None, option: str) -> None:
    """One clear error naming ``option`` when user thresholds (data units) go below 0,
    which runoff never does, or one is given twice (its maps and scores would be written twice)."""
    if thresholds is None:
        return
    given = f"{option} {','.join(f'{t:g}' for t in thresholds)}"
    if any(thr < 0 for thr in thresholds):
        raise RunoffError(f"{given}: thresholds must be >= 0 (data units)")
    if len(set(thresholds)) < len(thresholds):
        raise RunoffError(f"{given}: a threshold is given twice")


def wet_thresholds(ds: xr.Dataset, train_start, train_end, quantiles=(0.9, 0.99), max_days: int = 120,
                   variable: str = "qs", mask: np.ndarray | None = None) -> list[float]:
    """Quantiles of the wet (> 0) training pixels (those of ``mask`` only, if given), in data
    units, from at most ``max_days`` training days spread evenly over the split (bounded
    memory on long cubes)."""
    days = ds[variable].sel(time=slice(str(train_start), str(train_end)))
    picks = evenly_spaced(np.arange(days.shape[0]), max_days)
    wet = []
    for i in picks:
        day = np.asarray(days.data[int(i)])
        wet.append(day[np.isfinite(day) & (day > 0) & (True if mask is None else mask)])
    wet = np.concatenate(wet) if wet else np.empty(0)
    if wet.size == 0:
        return [0.1]
    return [float(np.quantile(wet, q)) for q in quantiles]
