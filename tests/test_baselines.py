"""Persistence and climatology references: climatology falls back where the training
split does not cover a day of the year, so every source scores the same windows."""

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from pipeline.baselines import Climatology, ClimatologyEnsemble, climatology, wet_thresholds


def _ds(days: int = 120) -> xr.Dataset:
    times = pd.date_range("2019-01-01", periods=days, freq="D")
    values = (np.arange(days, dtype=np.float32)[:, None, None] + np.zeros((1, 3, 2), np.float32))
    values[5, 0, 0] = np.nan
    return xr.Dataset({"qs": (("time", "y", "x"), values)}, coords={"time": times}).chunk({"time": 16})


def test_climatology_window_equals_the_mean_of_the_days_around_it():
    ds = _ds()
    clim = Climatology(ds, "2019-01-01", "2019-03-31")  # days of year 0..89
    assert clim.source(40) == "±15 days"
    assert clim.for_day(40)[1, 1] == pytest.approx(np.mean(np.arange(25, 56)))
    maps, ok = climatology(ds, "2019-01-01", "2019-03-31")
    np.testing.assert_allclose(maps[40], clim.for_day(40))
    assert not ok[150]


def test_climatology_falls_back_to_a_wider_window_then_the_training_mean():
    ds = _ds()
    clim = Climatology(ds, "2019-01-01", "2019-03-31")
    assert clim.source(89 + 30) == "±45 days"  # 30 days past the last training day
    assert clim.for_day(89 + 30)[1, 1] == pytest.approx(np.mean(np.arange(89 + 30 - 45, 90)))
    assert clim.source(250) == "training mean"
    assert clim.for_day(250)[1, 1] == pytest.approx(np.mean(np.arange(90)))
    assert clim.for_day(250)[0, 0] == pytest.approx(np.mean(np.delete(np.arange(90), 5)))  # NaN skipped


def test_climatology_keeps_the_sums_of_one_window_of_days_of_year():
    """Each day of year's sums are two float64 maps: day after day along a ±15-day window it
    keeps 32 of them, not the 92 a ±45-day fallback needs (2.8 GB on a 1200x1600 grid)."""
    clim = Climatology(_ds(), "2019-01-01", "2019-03-31")
    for doy in range(15, 75):
        clim.for_day(doy)
    assert len(clim._cache) == 2 * clim.window + 2
    assert clim.for_day(74)[1, 1] == pytest.approx(np.mean(np.arange(59, 90)))
    assert clim.for_day(89 + 30)[1, 1] == pytest.approx(np.mean(np.arange(89 + 30 - 45, 90)))  # the fallback


def test_climatological_ensemble_keeps_the_members_of_one_window_of_leads():
    """A day's forecasts ask for the next max(leads) valid days; the members of those are
    read once each (30 maps a day of year: 1.8 GB for 8 days on a 1200x1600 grid)."""
    ensemble = ClimatologyEnsemble(_ds(), "2019-01-01", "2019-03-31", members=4, cached=3)
    given = [ensemble.for_day(issue + lead) for issue in range(19, 30) for lead in (1, 2, 3)]  # day after day
    assert len({id(members) for members in given}) == len(range(20, 33))  # each day of year read once
    assert list(ensemble._maps) == [30, 31, 32]
    again = ensemble.for_day(20)
    assert again is not given[0]
    np.testing.assert_array_equal(again, given[0])  # read again: the same members


def test_wet_thresholds_are_quantiles_of_wet_training_pixels():
    ds = _ds(40)
    thresholds = wet_thresholds(ds, "2019-01-01", "2019-02-09", quantiles=(0.5,))
    values = ds.qs.values
    assert thresholds[0] == pytest.approx(np.quantile(values[np.isfinite(values) & (values > 0)], 0.5))
