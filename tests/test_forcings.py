"""Forcings: inputs known on the lead days (a rain forecast). Trained with, recorded in the
checkpoint, used by predict and evaluate without being told again; operationally the cube
runs past the last qs day with the forecast rain."""

from __future__ import annotations

import json
import math
import shutil
import warnings

import numpy as np
import pytest
import torch
import xarray as xr

from pipeline.checkpoint import load_checkpoint
from pipeline.synth import write_series

from .conftest import one_error_line, tree_digest


@pytest.fixture(scope="module")
def rain_run(tmp_path_factory):
    """80 days of the river regime with its rain, the last two days' runoff not yet
    observed (their rain is the forecast), and a model trained with ``--forcings rainf``."""
    from pipeline.cli import main

    root = tmp_path_factory.mktemp("forcings")
    write_series(root / "in", days=80, height=24, width=32, seed=3, regime="river", covariates=["rainf"])
    for day in ("20190320", "20190321"):
        (root / "in" / "Qs" / f"QS_{day}.tif").unlink()
    assert main(["ingest", str(root / "in"), str(root / "qs.zarr")]) == 0
    assert main(["train", "--data_dir", str(root / "qs.zarr"), "--epochs", "1", "--batch_size", "4",
                 "--hidden_channels", "4", "--patch", "16", "--leads", "1-2", "--forcings", "rainf",
                 "--checkpoint_dir", str(root / "ckpt"), "--output_dir", str(root / "out"), "--device", "cpu"]) == 0
    return root


def test_checkpoint_records_the_forcings_and_the_model_reads_them(rain_run):
    state = load_checkpoint(rain_run / "ckpt" / "best.pth")
    assert state["forcings"] == ["rainf"] and state["variables"] == ["qs"]
    assert state["model_config"]["forcing_channels"] == 2  # rainf on lead days 1 and 2
    assert state["train_config"]["predict_delta"] is True


def test_predict_last_uses_the_forecast_rain_after_the_last_runoff_day(rain_run, tmp_path, run_cli):
    result = run_cli("predict", "--weights_path", rain_run / "ckpt" / "best.pth", "--input_dir",
                     rain_run / "qs.zarr", "--output_dir", tmp_path / "pred", "--last", "--max_plots", "0")
    assert result.status == 0, result.err
    assert sorted(p.name for p in (tmp_path / "pred").glob("*.tif")) == ["QS_20190320_lead1.tif",
                                                                          "QS_20190321_lead2.tif"]


def test_a_missing_forecast_day_is_one_error_naming_it(rain_run, tmp_path, run_cli):
    folder = tmp_path / "in"
    shutil.copytree(rain_run / "in", folder)
    (folder / "Rainf" / "RAINF_20190321.tif").unlink()
    assert run_cli("ingest", folder, tmp_path / "qs.zarr").status == 0
    result = run_cli("predict", "--weights_path", rain_run / "ckpt" / "best.pth", "--input_dir", tmp_path / "qs.zarr",
                     "--output_dir", tmp_path / "pred", "--last", "--max_plots", "0")
    assert result.status == 2
    line = one_error_line(result.err)
    assert "rainf" in line and "2019-03-21" in line
    assert not list((tmp_path / "pred").glob("*.tif"))


def test_predict_of_every_day_stops_where_the_rain_of_the_lead_days_ends(rain_run, tmp_path, run_cli):
    folder = tmp_path / "in"  # a hindcast: the cube ends with the last runoff day
    shutil.copytree(rain_run / "in", folder)
    for day in ("20190320", "20190321"):
        (folder / "Rainf" / f"RAINF_{day}.tif").unlink()
    assert run_cli("ingest", folder, tmp_path / "qs.zarr").status == 0
    result = run_cli("predict", "--weights_path", rain_run / "ckpt" / "best.pth", "--input_dir", tmp_path / "qs.zarr",
                     "--output_dir", tmp_path / "pred", "--max_plots", "0")
    assert result.status == 0, result.err
    latest = sorted(p.name for p in (tmp_path / "pred").glob("*.tif"))[-2:]
    assert latest == ["QS_20190318_lead2.tif", "QS_20190319_lead2.tif"]  # issued 03-16 and 03-17, the last with rain


def test_evaluate_says_the_rain_was_a_perfect_forecast(rain_run, tmp_path, run_cli):
    result = run_cli("evaluate", "--weights_path", rain_run / "ckpt" / "best.pth", "--data_dir", rain_run / "qs.zarr",
                     "--output_dir", tmp_path / "eval")
    assert result.status == 0, result.err
    first = result.out.splitlines()[0]
    assert first.startswith("lead 1: skill vs persistence") and "vs climatology" in first
    assert "forcings: rainf, observed values used as a perfect forecast" in first
    assert "forcings: rainf" in (tmp_path / "eval" / "metrics.md").read_text()


def test_evaluate_and_predict_read_a_forcing_from_another_variable_as_a_cube_holding_it_would(
        rain_run, tmp_path, run_cli):
    import rasterio

    from pipeline.cube import open_cube

    ds = open_cube(rain_run / "qs.zarr")
    forecast = (ds["rainf"] * 3).assign_attrs(ds["rainf"].attrs)  # an archive of (poor) rain forecasts
    with warnings.catch_warnings():  # "consolidated metadata is not in the v3 spec", as ingest knows
        warnings.simplefilter("ignore")
        ds.assign(rainf_fc=forecast).to_zarr(tmp_path / "both.zarr", consolidated=True)
        ds.assign(rainf=forecast).to_zarr(tmp_path / "swapped.zarr", consolidated=True)

    def scores(cube: str, out: str, *options: str) -> tuple[dict, str]:
        result = run_cli("evaluate", "--weights_path", rain_run / "ckpt" / "best.pth", "--data_dir",
                         tmp_path / cube, "--output_dir", tmp_path / out, "--device", "cpu", *options)
        assert result.status == 0, result.err
        return json.loads((tmp_path / out / "metrics.json").read_text()), result.out

    (read_from, out), (swapped, _), (observed, _) = (scores("both.zarr", "a", "--forcings", "rainf=rainf_fc"),
                                                     scores("swapped.zarr", "b"), scores("both.zarr", "c"))
    assert read_from["leads"] == swapped["leads"] and read_from["leads"] != observed["leads"]
    assert read_from["meta"]["forcings_from"] == {"rainf": "rainf_fc"} and "forcings_from" not in observed["meta"]
    assert "forcings: rainf read from rainf_fc (--forcings)" in out.splitlines()[0]

    def forecast(cube: str, out: str, *options: str) -> tuple[np.ndarray, dict]:
        result = run_cli("predict", "--weights_path", rain_run / "ckpt" / "best.pth", "--input_dir", tmp_path / cube,
                         "--output_dir", tmp_path / out, "--last", "--max_plots", "0", "--device", "cpu", *options)
        assert result.status == 0, result.err
        with rasterio.open(tmp_path / out / "QS_20190321_lead2.tif") as f:  # issued on the last runoff day
            return f.read(1), f.tags()

    (read_from, tags), (swapped, _), (observed, plain) = (
        forecast("both.zarr", "p", "--forcings", "rainf=rainf_fc", "--format", "netcdf"),
        forecast("swapped.zarr", "q"), forecast("both.zarr", "r"))
    assert np.array_equal(read_from, swapped, equal_nan=True)
    assert not np.array_equal(read_from, observed, equal_nan=True)
    assert tags["forcings_from"] == "rainf=rainf_fc" and "forcings_from" not in plain
    with xr.open_dataset(next((tmp_path / "p").glob("*.nc"))) as written:
        assert written.attrs["forcings_from"] == "rainf=rainf_fc" and "checkpoint_sha256" in written.attrs

    before = tree_digest(tmp_path / "both.zarr")
    for command, value, words in (("evaluate", "rainf=soilm", "has no variable soilm"),
                                  ("predict", "snow=rainf_fc", "reads no forcing snow"),
                                  ("evaluate", "rainf", "expected NAME=VARIABLE")):
        cube_option = "--data_dir" if command == "evaluate" else "--input_dir"
        result = run_cli(command, "--weights_path", rain_run / "ckpt" / "best.pth", cube_option,
                         tmp_path / "both.zarr", "--output_dir", tmp_path / "bad", "--forcings", value)
        assert result.status == 2 and words in one_error_line(result.err)
    assert not (tmp_path / "bad").exists() and tree_digest(tmp_path / "both.zarr") == before


def test_untrained_model_is_persistence(rain_run):
    from pipeline.checkpoint import build_model

    state = load_checkpoint(rain_run / "ckpt" / "best.pth")
    fresh = build_model(state["model_config"])
    x, rain = torch.randn(2, 6, 1, 8, 8), torch.randn(2, 2, 1, 8, 8)
    torch.testing.assert_close(fresh(x, rain), x[:, -1:, :1].expand(2, 2, 1, 8, 8))


def test_forecast_error_is_a_smooth_factor_of_mean_one_that_keeps_dry_days_dry():
    from pipeline.forcing_error import forecast_error

    stats = {"mean": 0.5, "std": 2.0}
    physical = torch.full((64, 1, 1, 32, 32), 5.0)
    physical[:, :, :, :4] = 0.0  # dry rows
    rain = (torch.log1p(physical) - stats["mean"]) / stats["std"]
    noisy = forecast_error(rain, [stats], 0.5, 2.0, torch.Generator().manual_seed(1))
    again = forecast_error(rain, [stats], 0.5, 2.0, torch.Generator().manual_seed(1))
    assert torch.equal(noisy, again)
    factor = torch.expm1(noisy * stats["std"] + stats["mean"]) / 5.0
    assert torch.allclose(factor[:, :, :, :4], torch.zeros(()), atol=1e-5)  # no rain from a dry day
    wet = factor[:, 0, 0, 4:]
    assert abs(float(wet.mean()) - 1.0) < 0.05 and abs(float(wet.log().std()) - 0.5) < 0.05
    log = wet.log()  # smooth: neighbours err alike, as a forecast's rain field does
    assert float(torch.corrcoef(torch.stack([log[:, :, :-1].flatten(), log[:, :, 1:].flatten()]))[0, 1]) > 0.8


def test_an_error_over_the_whole_map_is_one_factor_per_map_of_mean_one():
    """``area_sigma``: one log-normal factor per map (a storm's total misjudged), on top of the
    smooth field or alone; without it the field's draws are as they were."""
    from pipeline.forcing_error import forecast_error

    stats = {"mean": 0.5, "std": 2.0}
    rain = (torch.log1p(torch.full((400, 1, 1, 16, 16), 5.0)) - stats["mean"]) / stats["std"]

    def factor(sigma, area_sigma):
        noisy = forecast_error(rain, [stats], sigma, 2.0, torch.Generator().manual_seed(2), area_sigma)
        return (torch.expm1(noisy * stats["std"] + stats["mean"]) / 5.0)[:, 0, 0]

    whole = factor(0.0, 0.5)
    assert float(whole.log().std(dim=(1, 2)).max()) < 1e-4  # the same factor over each map
    per_map = whole[:, 0, 0]
    assert abs(float(per_map.mean()) - 1.0) < 0.05 and abs(float(per_map.log().std()) - 0.5) < 0.05
    both = factor(0.3, 0.4).log()
    assert abs(float(both.std()) - 0.5) < 0.05  # log variances add: 0.3^2 + 0.4^2 = 0.5^2
    assert float(both.std(dim=(1, 2)).mean()) < 0.3  # within a map: the field only
    assert torch.equal(factor(0.5, 0.0), factor(0.5, 0.0)) and torch.equal(
        forecast_error(rain, [stats], 0.5, 2.0, torch.Generator().manual_seed(2)),
        forecast_error(rain, [stats], 0.5, 2.0, torch.Generator().manual_seed(2), 0.0))


def test_a_large_grids_error_is_drawn_coarse_as_smooth_and_as_spread():
    from pipeline.forcing_error import smooth_noise

    # smooth over 24 pixels (a 576-pixel grid's error): drawn on a grid 12 times coarser
    noise = smooth_noise(600, 48, 48, 24.0, torch.Generator().manual_seed(3), std=0.5)
    assert noise.shape == (600, 48, 48)
    for y, x in ((0, 0), (6, 6), (30, 41)):  # a point of the coarse grid, one halfway between, one anywhere
        assert abs(float(noise[:, y, x].std()) - 0.5) < 0.04
    pairs = torch.stack([noise[:, :, :-24].flatten(), noise[:, :, 24:].flatten()])
    assert abs(float(torch.corrcoef(pairs)[0, 1]) - math.exp(-1 / 4)) < 0.05  # a Gaussian's, 24 pixels apart
    fine = smooth_noise(600, 48, 48, 3.0, torch.Generator().manual_seed(3))  # drawn at full resolution
    pairs = torch.stack([fine[:, :, :-3].flatten(), fine[:, :, 3:].flatten()])
    assert abs(float(fine.std()) - 1.0) < 0.02 and abs(float(torch.corrcoef(pairs)[0, 1]) - math.exp(-1 / 4)) < 0.02


def test_training_on_a_forecast_error_changes_the_model_and_resumes_exactly(rain_run, tmp_path, run_cli):
    common = ["--data_dir", rain_run / "qs.zarr", "--batch_size", "4", "--hidden_channels", "4", "--patch", "16",
              "--leads", "1-2", "--forcings", "rainf", "--device", "cpu", "--ema_decay", "0"]

    def run(name, *extra):
        result = run_cli("train", *common, "--checkpoint_dir", tmp_path / name, "--output_dir", tmp_path / "out",
                         *extra)
        assert result.status == 0, result.err
        return load_checkpoint(tmp_path / name / "model_epoch2.pth")

    plain = run("plain", "--epochs", "2")
    noisy = run("noisy", "--epochs", "2", "--forcing_error", "0.5")
    assert noisy["train_config"]["forcing_error"] == 0.5
    info = run_cli("info", tmp_path / "noisy" / "best.pth")
    assert info.status == 0 and "forecast error (log std 0.5)" in info.out
    assert any(not torch.equal(t, noisy["model_state"][k]) for k, t in plain["model_state"].items())
    assert run_cli("train", *common, "--epochs", "1", "--forcing_error", "0.5", "--checkpoint_dir",
                   tmp_path / "halves", "--output_dir", tmp_path / "out").status == 0
    resumed = run("halves", "--epochs", "2", "--resume", tmp_path / "halves" / "model_epoch1.pth")
    for name, tensor in noisy["model_state"].items():
        assert torch.equal(tensor, resumed["model_state"][name]), name
    whole = run("whole", "--epochs", "2", "--forcing_error", "0.5", "--forcing_error_area", "0.5")
    assert whole["train_config"]["forcing_error_area"] == 0.5
    info = run_cli("info", tmp_path / "whole" / "best.pth")
    assert "forecast error (log std 0.5; log std 0.5 over the whole map)" in info.out
    assert any(not torch.equal(t, whole["model_state"][k]) for k, t in noisy["model_state"].items())


def test_a_probabilistic_model_trained_with_a_forecast_error_has_its_spread_calibrated_with_it(
        rain_run, tmp_path, run_cli):
    common = ["--data_dir", rain_run / "qs.zarr", "--batch_size", "4", "--hidden_channels", "4", "--patch", "16",
              "--leads", "1-2", "--device", "cpu", "--epochs", "1", "--probabilistic", "--output_dir", tmp_path / "out"]
    result = run_cli("train", *common, "--forcings", "rainf", "--forcing_error", "0.5", "--calibrate_levels",
                     "--checkpoint_dir", tmp_path / "ckpt")
    assert result.status == 0, result.err
    assert "spread calibrated on the validation split with the forcings' forecast error (log std 0.5)" in result.out
    best = tmp_path / "ckpt" / "best.pth"
    assert load_checkpoint(best)["calibrated_forcing_error"] == 0.5
    # runoff calibrate takes the checkpoint's error and draws the same errors again, whatever its batches:
    # best.pth's spread and levels back (the levels, fitted on where the truth falls among the quantiles,
    # come out otherwise from other draws)
    again = run_cli("calibrate", "--weights_path", best, "--data_dir", rain_run / "qs.zarr", "--split", "val",
                    "--batch_size", "1", "--output_path", tmp_path / "val.pth")
    assert again.status == 0, again.err
    assert "forecast error (log std 0.5)" in again.out
    trained, recalibrated = load_checkpoint(best), load_checkpoint(tmp_path / "val.pth")
    assert torch.equal(trained["model_state"]["spread_scale"], recalibrated["model_state"]["spread_scale"])
    for ours, theirs in zip(trained["model_config"]["level_calibration"],
                            recalibrated["model_config"]["level_calibration"], strict=True):
        for key in ("centres", "levels"):  # to the sums' rounding: batches of 1 here, of 4 in training
            torch.testing.assert_close(torch.tensor(ours[key]), torch.tensor(theirs[key]), rtol=1e-6, atol=1e-6)
    plain = run_cli("calibrate", "--weights_path", best, "--data_dir", rain_run / "qs.zarr", "--split", "val",
                    "--forcing_error", "0", "--output_path", tmp_path / "plain.pth")
    assert plain.status == 0 and "forecast error" not in plain.out
    assert load_checkpoint(tmp_path / "plain.pth")["calibrated_forcing_error"] == 0
    whole = run_cli("calibrate", "--weights_path", best, "--data_dir", rain_run / "qs.zarr", "--split", "val",
                    "--forcing_error_area", "0.5", "--output_path", tmp_path / "whole.pth")
    assert whole.status == 0 and "(log std 0.5; log std 0.5 over the whole map)" in whole.out
    assert load_checkpoint(tmp_path / "whole.pth")["calibrated_forcing_error_area"] == 0.5

    assert run_cli("train", *common, "--checkpoint_dir", tmp_path / "alone").status == 0  # reads no forcings
    for weights, sigma, words in ((best, "3", "must be in [0, 2]"), (tmp_path / "alone" / "best.pth", "0.5",
                                                                        "reads no forcings")):
        for option in ("--forcing_error", "--forcing_error_area"):
            result = run_cli("calibrate", "--weights_path", weights, "--data_dir", rain_run / "qs.zarr", "--split",
                             "val", option, sigma, "--output_path", tmp_path / "x.pth")
            assert result.status == 2 and f"{option} {float(sigma):g}: " in one_error_line(result.err)
            assert words in result.err and not (tmp_path / "x.pth").exists()


@pytest.mark.parametrize("args, option", [
    (["--forcings", "qs"], "--forcings"),
    (["--forcing_error", "0.5"], "--forcing_error"),
    (["--forcings", "rainf", "--forcing_error", "-1"], "--forcing_error"),
    (["--forcing_error_area", "0.5"], "--forcing_error_area"),
    (["--forcings", "rainf", "--forcing_error_area", "2.5"], "--forcing_error_area"),
    (["--forcings", "rainf", "--covariates", "rainf"], "--forcings / --covariates"),
    (["--forcings", "rainf", "--covariates", "rainf"], "ingest it a second time under another name"),
    (["--forcings", "soilm"], "--forcings soilm"),
])
def test_bad_forcings_are_one_line_and_write_nothing(rain_run, tmp_path, run_cli, args, option):
    before = tree_digest(rain_run / "qs.zarr")
    result = run_cli("train", "--data_dir", rain_run / "qs.zarr", "--epochs", "1", "--checkpoint_dir",
                     tmp_path / "ckpt", "--output_dir", tmp_path / "out", *args)
    assert result.status == 2
    assert option in one_error_line(result.err)
    assert not (tmp_path / "ckpt").exists() or not list((tmp_path / "ckpt").iterdir())
    assert tree_digest(rain_run / "qs.zarr") == before


def test_river_regime_looks_like_real_runoff():
    from pipeline.synth import simulate

    q = np.stack([d.qs for d in simulate(200, 48, 64, seed=2, regime="river")])
    valid = np.isfinite(q[0])
    v = q[:, valid]
    assert np.mean(v == 0) > 0.6  # most cells dry
    means = v.mean(axis=0)
    assert means.max() > 100 * np.median(means)  # a heavy tail along the rivers
    assert np.corrcoef(v[:-1].ravel(), v[1:].ravel())[0, 1] >= 0.9  # slow recession
