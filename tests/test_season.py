"""`runoff train --season`: where each past day lies in the year, an input computed from the
cube's dates (no variable of the cube), the same in training windows and in forecasts."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.checkpoint import read_checkpoint
from pipeline.cube import SEASON_INPUTS, cube_dates, make_splits, normalise, open_cube, season_values
from pipeline.inference import window_inputs
from pipeline.sampler import WindowSampler, WindowSpec, window_issues

from .conftest import predict_and_evaluate, synthetic_cube


@pytest.fixture(scope="module")
def season_run(tmp_path_factory):
    """90 days from New Year (the season changes from day to day) and a model trained on
    them for one epoch with --season."""
    from pipeline.cli import main

    root = tmp_path_factory.mktemp("season")
    cube = synthetic_cube(root, days=90, height=20, width=24, seed=4)
    assert main(["train", "--data_dir", cube, "--epochs", "1", "--batch_size", "4", "--hidden_channels", "4",
                 "--patch", "16", "--leads", "1-2", "--season", "--checkpoint_dir", str(root / "ckpt"),
                 "--output_dir", str(root / "out"), "--device", "cpu"]) == 0
    return root


def test_season_values_follow_the_day_of_year():
    import xarray as xr

    times = np.array(["2001-01-01", "2001-07-02", "2004-12-31"], "datetime64[ns]")
    ds = xr.Dataset(coords={"time": times})
    cos, sin = (season_values(ds, name) for name in SEASON_INPUTS)
    assert cos.dtype == np.float32 and cos.min() >= 0 and sin.min() >= 0
    np.testing.assert_allclose(cos, [2.0, 0.0, 2.0], atol=2e-4)  # new year, midsummer, new year again
    np.testing.assert_allclose(sin, [1.0, 1.0, 1.0], atol=2e-2)


def test_the_checkpoint_records_the_season_inputs_and_resume_keeps_them(season_run, tmp_path, run_cli):
    ckpt = read_checkpoint(season_run / "ckpt" / "best.pth")
    assert ckpt.variables == ["qs", *SEASON_INPUTS]
    assert ckpt.build_model().config.in_channels == 3
    assert set(SEASON_INPUTS) <= set(ckpt.norm_stats) and ckpt.state["train_config"]["season"] is True
    result = run_cli("train", "--resume", season_run / "ckpt" / "model_epoch1.pth", "--epochs", "2",
                     "--checkpoint_dir", tmp_path / "ckpt", "--output_dir", tmp_path / "out")
    assert result.status == 0, result.err
    assert read_checkpoint(tmp_path / "ckpt" / "model_epoch2.pth").variables == ckpt.variables


def test_training_windows_and_forecast_inputs_hold_the_same_season(season_run):
    store = str(season_run / "qs.zarr")
    ckpt = read_checkpoint(season_run / "ckpt" / "best.pth")
    ds = open_cube(store)
    spec = WindowSpec(6, (1, 2), tuple(ckpt.variables))
    issues = window_issues(ds, ckpt.splits["val"], spec)
    window = next(iter(WindowSampler(store, issues[:1], spec, ckpt.norm_stats)))
    for c, name in enumerate(SEASON_INPUTS, start=1):
        expected = normalise(season_values(ds, name)[issues[0] - 5:issues[0] + 1], ckpt.norm_stats[name])
        days = window.x[:, c].numpy()
        np.testing.assert_allclose(days, np.broadcast_to(expected[:, None, None], days.shape), rtol=1e-6)
    forecast = window_inputs(ds, ckpt.variables, ckpt.norm_stats, issues[:1], 6)[0]
    valid = np.isfinite(forecast)  # the forecast keeps NaN where the sampler writes 0
    np.testing.assert_allclose(forecast[valid], window.x.numpy()[valid], rtol=1e-6)


def test_season_statistics_are_the_same_from_one_block_or_many(season_run):
    store = str(season_run / "qs.zarr")
    ds = open_cube(store)
    dates = cube_dates(ds)
    train = make_splits(dates[0], dates[-1])["train"]
    spec = WindowSpec(6, (1,), ("qs", *SEASON_INPUTS))
    issues = window_issues(ds, train, spec)
    one_block = WindowSampler(store, issues, spec, {}).fit_stats(train)
    many_blocks = WindowSampler(store, issues, spec, {}, block_bytes=2**14).fit_stats(train)
    for name in SEASON_INPUTS:
        for key in ("mean", "std", "rms"):
            assert one_block[name][key] == pytest.approx(many_blocks[name][key], rel=1e-4), (name, key)


def test_predict_and_evaluate_compute_the_season_from_the_dates(season_run, tmp_path, run_cli):
    written, metrics = predict_and_evaluate(run_cli, season_run / "ckpt" / "best.pth", season_run / "qs.zarr",
                                            tmp_path)
    assert written == 2 and "covariates: season_cos, season_sin" in metrics


def test_a_short_record_is_warned_about(season_run, tmp_path, run_cli):
    result = run_cli("train", "--data_dir", season_run / "qs.zarr", "--epochs", "1", "--batch_size", "4",
                     "--hidden_channels", "4", "--patch", "16", "--season", "--checkpoint_dir", tmp_path / "ckpt",
                     "--output_dir", tmp_path / "out")
    assert result.status == 0, result.err
    warning = [line for line in result.err.splitlines() if "--season" in line]
    assert len(warning) == 1 and "0.2 years of training days" in warning[0], result.err
