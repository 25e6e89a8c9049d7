"""Each metric against a value computed by hand on a tiny array."""

import math

import numpy as np
import pytest

from pipeline.baselines import climatology
from pipeline.verify import bias, contingency, fss, kge, kge_map, mae, mse, nse, nse_map, rmse

T = np.array([0.0, 2.0, 4.0, np.nan])
P = np.array([1.0, 2.0, 2.0, 7.0])  # the last pixel is invalid in the truth: ignored


def test_continuous_scores_by_hand():
    # errors on valid pixels: 1, 0, -2
    assert mse(P, T) == pytest.approx((1 + 0 + 4) / 3)
    assert rmse(P, T) == pytest.approx(math.sqrt(5 / 3))
    assert mae(P, T) == pytest.approx(1.0)
    assert bias(P, T) == pytest.approx(-1 / 3)
    # truth mean 2 -> variance sum 4 + 0 + 4 = 8
    assert nse(P, T) == pytest.approx(1 - 5 / 8)


def test_kge_by_hand():
    p, t = np.array([1.0, 2.0, 2.0]), np.array([0.0, 2.0, 4.0])
    r = np.corrcoef(p, t)[0, 1]                 # 0.866...
    alpha = p.std() / t.std()                   # 0.4714 / 1.633
    beta = p.mean() / t.mean()                  # 5/3 / 2
    assert kge(P, T) == pytest.approx(1 - math.sqrt((r - 1) ** 2 + (alpha - 1) ** 2 + (beta - 1) ** 2))
    assert kge(t, t) == pytest.approx(1.0)


def test_contingency_by_hand():
    truth = np.array([5.0, 5.0, 0.0, 0.0, 5.0])
    pred = np.array([5.0, 0.0, 5.0, 0.0, 6.0])  # hits 2, misses 1, false alarms 1
    scores = contingency(pred, truth, threshold=3.0)
    assert scores == pytest.approx({"csi": 2 / 4, "pod": 2 / 3, "far": 1 / 3})


def test_fss_by_hand():
    truth = np.zeros((3, 3))
    truth[1, 1] = 1.0
    pred = np.zeros((3, 3))
    pred[1, 2] = 1.0
    assert fss(pred, truth, 0.5, scale=1) == pytest.approx(0.0)  # no overlap at pixel scale
    # 3x3 mean filter, zero outside: fractions 1/9 over the windows covering each event
    fp = np.zeros((3, 3))
    fp[:, 1:] = 1 / 9
    ft = np.full((3, 3), 1 / 9)
    expected = 1 - np.sum((fp - ft) ** 2) / (np.sum(fp ** 2) + np.sum(ft ** 2))
    assert fss(pred, truth, 0.5, scale=3) == pytest.approx(expected)
    assert fss(truth, truth, 0.5, scale=1) == pytest.approx(1.0)


def test_nse_map_by_hand():
    truth = np.array([[[0.0]], [[2.0]], [[4.0]]])
    pred = np.array([[[1.0]], [[2.0]], [[2.0]]])
    assert nse_map(pred, truth)[0, 0] == pytest.approx(1 - 5 / 8)
    assert np.isnan(nse_map(pred, np.full_like(truth, np.nan))[0, 0])


def test_climatology_is_a_smoothed_day_of_year_mean(tmp_path):
    import pandas as pd
    import xarray as xr

    times = pd.date_range("2019-01-01", periods=730, freq="D")
    values = np.arange(730, dtype=np.float32)[:, None, None] % 365 * np.ones((1, 2, 2), np.float32)
    ds = xr.Dataset({"qs": (("time", "y", "x"), values)}, coords={"time": times})
    clim, ok = climatology(ds, "2019-01-01", "2020-12-30", window=0)
    assert ok[:365].all()
    assert clim[100, 0, 0] == pytest.approx(100.0)
    smooth, _ = climatology(ds, "2019-01-01", "2020-12-30", window=1)
    assert smooth[100, 0, 0] == pytest.approx(100.0)  # a linear ramp is unchanged by a centred mean


def test_kge_map_equals_pooled_kge_per_pixel():
    rng = np.random.default_rng(0)
    truth = rng.gamma(1.0, 2.0, size=(20, 2, 3))
    pred = truth * 0.8 + rng.normal(0, 0.3, size=truth.shape)
    pred[3, 0, 0] = np.nan
    maps = kge_map(pred, truth)
    for y in range(2):
        for x in range(3):
            assert maps[y, x] == pytest.approx(kge(pred[:, y, x], truth[:, y, x]), rel=1e-5)


def test_accumulators_streamed_in_pieces_equal_one_pass():
    from pipeline.verify import ContinuousScores, EventScores, PixelScores, ScoreTable

    rng = np.random.default_rng(1)
    truth = rng.gamma(0.5, 3.0, size=(12, 9, 11)) * (rng.random((12, 9, 11)) > 0.4)
    pred = truth + rng.normal(0, 0.5, size=truth.shape)
    truth[2, 3:5] = np.nan
    whole = ScoreTable([1.0, 4.0]).accumulate(pred, truth).compute()
    streamed = ScoreTable([1.0, 4.0])
    for k in range(12):  # one map at a time, as evaluate feeds them
        streamed.accumulate(pred[k], truth[k])
    assert streamed.compute() == pytest.approx(whole, rel=1e-10)
    halves = ContinuousScores().accumulate(pred[:5], truth[:5]).merge(ContinuousScores().accumulate(pred[5:], truth[5:]))
    assert halves.compute() == pytest.approx({k: whole[k] for k in halves.compute()}, rel=1e-10)
    assert halves.compute()["nse"] == pytest.approx(nse(pred, truth), rel=1e-12)
    assert EventScores([4.0], [9]).accumulate(pred, truth).compute()["fss9@4"] == pytest.approx(fss(pred, truth, 4.0, 9))
    pixels = PixelScores((9, 11))
    for k in range(0, 12, 5):
        pixels.accumulate(pred[k:k + 5], truth[k:k + 5])
    maps = pixels.compute()
    np.testing.assert_allclose(maps["nse"], nse_map(pred, truth), rtol=1e-6)
    np.testing.assert_allclose(maps["kge"], kge_map(pred, truth), rtol=1e-6)
    assert maps["nse"][4, 4] == pytest.approx(nse(pred[:, 4, 4], truth[:, 4, 4]), rel=1e-5)
