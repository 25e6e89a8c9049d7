"""Probabilistic forecasts: quantiles that never cross, ensemble scores against brute force,
and `train --probabilistic` -> `predict` (quantile and exceedance maps, members) ->
`evaluate` (CRPS, Brier, spread/skill, rank histogram, reliability), with bad options."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import xarray as xr

from pipeline.checkpoint import Checkpoint, read_checkpoint
from pipeline.cube import open_cube
from pipeline.model import CEILING_FACTOR, ConvLSTMForecaster
from pipeline.synth import write_series
from pipeline.verify import ChanceReliability, EnsembleScores, reliability_gap

from .conftest import one_error_line


def test_quantiles_never_cross_and_an_untrained_model_is_centred_on_persistence():
    torch.manual_seed(0)
    model = ConvLSTMForecaster(in_channels=1, leads=2, quantiles=20)
    x = torch.randn(3, 6, 1, 12, 14)
    out = model(x)
    assert out.shape == (3, 2, 20, 12, 14)
    torch.testing.assert_close(out.mean(dim=2), x[:, -1, :1].expand(3, 2, 12, 14))
    with torch.no_grad():  # whatever the weights, the quantiles stay in order
        for p in model.parameters():
            p.normal_()
    assert (model(x).diff(dim=2) >= 0).all()


def _brute_crps(members: np.ndarray, truth: np.ndarray) -> float:
    """mean|X - y| - mean|X - X'| / 2 over every pair, pixel by pixel."""
    first = np.abs(members - truth[None]).mean(axis=0)
    pairs = np.abs(members[:, None] - members[None, :]).mean(axis=(0, 1))
    return float((first - pairs / 2).mean())


def test_ensemble_scores_equal_brute_force_and_merge():
    rng = np.random.default_rng(0)
    members = np.maximum(rng.normal(1.0, 1.0, (7, 30, 40)), 0)
    truth = np.maximum(rng.normal(1.0, 1.0, (30, 40)), 0)
    one = EnsembleScores([0.5, 2.0]).accumulate(members, truth).compute()
    assert one["crps"] == pytest.approx(_brute_crps(members, truth))
    for thr in (0.5, 2.0):
        p = (members > thr).mean(axis=0)
        assert one[f"brier@{thr:g}"] == pytest.approx(float(((p - (truth > thr)) ** 2).mean()))
    halves = EnsembleScores([0.5, 2.0]).accumulate(members[:, :15], truth[:15])
    halves.merge(EnsembleScores([0.5, 2.0]).accumulate(members[:, 15:], truth[15:]))
    assert halves.compute() == pytest.approx(one)


def test_ensemble_scores_of_a_map_in_passes_equal_one_pass(monkeypatch):
    """A large map is scored a slice of pixels at a time: the same scores, rank histogram
    (ties drawn from one stream) and reliability band as in one pass."""
    from pipeline import verify

    rng = np.random.default_rng(2)
    members = np.maximum(rng.normal(1.0, 1.0, (6, 3, 30, 40)), 0)  # ties at 0 for the ranks' draws
    truth = np.maximum(rng.normal(1.0, 1.0, (3, 30, 40)), 0)
    truth[0, :4] = np.nan

    def scored() -> verify.EnsembleScores:
        scores = verify.EnsembleScores([0.5, 2.0])
        for day in range(3):
            scores.accumulate(members[:, day], truth[day], block=day)
        return scores

    one_pass = scored()
    monkeypatch.setattr(verify, "PIXELS_PER_PASS", 7)  # 172 passes per map, the last one short
    passes = scored()
    assert passes.compute() == pytest.approx(one_pass.compute(), rel=1e-12)
    assert np.array_equal(passes.ranks, one_pass.ranks) and np.array_equal(passes.resampled, one_pass.resampled)


def test_a_calibrated_ensemble_has_a_flat_rank_histogram_and_unit_spread_skill():
    rng = np.random.default_rng(1)
    centre = rng.gamma(1.0, 2.0, (200, 50))  # truth and members: the same distribution around a centre
    members = np.maximum(centre[None] + rng.normal(0, 1, (49, 200, 50)), 0)
    truth = np.maximum(centre + rng.normal(0, 1, (200, 50)), 0)
    scores = EnsembleScores([1.0])
    scores.accumulate(members, truth)
    shares = scores.ranks / scores.ranks.sum()
    assert np.abs(shares * 50 - 1).max() < 0.35  # 50 ranks, each about a fiftieth (zeros tie at random)
    assert scores.compute()["spread_skill"] == pytest.approx(1.0, abs=0.05)
    count, forecast, observed, low, high = scores.reliability()[1.0]
    full = count >= 500
    assert np.abs(forecast[full] - observed[full]).max() < 0.05  # a member share of k/M is about k/M likely
    assert (low[full] <= observed[full]).all() and (observed[full] <= high[full]).all()


def test_the_reliability_band_holds_a_calibrated_forecast_and_excludes_a_biased_one():
    """Maps whose pixels share their day's weather: a forecast probability p is right on
    average, but within a day the outcomes move together, so the band must be wide enough
    for days, not pixels; a forecast shifted by 0.25 must fall outside it."""
    rng = np.random.default_rng(4)
    days, members = 120, 10
    calibrated, biased = EnsembleScores([0.5]), EnsembleScores([0.5])
    for _ in range(days):
        p = rng.integers(0, members + 1, (30, 40)) / members  # forecast probability of each pixel
        members_above = (np.arange(members)[:, None, None] < p * members)
        ensemble = np.where(members_above, 1.0, 0.0)
        day = rng.normal(0, 1)  # one shock for the whole map: its pixels are not independent
        truth = (rng.normal(0, 1, p.shape) * 0.3 + day < _probit(p)).astype(np.float64)
        calibrated.accumulate(ensemble, truth)
        shifted = np.where(np.arange(members)[:, None, None] < np.clip(p - 0.25, 0, 1) * members, 1.0, 0.0)
        biased.accumulate(shifted, truth)
    table = calibrated.reliability()[0.5]
    count, forecast, observed, low, high = table
    uncertain = (count >= 100) & (forecast > 0.05) & (forecast < 0.95)  # outcomes of p = 0 or 1 never vary
    assert (high[uncertain] - low[uncertain]).min() > 0.05  # wider than ~10000 independent pixels per bin give
    assert reliability_gap(table, beyond_band=True) == 0.0
    assert reliability_gap(biased.reliability()[0.5], beyond_band=True) > 0.05
    halves = EnsembleScores([0.5]).merge(calibrated)
    assert np.array_equal(halves.resampled, calibrated.resampled)


def test_maps_of_one_block_of_days_are_resampled_together_and_merge_across_accumulators():
    """The band's block bootstrap: maps given one block share their weights. Every map in
    one block leaves each replicate the whole sample (a band of zero width), a block per
    map does not, and the maps of a block split between two accumulators (ranks) merge into
    the band one accumulator gives."""
    rng = np.random.default_rng(5)
    one_block, own_blocks, blocks_of_10, odd, even = (EnsembleScores([0.5]) for _ in range(5))
    for day in range(40):
        p = rng.integers(0, 11, (8, 8)) / 10
        members = np.where(np.arange(10)[:, None, None] < p * 10, 1.0, 0.0)
        truth = (rng.random((8, 8)) < p).astype(np.float64)
        one_block.accumulate(members, truth, block=0)
        own_blocks.accumulate(members, truth, block=day)
        blocks_of_10.accumulate(members, truth, block=day // 10)
        (odd if day % 2 else even).accumulate(members, truth, block=day // 10)
    widths = {}
    for name, scores in (("one", one_block), ("own", own_blocks)):
        count, _, observed, low, high = scores.reliability()[0.5]
        uncertain = (count > 0) & (observed > 0) & (observed < 1)
        widths[name] = (high - low)[uncertain]
    assert np.allclose(widths["one"], 0.0) and widths["own"].min() > 0.01
    assert np.array_equal(odd.merge(even).resampled, blocks_of_10.resampled)


def _gaussian_days(rng: np.random.Generator, days: int, shock: float, miss: bool = False
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Maps of 20 members (quantiles of N(mu, 1) per pixel) and their truth, mu + N(0, 1):
    calibrated. ``shock``: the share of each truth's noise that its whole map shares (a day's
    weather). ``miss``: the truth's noise x0.5 where mu > 0, x1.6 elsewhere, on every day (a
    spread too wide on one side of the threshold 0.5 and too narrow on the other, about
    right over all pixels)."""
    from scipy.special import ndtri

    offsets = ndtri((np.arange(20) + 0.5) / 20)[:, None, None]
    out = []
    for _ in range(days):
        mu = rng.normal(0.0, 1.5, (20, 30))
        noise = np.sqrt(shock) * rng.normal() + np.sqrt(1 - shock) * rng.normal(0, 1, mu.shape)
        out.append((mu[None] + offsets, mu + noise * (np.where(mu > 0, 0.5, 1.6) if miss else 1.0)))
    return out


def _chance_and_gap(days: list[tuple[np.ndarray, np.ndarray]], draws: int = 30) -> tuple[np.ndarray, float]:
    """ChanceReliability's widest gaps at 0.5 (draws,) over ``days`` (a block each), and the forecast's own."""
    chance, scores = ChanceReliability([0.5], draws=draws), EnsembleScores([0.5])
    for day, (members, truth) in enumerate(days):
        chance.accumulate(members, truth, block=day)
        scores.accumulate(members, truth)
    return chance.compute()[0.5], reliability_gap(scores.reliability()[0.5])


def test_chance_gaps_follow_how_a_day_moves_its_pixels_together_and_never_take_a_miss_for_chance():
    """Forecasts calibrated by construction (ChanceReliability) from one record: as wide as
    chance leaves calibrated forecasts over many records of pixels that move together by
    the day, far wider than independent pixels give, and still narrow for a forecast whose
    spread is wrong on every day near the threshold (its gap is a miss, not chance)."""
    rng = np.random.default_rng(6)
    independent, _ = _chance_and_gap(_gaussian_days(rng, 60, shock=0.0))
    together, _ = _chance_and_gap(_gaussian_days(rng, 60, shock=0.5))
    records = [_chance_and_gap(_gaussian_days(rng, 60, shock=0.5), draws=1)[1] for _ in range(12)]
    assert np.median(together) > 1.7 * np.median(independent)
    assert 0.6 < np.median(together) / np.median(records) < 1.4
    miss, gap = _chance_and_gap(_gaussian_days(rng, 60, shock=0.0, miss=True))
    assert gap > 0.1 and np.quantile(miss, 0.9) < 1.5 * np.quantile(independent, 0.9) < 0.05


def test_chance_gaps_of_maps_in_one_block_share_their_shifts_across_accumulators():
    """A block's shifts depend on the seed and the block only: the leads of one evaluation
    (separate accumulators) shift their maps of a block alike, halves merge into the whole,
    and maps without a block stay blocks of their own after a merge."""
    rng = np.random.default_rng(7)
    days = _gaussian_days(rng, 40, shock=0.3)  # continuous truths: no ties, no random tie-break
    one, halves = ChanceReliability([0.5, 1.5], draws=10), ChanceReliability([0.5, 1.5], draws=10)
    other = ChanceReliability([0.5, 1.5], draws=10)
    for day, (members, truth) in enumerate(days):
        one.accumulate(members, truth, block=day // 10)
        (halves if day < 20 else other).accumulate(members, truth, block=day // 10)
    whole = one.compute()
    merged = halves.merge(other).compute()
    assert all(np.array_equal(whole[thr], merged[thr]) for thr in whole)
    own = ChanceReliability([0.5], draws=10).accumulate(*days[0]).merge(ChanceReliability([0.5], draws=10)
                                                                       .accumulate(*days[1]))
    assert own.blocks == [("own", 0), ("own", 1)]
    with pytest.raises(ValueError, match="members"):
        one.accumulate(days[0][0][:5], days[0][1])


def _probit(p: np.ndarray) -> np.ndarray:
    """The standard normal quantile of p, with a standard deviation of 1.044 = sqrt(1 + 0.3**2):
    a pixel's outcome is below it with probability p once the day's and the pixel's noise add up."""
    from scipy.special import ndtri

    return ndtri(np.clip(p, 1e-6, 1 - 1e-6)) * np.sqrt(1 + 0.3 ** 2)


@pytest.fixture(scope="module")
def probabilistic(tmp_path_factory) -> Path:
    """A probabilistic model trained for three epochs on a river-regime cube with rain."""
    from pipeline.cli import main

    root = tmp_path_factory.mktemp("probabilistic")
    write_series(root / "in", days=100, height=24, width=32, seed=3, regime="river", covariates=["rainf"])
    assert main(["ingest", str(root / "in"), str(root / "qs.zarr")]) == 0
    assert main(["train", "--data_dir", str(root / "qs.zarr"), "--probabilistic", "--forcings", "rainf",
                 "--leads", "1,2", "--epochs", "3", "--patch", "16", "--hidden_channels", "8",
                 "--checkpoint_dir", str(root / "ckpt"), "--output_dir", str(root / "train")]) == 0
    return root


def test_predict_writes_quantile_and_exceedance_maps_and_members(probabilistic, tmp_path, run_cli):
    root = probabilistic
    out = tmp_path / "pred"
    result = run_cli("predict", "--weights_path", root / "ckpt" / "best.pth", "--input_dir", root / "qs.zarr",
                     "--output_dir", out, "--dates", "2019-03-20", "--format", "netcdf", "--members", "5", "--exceedance", "1,10",
                     "--plots_dir", tmp_path / "plots")
    assert result.status == 0, result.err
    valid = sorted(out.glob("QS_*_lead1.tif"))[0].stem
    files = {p.name for p in out.glob(f"{valid}*.tif")}
    assert files == {f"{valid}.tif", f"{valid}_q10.tif", f"{valid}_q50.tif", f"{valid}_q90.tif", f"{valid}_p1.tif",
                     f"{valid}_p10.tif"}

    def read(name: str) -> tuple[np.ndarray, dict]:
        with rasterio.open(out / name) as src:
            return src.read(1, masked=True).filled(np.nan), src.tags()

    (q10, _), (q50, _), (q90, tags) = (read(f"{valid}_q{q}.tif") for q in (10, 50, 90))
    mean, _ = read(f"{valid}.tif")
    ok = np.isfinite(mean)
    assert ok.any() and (~ok).any()  # the sea stays nodata
    assert (q10[ok] <= q50[ok]).all() and (q50[ok] <= q90[ok]).all() and tags["quantile"] == "0.9"
    p1, ptags = read(f"{valid}_p1.tif")
    p10, _ = read(f"{valid}_p10.tif")
    assert ((p1[ok] >= 0) & (p1[ok] <= 1)).all() and (p10[ok] <= p1[ok]).all() and ptags["threshold"] == "1 kg m-2"
    nc = xr.open_dataset(next(out.glob("QS_forecasts_*.nc")))
    assert nc.qs_members.dims == ("time", "lead", "member", "y", "x") and nc.sizes["member"] == 5
    assert nc.member.values.tolist() == [1, 2, 3, 4, 5] and nc.member_level.values.tolist() == [0.1, 0.3, 0.5, 0.7, 0.9]
    assert (nc.qs_members.diff("member").fillna(0) >= 0).all()
    assert any(p.name.startswith("compare_") for p in (tmp_path / "plots").iterdir())


def test_a_batch_of_quantiles_is_held_to_its_memory_budget(probabilistic, monkeypatch):
    """Quantiles are 20 maps per lead: on a large grid fewer issue days go through at once
    than --batch_size asks, and the forecasts are the same."""
    from pipeline import inference

    ckpt = read_checkpoint(probabilistic / "ckpt" / "best.pth")
    ds = open_cube(probabilistic / "qs.zarr")
    issues = list(range(10, 15))
    forecaster = inference.Forecaster.load(ckpt, "cpu", batch_size=4)
    whole = list(forecaster.forecasts(ds, issues, members=True))
    one_day = 4 * 2 * 20 * 24 * 32  # bytes of one issue day's quantiles: 2 leads, 20 quantiles, 24x32
    monkeypatch.setattr(inference, "MEMBERS_BYTES", 2 * one_day + 1)
    held = list(forecaster.forecasts(ds, issues, members=True))
    assert [len(b) for b, _ in whole] == [4, 1] and [len(b) for b, _ in held] == [2, 2, 1]
    np.testing.assert_allclose(np.concatenate([f for _, f in held]), np.concatenate([f for _, f in whole]),
                               rtol=1e-6)
    assert [len(b) for b, _ in forecaster.forecasts(ds, issues)] == [4, 1]  # single maps: as asked


def test_a_trained_checkpoint_carries_the_training_maximum_that_bounds_its_forecasts(probabilistic):
    ckpt = read_checkpoint(probabilistic / "ckpt" / "best.pth")
    train = ckpt.splits["train"]
    qs = open_cube(str(probabilistic / "qs.zarr"))["qs"]
    largest = float(qs.sel(time=slice(str(train.start), str(train.end))).max())
    stats = ckpt.norm_stats["qs"]
    assert stats["max"] == pytest.approx(largest, rel=1e-5)
    model = ckpt.build_model()
    assert model.ceiling() == pytest.approx((np.log1p(CEILING_FACTOR * largest) - stats["mean"]) / stats["std"])


def test_evaluate_scores_crps_brier_and_reliability_against_reference_ensembles(probabilistic, tmp_path, run_cli):
    root = probabilistic
    result = run_cli("evaluate", "--weights_path", root / "ckpt" / "best.pth", "--data_dir", root / "qs.zarr",
                     "--output_dir", tmp_path / "eval", "--thresholds", "1,10")
    assert result.status == 0, result.err
    assert "CRPS skill vs persistence" in result.out.splitlines()[0]
    document = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    metrics = document["leads"]
    for lead in ("1", "2"):
        model = metrics[lead]["model"]
        for key in ("crps", "crps_skill_vs_climatology", "crps_skill_vs_persistence", "spread_skill",
                    "brier@1", "brier@10", "brier_skill@1"):
            assert np.isfinite(model[key]), key
        assert metrics[lead]["climatology"]["crps_skill_vs_climatology"] == 0
        assert (tmp_path / "eval" / f"ensemble_lead{lead}.png").stat().st_size > 0
        # the reliability gaps sum up the tables beside them: bins of >= 100 pixels only
        for thr, table in document["ensemble"][lead]["reliability"].items():
            count, forecast, observed, low, high = (np.array(table[row], np.float64) for row in (
                "count", "forecast_probability", "observed_frequency", "observed_frequency_5", "observed_frequency_95"))
            full = count >= 100
            assert full.any() and (count[~full] > 0).any()  # so the pixel floor is put to the test
            assert model[f"reliability_gap@{thr}"] == pytest.approx(np.abs(forecast - observed)[full].max())
            beyond = np.maximum(np.maximum(low - forecast, forecast - high), 0)[full].max()
            assert model[f"reliability_gap_beyond_band@{thr}"] == pytest.approx(beyond)
            for reference in ("persistence", "climatology"):
                assert 0 <= metrics[lead][reference][f"reliability_gap@{thr}"] <= 1
    markdown = (tmp_path / "eval" / "metrics.md").read_text()
    assert "Probabilistic scores, lead 1" in markdown and "reliability_gap@10" in markdown
    widest = max(metrics["1"]["model"][f"reliability_gap@{thr}"] for thr in ("1", "10"))
    assert f"; reliability gap {widest:.3f}" in result.out.splitlines()[0]
    runoff_only = run_cli("evaluate", "--weights_path", root / "ckpt" / "best.pth", "--data_dir", root / "in" / "Qs",
                          "--output_dir", tmp_path / "eval_runoff_only")
    assert runoff_only.status == 2 and "needs variable(s) rainf" in one_error_line(runoff_only.err)


def test_the_chance_benchmark_sets_the_gap_evaluate_reports_beside_calibrated_forecasts(
        probabilistic, trained, tmp_path, run_cli):
    root = probabilistic
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_reliability_chance.py"

    def bench(weights: Path, cube: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), "--weights_path", str(weights), "--data_dir", str(cube),
                               "--draws", "20"], capture_output=True, text=True, timeout=600)

    out = bench(root / "ckpt" / "best.pth", root / "qs.zarr")
    assert out.returncode == 0, out.stderr[-2000:]
    rows = dict(re.findall(r"^\| (.+?) \| ([^|]+?) \|", out.stdout, flags=re.M))
    scored = run_cli("evaluate", "--weights_path", root / "ckpt" / "best.pth", "--data_dir", root / "qs.zarr",
                     "--output_dir", tmp_path / "eval")
    assert scored.status == 0, scored.err
    for lead, line in zip((1, 2), scored.out.splitlines()):
        assert f"reliability gap {rows[f'lead {lead}: widest reliability gap of the model']}" in line
        chance = next(value for what, value in rows.items()
                      if what.startswith(f"lead {lead}: widest gap of a calibrated"))
        assert 0 <= float(chance) <= 1 and re.fullmatch(r"\d+%", rows[f"lead {lead}: calibrated forecasts within 0.1"])
    assert re.fullmatch(r"\d+%", rows["calibrated forecasts within 0.1 at every lead (20 draws)"])
    deterministic = bench(trained / "ckpt" / "best.pth", trained / "qs.zarr")
    last_line = deterministic.stderr.strip().splitlines()[-1]
    assert deterministic.returncode == 2 and "a deterministic checkpoint" in last_line


def test_evaluate_scores_the_same_on_one_thread_as_on_several(probabilistic, tmp_path, monkeypatch):
    """Each accumulator takes an issue day's maps in day order whatever the threads, so the
    scores, the rank histograms (ties broken at random) and the bands are the same."""
    from pipeline import evaluate

    documents = []
    for threads in (1, 4):
        monkeypatch.setattr(evaluate, "SCORING_THREADS", threads)
        report = evaluate.evaluate(probabilistic / "ckpt" / "best.pth", probabilistic / "qs.zarr", split="all",
                                   output_dir=tmp_path / f"threads{threads}", device="cpu", batch_size=3)
        assert report.windows > 3 * 10  # several batches of several days
        documents.append((tmp_path / f"threads{threads}" / "metrics.json").read_text())
    assert documents[0] == documents[1]


def test_evaluate_scores_the_median_that_predict_writes(probabilistic, tmp_path, run_cli):
    """The ``median`` row of ``runoff evaluate`` is the MSE of predict's ``_q50`` maps
    against the cube's truth, over the same windows; the ``model`` row is the map the
    checkpoint chose at each lead, the mean's or the median's."""
    root = probabilistic
    weights, cube = root / "ckpt" / "best.pth", root / "qs.zarr"
    predicted = run_cli("predict", "--weights_path", weights, "--input_dir", cube, "--output_dir", tmp_path / "pred",
                        "--split", "test", "--quantiles", "0.5", "--max_plots", "0")
    assert predicted.status == 0, predicted.err
    scored = run_cli("evaluate", "--weights_path", weights, "--data_dir", cube, "--output_dir", tmp_path / "eval")
    assert scored.status == 0, scored.err
    chosen = read_checkpoint(weights).point_maps
    other = {"mean": "median", "median": "mean"}[chosen[0]]
    assert f"(the {chosen[0]}; {other} " in scored.out.splitlines()[0]
    document = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    metrics = document["leads"]
    truth = open_cube(str(cube))["qs"]
    for lead in (1, 2):
        errors = []
        for path in sorted((tmp_path / "pred").glob(f"QS_*_lead{lead}_q50.tif")):
            with rasterio.open(path) as src:
                median = src.read(1, masked=True).filled(np.nan)
            observed = truth.sel(time=np.datetime64(f"{path.name[3:7]}-{path.name[7:9]}-{path.name[9:11]}")).values
            ok = np.isfinite(median) & np.isfinite(observed)
            errors.append((median[ok] - observed[ok]) ** 2)
        assert len(errors) == document["meta"]["windows"]
        rows = metrics[str(lead)]
        assert rows["median"]["mse"] == pytest.approx(np.concatenate(errors).mean(), rel=1e-5)
        assert rows["median"]["mse"] != rows["mean"]["mse"] and "crps" not in rows["median"]
        assert rows["model"]["mse"] == rows[chosen[lead - 1]]["mse"]
    assert "| median |" in (tmp_path / "eval" / "metrics.md").read_text()


def test_the_single_map_is_the_median_at_the_leads_the_checkpoint_chose_it(probabilistic, tmp_path, run_cli):
    """A checkpoint whose ``point_maps`` name the median at lead 1 and the mean at lead 2:
    predict writes the median (``_q50``) as lead 1's map and tags each map with its
    statistic (the NetCDF too); evaluate's ``model`` row is the median's at lead 1 and the
    mean's at lead 2; several checkpoints take the median where most of them chose it."""
    from pipeline.inference import Forecaster

    state = torch.load(probabilistic / "ckpt" / "best.pth", weights_only=True)
    state["point_maps"] = ["median", "mean"]
    weights = tmp_path / "median_first.pth"
    torch.save(state, weights)
    cube = probabilistic / "qs.zarr"
    predicted = run_cli("predict", "--weights_path", weights, "--input_dir", cube, "--output_dir", tmp_path / "pred",
                        "--dates", "2019-03-20", "--quantiles", "0.5", "--max_plots", "0", "--format", "netcdf")
    assert predicted.status == 0, predicted.err

    def read(path: Path) -> tuple[np.ndarray, dict]:
        with rasterio.open(path) as src:
            return src.read(1, masked=True).filled(np.nan), {**src.tags(), "description": src.descriptions[0]}

    for lead, point in ((1, "median"), (2, "mean")):
        stem = next((tmp_path / "pred").glob(f"QS_*_lead{lead}.tif")).with_suffix("")
        (single, tags), (median, _) = read(stem.with_suffix(".tif")), read(Path(f"{stem}_q50.tif"))
        assert tags["point_map"] == point and tags["description"].startswith(f"{point} of the forecast distribution")
        ok = np.isfinite(single)
        assert ok.any() and (np.array_equal(single[ok], median[ok]) == (point == "median"))
    nc = xr.open_dataset(next((tmp_path / "pred").glob("QS_forecasts_*.nc")))
    assert nc.point_map.values.tolist() == ["median", "mean"]

    scored = run_cli("evaluate", "--weights_path", weights, "--data_dir", cube, "--output_dir", tmp_path / "eval")
    assert scored.status == 0, scored.err
    document = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    rows = document["leads"]
    assert rows["1"]["model"]["mse"] == rows["1"]["median"]["mse"] != rows["1"]["mean"]["mse"]
    assert rows["2"]["model"]["mse"] == rows["2"]["mean"]["mse"] != rows["2"]["median"]["mse"]
    assert document["meta"]["point_maps"] == {"1": "median", "2": "mean"}
    assert "(lead 1 median, lead 2 mean)" in (tmp_path / "eval" / "metrics.md").read_text()

    forecaster, ds = Forecaster.load(read_checkpoint(weights), "cpu"), open_cube(str(cube))
    members, single = forecaster.forecast(ds, [40, 41], members=True), forecaster.forecast(ds, [40, 41])
    np.testing.assert_allclose(single[:, 0], (members[:, 0, 9] + members[:, 0, 10]) / 2, rtol=1e-6)  # 20 quantiles
    np.testing.assert_allclose(single[:, 1], members[:, 1].mean(axis=1), rtol=1e-6)

    def together(*maps: list[str]) -> list[str]:
        checkpoints = [Checkpoint({**state, "point_maps": m}) for m in maps]
        return Forecaster(checkpoints, [], torch.device("cpu")).point_maps

    assert together(["median", "mean"], ["median", "median"], ["mean", "mean"]) == ["median", "mean"]
    assert together(["median", "median"], ["mean", "mean"]) == ["mean", "mean"]  # a tie keeps the mean
    older = dict(state)
    del older["point_maps"]  # a checkpoint from before the choice
    assert Checkpoint(older).point_maps == ["mean", "mean"]


@pytest.mark.parametrize("point_maps", [["median"], ["median", "mode"], "median"])
def test_a_checkpoint_with_bad_point_maps_is_one_line(probabilistic, tmp_path, run_cli, point_maps):
    state = torch.load(probabilistic / "ckpt" / "best.pth", weights_only=True)
    state["point_maps"] = point_maps
    torch.save(state, tmp_path / "bad.pth")
    result = run_cli("predict", "--weights_path", tmp_path / "bad.pth", "--input_dir", probabilistic / "qs.zarr",
                     "--output_dir", tmp_path / "pred", "--last")
    assert result.status == 2 and "point_maps" in one_error_line(result.err) and "bad.pth" in result.err
    assert not (tmp_path / "pred").exists()


@pytest.mark.parametrize("options, words", [
    (["--quantiles", "0,0.5"], "must lie in (0, 1)"),
    (["--quantiles", "0.9,0.1"], "in increasing order"),
    (["--exceedance", "-1"], "must be >= 0"),
    (["--exceedance", "5,20,5"], "given twice"),
    (["--members", "1", "--format", "netcdf"], "at least 2 members"),
    (["--members", "4"], "add --format netcdf"),
])
def test_bad_probabilistic_options_are_one_line_and_write_nothing(probabilistic, tmp_path, run_cli, options, words):
    root = probabilistic
    result = run_cli("predict", "--weights_path", root / "ckpt" / "best.pth", "--input_dir", root / "qs.zarr",
                     "--output_dir", tmp_path / "pred", "--dates", "2019-03-20", *options)
    assert result.status == 2 and words in one_error_line(result.err)
    assert not (tmp_path / "pred").exists() or not any((tmp_path / "pred").iterdir())


def test_probabilistic_options_with_a_deterministic_checkpoint(trained, tmp_path, run_cli):
    result = run_cli("predict", "--weights_path", trained / "ckpt" / "best.pth", "--input_dir", trained / "qs.zarr",
                     "--output_dir", tmp_path / "pred", "--last", "--quantiles", "0.5")
    assert result.status == 2 and "deterministic checkpoint" in one_error_line(result.err)
    assert not (tmp_path / "pred").exists() or not any((tmp_path / "pred").iterdir())


def test_a_probabilistic_run_resumes_exactly(tmp_path):
    from pipeline.train import TrainConfig, train

    write_series(tmp_path / "in", days=60, height=20, width=24, seed=5)
    common = dict(data_dir=str(tmp_path / "in"), patch=16, hidden_channels=[4], batch_size=4, probabilistic=True,
                  device="cpu")
    train(TrainConfig(**common, epochs=2, checkpoint_dir=str(tmp_path / "full"), output_dir=str(tmp_path / "o1")))
    train(TrainConfig(**common, epochs=1, checkpoint_dir=str(tmp_path / "part"), output_dir=str(tmp_path / "o2")))
    train(TrainConfig(**common, epochs=2, resume=str(tmp_path / "part" / "model_epoch1.pth"),
                      checkpoint_dir=str(tmp_path / "part"), output_dir=str(tmp_path / "o2")), {"epochs", "resume"})
    a, b = (torch.load(tmp_path / d / "model_epoch2.pth", weights_only=True) for d in ("full", "part"))
    assert a["model_config"]["quantiles"] == 20
    for name, tensor in a["model_state"].items():
        assert torch.equal(tensor, b["model_state"][name]), name


def test_the_spread_and_levels_of_best_pth_are_calibrated_on_the_validation_split(tmp_path, capsys):
    from pipeline.train import TrainConfig, train

    write_series(tmp_path / "in", days=60, height=20, width=24, seed=6)
    # a learning rate so small that the model stays as initialised: quantiles packed tight
    # around persistence, far narrower than persistence's errors
    train(TrainConfig(data_dir=str(tmp_path / "in"), patch=16, hidden_channels=[4], batch_size=4, epochs=1,
                      lr=1e-9, leads=[1, 2], probabilistic=True, calibrate_levels=True, calibrate_location=True,
                      device="cpu", checkpoint_dir=str(tmp_path / "ckpt"), output_dir=str(tmp_path / "out")))
    log = capsys.readouterr().out
    assert "lower side of the quantiles widened on the training days (best.pth): lead 1 x" in log
    assert "spread calibrated on the validation split (best.pth): lead 1 x" in log
    assert "single map, of the mean and the median of the quantiles (best.pth): the me" in log
    assert "quantile levels calibrated per flow class on the validation split (best.pth): lead 1 " in log
    assert "quantiles moved to the centre's mean (best.pth): at " in log
    best, epoch = (torch.load(tmp_path / "ckpt" / name, weights_only=True) for name in ("best.pth", "model_epoch1.pth"))
    assert (best["model_state"]["spread_scale"] > 1).all()
    assert torch.equal(epoch["model_state"]["spread_scale"], torch.ones(2))
    assert (best["model_state"]["lower_spread"] > 1).all()  # packed tight: the training days ask for more
    assert torch.equal(epoch["model_state"]["lower_spread"], torch.ones(2))
    assert len(best["model_config"]["level_calibration"]) == 2 and epoch["model_config"]["level_calibration"] == []
    assert best["calibrated_on"] == best["splits"]["val"] and "calibrated_on" not in epoch
    assert best["point_maps"] in (["mean", "mean"], ["median", "median"])  # one choice for both leads
    assert "point_maps" not in epoch
    described = read_checkpoint(tmp_path / "ckpt" / "model_epoch1.pth").describe("model_epoch1.pth")
    assert "spread      lead 1 x1.00, lead 2 x1.00 (as trained)" in described
    assert "single map  the mean at every lead (of the quantiles; none chosen)" in described
    assert "lower side  lead 1 x1.00, lead 2 x1.00 (the quantiles below the centre, as trained)" in described
    assert "location" not in described  # no lead moved
    assert torch.equal(epoch["model_state"]["mean_at_centre"], torch.zeros(2))
    assert "(the quantiles below the centre, widened on the training days)" in read_checkpoint(
        tmp_path / "ckpt" / "best.pth").describe("best.pth")
    assert (f"single map  the {best['point_maps'][0]} at every lead (of the quantiles; chosen on the calibration days)"
            in read_checkpoint(tmp_path / "ckpt" / "best.pth").describe("best.pth"))
    older = Checkpoint({k: v for k, v in best.items() if k != "calibrated_on"})  # a best.pth from before the key
    assert "(calibrated on the validation split; levels per flow class too)" in older.describe("best.pth")
    weights = {k: v for k, v in best["model_state"].items()  # before the lower side and the location
               if k not in ("lower_spread", "mean_at_centre")}
    oldest = Checkpoint({**best, "model_state": weights})
    assert "lower side" not in oldest.describe("best.pth") and "location" not in oldest.describe("best.pth")
    assert torch.equal(oldest.build_model().lower_spread, torch.ones(2))
    assert torch.equal(oldest.build_model().mean_at_centre, torch.zeros(2))


def _calibration_case() -> tuple[ConvLSTMForecaster, list, dict]:
    """An untrained one-lead model and validation batches whose truth scatters log-normally
    (sigma 0.6) around persistence (10 kg m-2), far wider than the model's quantiles."""
    from pipeline.sampler import Window, collate_windows

    torch.manual_seed(0)
    stats = {"mean": 0.0, "std": 1.0, "rms": 1.0}
    model = ConvLSTMForecaster(in_channels=1, leads=1, hidden_channels=2, quantiles=20)
    today = torch.log1p(torch.full((6, 1, 10, 12), 10.0))
    windows = [Window(today, torch.log1p(10 * torch.exp(0.6 * torch.randn(1, 1, 10, 12))),
                      torch.ones(1, 1, 10, 12, dtype=torch.bool), i, torch.zeros(1, 0, 10, 12)) for i in range(64)]
    return model, [collate_windows(windows[i:i + 8]) for i in range(0, 64, 8)], stats


def _scores_by_factor(model: ConvLSTMForecaster, batches: list, stats: dict, thresholds=(), base: float = 1.0
                      ) -> dict:
    """verify.EnsembleScores of the model's quantiles at every spread factor times ``base``
    (the model's forward at that scale, not the calibration's own sums)."""
    from pipeline.model import to_physical
    from pipeline.calibration import SPREAD_FACTORS

    def scores(factor: float) -> dict:
        model.spread_scale.fill_(base * factor)
        ensemble = EnsembleScores(thresholds)
        with torch.no_grad():
            for b in batches:
                members = to_physical(model(b.x), stats).clamp(min=0)[:, 0].transpose(0, 1)  # (M, B, H, W)
                ensemble.accumulate(members.numpy(), to_physical(b.y, stats)[:, 0, 0].numpy())
        return ensemble.compute()

    return {f: scores(f) for f in SPREAD_FACTORS}


def test_the_median_is_chosen_for_every_lead_where_its_validation_error_is_the_margin_below_the_means():
    """Truth placed between the mean and the median of the model's own quantiles: 50.5% of the
    way to the median at both leads (the median's squared error 0.96 of the mean's, inside the
    margin: the mean stays); then 45% at lead 1 (alone, the mean's) and 65% at lead 2, which
    together give the median's squared error under 0.95 of the mean's: the median at both
    leads. The same in batches of one."""
    from pipeline.calibration import MEDIAN_GAIN, choose_point_maps, model_outputs
    from pipeline.model import quantiles_median, to_physical
    from pipeline.sampler import Window, collate_windows

    model, stats = _perturbed_two_lead_model(seed=1, perturbation=0.3)
    model.spread_scale.fill_(3.0)  # wide in log space: a long right tail, the mean well above the median
    cpu, shape = torch.device("cpu"), (12, 14)
    torch.manual_seed(2)
    inputs = [(torch.randn(3, 1, *shape), torch.randn(2, 1, *shape)) for _ in range(6)]
    with torch.no_grad():  # as evaluated: bounded by the ceiling
        q = to_physical(model.eval()(torch.stack([x for x, _ in inputs]), torch.stack([f for _, f in inputs])), stats)
    q = q.clamp(min=0)
    mean, median = q.mean(dim=2), quantiles_median(q)
    assert ((median - mean).abs() > 0.01).float().mean() > 0.9
    for toward_median, chosen in (([0.505, 0.505], "mean"), ([0.45, 0.65], "median")):
        truth = mean + torch.tensor(toward_median).view(1, 2, 1, 1) * (median - mean)  # (B, L, H, W)
        sse = [((point - truth) ** 2).sum(dim=(0, 2, 3)) for point in (mean, median)]  # per lead
        if chosen == "mean":  # the premise: the median is better, by less than the margin
            assert (1 - MEDIAN_GAIN) * sse[0].sum() < sse[1].sum() < sse[0].sum()
        else:  # the premise: lead 1 alone keeps the mean, both leads together do not
            assert sse[1][0] > sse[0][0] and sse[1].sum() < (1 - MEDIAN_GAIN) * sse[0].sum()
        y = (torch.log1p(truth) - stats["mean"]) / stats["std"]
        windows = [Window(x, y[i].unsqueeze(1), torch.ones(2, 1, *shape, dtype=torch.bool), i, f)
                   for i, (x, f) in enumerate(inputs)]
        for size in (6, 1):
            batches = [collate_windows(windows[i:i + size]) for i in range(0, 6, size)]
            with torch.no_grad():  # the truth as the calibration reads it back
                assert torch.allclose(torch.cat([to_physical(yy, stats)[:, :, 0] for _, yy, _, _ in
                                                 model_outputs(model, batches, cpu)]), truth, rtol=1e-4, atol=1e-5)
            assert choose_point_maps(model, batches, cpu, stats) == [chosen, chosen]


def test_the_command_line_offers_the_calibration_rules_the_package_has():
    from pipeline.calibration import CALIBRATIONS
    from pipeline.cli import CALIBRATION_RULES

    assert CALIBRATION_RULES == CALIBRATIONS


def test_calibration_picks_the_spread_skill_nearest_one_among_factors_as_good_by_crps():
    """The chosen factor widens the quantiles, scores a validation CRPS within the
    tolerance of the best factor's, and its spread/skill is at least as close to 1."""
    from pipeline.calibration import CRPS_TOLERANCE, calibrate_spread

    model, batches, stats = _calibration_case()
    chosen = calibrate_spread(model, batches, torch.device("cpu"), stats).item()
    by_factor = _scores_by_factor(model, batches, stats)
    best_crps = min(by_factor, key=lambda f: by_factor[f]["crps"])
    mismatch = {f: abs(np.log(s["spread_skill"])) for f, s in by_factor.items()}
    assert chosen > 1.2
    assert by_factor[round(chosen, 1)]["crps"] <= by_factor[best_crps]["crps"] * (1 + 2 * CRPS_TOLERANCE)
    assert mismatch[round(chosen, 1)] <= mismatch[best_crps] + 1e-9


def test_the_calibration_bounds_the_rescaled_quantiles_as_the_model_does():
    """A model already widened (x2) whose top quantiles pass its ceiling (a training maximum
    of 8 kg m-2): each factor is scored on the quantiles as trained, rescaled, then bounded,
    so the calibration picks the factor that forward passes at every scale pick."""
    from pipeline.calibration import CRPS_TOLERANCE, calibrate_spread

    model, batches, _ = _calibration_case()
    stats = {"mean": 0.0, "std": 1.0, "rms": 1.0, "max": 8.0}
    model.config.stats = [stats]
    model.spread_scale.fill_(2.0)
    with torch.no_grad():
        assert (model(batches[0].x) >= model.ceiling()).any()  # the bound bites
    chosen = calibrate_spread(model, batches, torch.device("cpu"), stats).item() / 2.0
    by_factor = _scores_by_factor(model, batches, stats, base=2.0)
    best_crps = min(s["crps"] for s in by_factor.values())
    near_best = [f for f, s in by_factor.items() if s["crps"] <= best_crps * (1 + CRPS_TOLERANCE)]
    assert round(chosen, 1) == min(near_best, key=lambda f: abs(np.log(by_factor[f]["spread_skill"])))


def test_the_lower_side_widens_the_quantiles_below_their_centre_and_leaves_the_others():
    """``lower_spread`` moves each quantile below the quantiles' centre (their mean, in the
    model's log space) that many times farther from it, per lead; the quantiles above stay,
    and the order of all is kept."""
    model, _ = _perturbed_two_lead_model(seed=3, perturbation=0.3)
    model.eval()
    torch.manual_seed(4)
    x, rain = torch.randn(2, 3, 1, 9, 11), torch.randn(2, 2, 1, 9, 11)
    with torch.no_grad(), model.unbounded():
        before = model(x, rain)
        model.lower_spread.copy_(torch.tensor([2.0, 3.5]))
        after = model(x, rain)
    centre = before.mean(dim=2, keepdim=True)
    factor = torch.tensor([2.0, 3.5]).view(1, 2, 1, 1, 1)
    torch.testing.assert_close(after, torch.where(before < centre, centre + factor * (before - centre), before))
    assert (before < centre).any() and (after.diff(dim=2) >= 0).all()


def _lower_side_losses(model: ConvLSTMForecaster, batches: list, stats: dict) -> dict[float, float]:
    """At each of ``LOWER_FACTORS``, the pinball loss (data units) of the quantiles the model's
    forward puts below their centre, summed over ``batches`` (one lead)."""
    from pipeline.calibration import LOWER_FACTORS
    from pipeline.model import quantile_levels, to_physical

    levels = quantile_levels(model.config.quantiles).view(1, 1, -1, 1, 1)
    losses = dict.fromkeys(LOWER_FACTORS, 0.0)
    with torch.no_grad():
        for b in batches:
            model.lower_spread.fill_(1.0)
            centre = model(b.x).mean(dim=2, keepdim=True)  # of the quantiles as trained
            for factor in LOWER_FACTORS:
                model.lower_spread.fill_(factor)
                q = model(b.x)
                error = to_physical(b.y, stats) - to_physical(q, stats).clamp(min=0)
                losses[factor] += float((torch.maximum(levels * error, (levels - 1) * error) * (q < centre)).sum())
    model.lower_spread.fill_(1.0)
    return losses


def test_the_training_days_widen_the_lower_side_where_the_truth_falls_below_it():
    """Truth scattered log-normally around quantiles packed tight: the fitted factor is the one
    whose forward scores the lowest pinball loss below the centre, and it widens (> 1). Truth
    above every quantile: no widening helps, the factor is 1. The factor is kept by the
    spread's calibration, which scores the quantiles with their lower side widened."""
    from pipeline.calibration import calibrate_model, fit_lower_spread

    model, batches, stats = _calibration_case()
    cpu = torch.device("cpu")
    fitted = round(fit_lower_spread(model, batches, cpu, stats).item(), 1)
    losses = _lower_side_losses(model, batches, stats)
    assert fitted > 1.5 and fitted == min(losses, key=losses.get)
    model.lower_spread.fill_(fitted)
    calibrate_model(model, batches, cpu, stats)
    assert model.lower_spread.item() == pytest.approx(fitted) and model.spread_scale.item() != 1.0
    above = [b._replace(y=torch.log1p(30 + 10 * torch.rand_like(b.y))) for b in batches]
    assert fit_lower_spread(model, above, cpu, stats).item() == 1.0


def test_the_calibration_scores_the_spread_with_the_lower_side_widened_as_the_model_does():
    """With the lower side widened (x2.5), each spread factor is scored on the quantiles as
    forward gives them at that factor: the calibration picks the factor those scores pick."""
    from pipeline.calibration import CRPS_TOLERANCE, calibrate_spread

    model, batches, stats = _calibration_case()
    model.lower_spread.fill_(2.5)
    chosen = calibrate_spread(model, batches, torch.device("cpu"), stats).item()
    assert model.lower_spread.item() == 2.5  # put back after scoring
    by_factor = _scores_by_factor(model, batches, stats)
    best_crps = min(s["crps"] for s in by_factor.values())
    near_best = [f for f, s in by_factor.items() if s["crps"] <= best_crps * (1 + CRPS_TOLERANCE)]
    assert round(chosen, 1) == min(near_best, key=lambda f: abs(np.log(by_factor[f]["spread_skill"])))


def test_the_brier_calibration_picks_the_most_reliable_exceedance_among_factors_as_good_by_crps():
    """With ``rule="brier"`` the factor is, of those within the CRPS tolerance, the one
    whose P(X > 20 kg m-2) has the lowest Brier score; here not the spread/skill rule's."""
    from pipeline.calibration import CRPS_TOLERANCE, calibrate_spread

    model, batches, stats = _calibration_case()
    cpu = torch.device("cpu")
    by_ratio = round(calibrate_spread(model, batches, cpu, stats).item(), 1)
    by_brier = round(calibrate_spread(model, batches, cpu, stats, rule="brier", thresholds=(20.0,)).item(), 1)
    by_factor = _scores_by_factor(model, batches, stats, thresholds=(20.0,))
    best_crps = min(s["crps"] for s in by_factor.values())
    near_best = [f for f, s in by_factor.items() if s["crps"] <= best_crps * (1 + 2 * CRPS_TOLERANCE)]
    assert by_brier in near_best and by_brier != by_ratio
    assert by_factor[by_brier]["brier@20"] < by_factor[by_ratio]["brier@20"]
    assert by_factor[by_brier]["brier@20"] <= min(by_factor[f]["brier@20"] for f in near_best) + 1e-4
    with pytest.raises(ValueError, match="brier with thresholds"):
        calibrate_spread(model, batches, cpu, stats, rule="brier")


def _perturbed_two_lead_model(seed: int, perturbation: float) -> tuple[ConvLSTMForecaster, dict]:
    """A located two-lead quantile model with rain seen at 1 and 3 px (a reach of 5 px on 3
    input days), its weights moved at random from their start so that its quantiles vary
    from pixel to pixel; and its normalisation statistics."""
    torch.manual_seed(seed)
    stats = {"mean": 1.0, "std": 1.0, "rms": 2.0, "max": 40.0}
    model = ConvLSTMForecaster(in_channels=1, leads=2, hidden_channels=3, quantiles=20, forcing_channels=2,
                               forcing_scales=(1, 3), quantile_location=True, stats=[stats])
    with torch.no_grad():
        for weights in model.parameters():
            weights.add_(perturbation * torch.randn_like(weights))
    return model, stats


def test_a_located_model_moves_its_quantiles_to_its_centres_mean_at_the_leads_chosen():
    """``mean_at_centre`` 1 at lead 1: each pixel's quantiles move by one step in the log
    space, so that their mean in data units is the centre's (where none, moved or not, is
    clipped at 0); lead 2's stay where they are, and the order of all is kept."""
    model, stats = _perturbed_two_lead_model(seed=5, perturbation=0.3)
    model.eval()
    torch.manual_seed(6)
    x, rain = torch.randn(2, 3, 1, 9, 11), torch.randn(2, 2, 1, 9, 11)
    with torch.no_grad(), model.unbounded():
        out = model(x, rain, with_centre=True)
        model.mean_at_centre.copy_(torch.tensor([1.0, 0.0]))
        moved = model(x, rain)
    centre, before = out[:, :, :1], out[:, :, 1:]
    torch.testing.assert_close(moved[:, 1], before[:, 1])
    step = moved[:, 0] - before[:, 0]
    torch.testing.assert_close(step, step[:, :1].expand_as(step))  # one step per pixel
    assert (step.abs() > 0.1).float().mean() > 0.5 and (moved.diff(dim=2) >= 0).all()
    physical = torch.expm1(moved[:, 0] * stats["std"] + stats["mean"])
    unclipped = (physical > 0).all(dim=1) & (before[:, 0] * stats["std"] + stats["mean"] > 0).all(dim=1)
    mean_of_moved = physical.mean(dim=1)[unclipped]
    centre_value = torch.expm1(centre[:, 0, 0] * stats["std"] + stats["mean"])[unclipped]
    assert unclipped.sum() > 50
    torch.testing.assert_close(mean_of_moved, centre_value, rtol=1e-4, atol=1e-4)


def test_the_calibration_moves_the_quantiles_to_the_centre_where_the_brier_score_asks():
    """Truth on the centre at lead 1, and at lead 2 as far from the quantiles' own mean as the
    centre is, on the other side: the quantiles are moved at lead 1 alone, where forward's
    moved quantiles score lower than those where they are by all three of the Brier score
    summed over the thresholds (scored by verify.EnsembleScores, not the calibration's own
    sums), the pinball loss and the squared error of their mean; only when asked. A model
    that is not located, or no thresholds, cannot be asked."""
    from pipeline.calibration import calibrate_model, choose_locations
    from pipeline.model import pinball, to_physical
    from pipeline.sampler import Window, collate_windows

    model, stats = _perturbed_two_lead_model(seed=2, perturbation=0.3)
    model.eval()
    torch.manual_seed(3)
    shape = (12, 14)
    x, rain = torch.randn(16, 3, 1, *shape), torch.randn(16, 2, 1, *shape)
    with torch.no_grad():
        out = model(x, rain, with_centre=True)
    centre, quantiles = out[:, :, :1], out[:, :, 1:]
    own = (torch.log1p(to_physical(quantiles, stats).clamp(min=0).mean(dim=2, keepdim=True))
           - stats["mean"]) / stats["std"]  # their own mean, normalised
    scatter = 0.05 * torch.randn_like(centre)
    truth = torch.cat([centre[:, :1], 2 * own[:, 1:] - centre[:, 1:]], dim=1) + scatter  # lead 2: away from it
    windows = [Window(x[i], truth[i], torch.ones(2, 1, *shape, dtype=torch.bool), i, rain[i]) for i in range(16)]
    batches = [collate_windows(windows[i:i + 4]) for i in range(0, 16, 4)]
    physical = to_physical(truth, stats)
    thresholds = tuple(float(v) for v in torch.quantile(physical.flatten(), torch.tensor([0.5, 0.8])))
    chosen = choose_locations(model, batches, torch.device("cpu"), stats, thresholds)

    def scores(flags: list[float]) -> torch.Tensor:
        """Per lead (rows): the Brier score summed over the thresholds (verify.EnsembleScores),
        the pinball loss and the squared error of the quantiles' mean, of forward's quantiles."""
        model.mean_at_centre.copy_(torch.tensor(flags))
        ensembles, sums = [EnsembleScores(thresholds) for _ in range(2)], torch.zeros(2, 2)
        with torch.no_grad():
            for b in batches:
                members, truth = to_physical(model(b.x, b.forcings), stats).clamp(min=0), to_physical(b.y, stats)
                sums[:, 0] += pinball(members, truth).sum(dim=(0, 2, 3, 4))
                sums[:, 1] += ((members.mean(dim=2, keepdim=True) - truth) ** 2).sum(dim=(0, 2, 3, 4))
                for lead, ensemble in enumerate(ensembles):
                    ensemble.accumulate(members[:, lead].transpose(0, 1).numpy(), truth[:, lead, 0].numpy())
        briers = torch.tensor([sum(e.compute()[f"brier@{t:g}"] for t in thresholds) for e in ensembles])
        return torch.cat([briers[:, None], sums], dim=1)

    kept, moved = scores([0.0, 0.0]), scores([1.0, 1.0])
    assert chosen.tolist() == [1.0, 0.0]
    assert chosen.tolist() == (moved < kept).all(dim=1).float().tolist()
    calibrate_model(model, batches, torch.device("cpu"), stats, thresholds=thresholds, location=True)
    assert model.mean_at_centre.tolist() == [1.0, 0.0]
    calibrate_model(model, batches, torch.device("cpu"), stats, thresholds=thresholds)  # not asked: none moved
    assert model.mean_at_centre.tolist() == [0.0, 0.0]
    unlocated = ConvLSTMForecaster(in_channels=1, leads=2, hidden_channels=3, quantiles=20, forcing_channels=2,
                                   forcing_scales=(1, 3), stats=[stats])
    for candidate, given in ((unlocated, thresholds), (model, ())):
        with pytest.raises(ValueError, match="located model"):
            calibrate_model(candidate, batches, torch.device("cpu"), stats, thresholds=given, location=True)


def test_validation_and_calibration_of_maps_in_pieces_equal_those_of_whole_maps(monkeypatch):
    """Maps wider than the tile are validated and calibrated piece by piece (bounded memory
    on a large grid); every score and every fitted factor and level is the whole maps'."""
    from pipeline import calibration
    from pipeline import model as model_module
    from pipeline.calibration import calibrate_model
    from pipeline.sampler import Window, collate_windows
    from pipeline.train import evaluate_loader

    model, stats = _perturbed_two_lead_model(seed=0, perturbation=0.2)
    shape = (40, 56)
    windows = [Window(torch.randn(3, 1, *shape), torch.randn(2, 1, *shape) + 1, torch.rand(2, 1, *shape) > 0.2, i,
                      torch.randn(2, 1, *shape)) for i in range(12)]
    batches = [collate_windows(windows[i:i + 4]) for i in range(0, 12, 4)]
    cpu = torch.device("cpu")

    def validated_and_calibrated() -> tuple[dict, list, list]:
        model.spread_scale.fill_(1.0)  # as trained: no calibration of an earlier call
        model.set_level_calibration([])
        scores = evaluate_loader(model, batches, cpu, stats)
        calibrate_model(model, batches, cpu, stats, levels=True)
        return scores, model.spread_scale.tolist(), model.config.level_calibration

    whole = validated_and_calibrated()
    assert model.receptive_radius(3) == 5
    monkeypatch.setattr(calibration, "TILE", 20)  # pieces of 20 px: cores of 10, 24 of them per map
    monkeypatch.setattr(model_module, "PASS_PIXELS", 800)  # and the 4 windows of a batch in passes of fewer
    with torch.no_grad():
        outputs = list(calibration.model_outputs(model, batches[:1], cpu))
    assert len(outputs) > 24 and max(out.shape[-1] for *_, out in outputs) == 10
    assert min(out.shape[0] for *_, out in outputs) < 4  # the pieces of 20x20 px go two windows at a time
    pieces = validated_and_calibrated()
    assert pieces[0] == pytest.approx(whole[0], rel=1e-5)
    assert pieces[1] == pytest.approx(whole[1])
    for lead_pieces, lead_whole in zip(pieces[2], whole[2]):
        assert lead_pieces["centres"] == pytest.approx(lead_whole["centres"], rel=1e-4)
        assert np.allclose(lead_pieces["levels"], lead_whole["levels"], atol=1e-4)


def test_the_spread_of_a_map_larger_than_the_budget_is_calibrated_on_a_lattice_of_its_pixels(monkeypatch):
    """Above ``max_pixels`` per map, the spread is fitted on every second row and column
    (here): exactly what every pixel gives when the mask keeps only those, also when the map
    goes through the model in pieces that start on odd columns. The levels are fitted on
    every pixel."""
    from pipeline import calibration
    from pipeline.calibration import calibrate_levels, calibrate_model, model_outputs
    from pipeline.sampler import Window, collate_windows

    model, stats = _perturbed_two_lead_model(seed=1, perturbation=0.3)
    shape, budget = (40, 56), 600  # 2240 pixels; every second row and column keeps 20 x 28 = 560
    lattice_only = torch.zeros(shape, dtype=torch.bool)
    lattice_only[::2, ::2] = True
    x, forcings = torch.randn(12, 3, 1, *shape), torch.randn(12, 2, 1, *shape)
    with torch.no_grad():
        centre = model(x, forcings).mean(dim=2, keepdim=True)
    scatter = 0.05 + 0.45 * lattice_only.float()  # the lattice's truth scatters wider: it asks for another spread
    truth = centre + scatter * torch.randn_like(centre)
    windows = [Window(x[i], truth[i], torch.rand(2, 1, *shape) > 0.2, i, forcings[i]) for i in range(12)]
    masked = [w._replace(mask=w.mask & lattice_only) for w in windows]
    batches, masked_batches = ([collate_windows(ws[i:i + 4]) for i in range(0, 12, 4)] for ws in (windows, masked))
    cpu = torch.device("cpu")

    with torch.no_grad():
        every, kept = (list(model_outputs(model, batches, cpu, max_pixels=m)) for m in (None, budget))
    for whole, lattice in zip(every, kept, strict=True):
        for a, b in zip(whole, lattice, strict=True):
            assert torch.equal(a[..., ::2, ::2], b)

    def calibrated(on: list, max_pixels: int | None) -> tuple[list, list]:
        calibrate_model(model, on, cpu, stats, levels=True, max_pixels=max_pixels)  # from the quantiles as trained
        return model.spread_scale.tolist(), model.config.level_calibration

    spread, levels = calibrated(batches, budget)
    assert spread == pytest.approx(calibrated(masked_batches, None)[0])
    assert calibrated(batches, None)[0] != spread  # every pixel asks for another spread
    model.spread_scale.copy_(torch.tensor(spread))
    model.set_level_calibration([])
    every_pixel_levels = calibrate_levels(model, batches, cpu, stats)

    def assert_levels_equal(fitted: list, expected: list) -> None:
        for lead, lead_expected in zip(fitted, expected, strict=True):
            assert lead["centres"] == pytest.approx(lead_expected["centres"], rel=1e-5)
            assert np.allclose(lead["levels"], lead_expected["levels"], atol=1e-5)

    assert_levels_equal(levels, every_pixel_levels)
    assert levels != calibrate_levels(model, masked_batches, cpu, stats)  # not the lattice's own fit

    monkeypatch.setattr(calibration, "TILE", 29)  # cores of 14 rows and 19 columns: pieces start at column 19, 38
    with torch.no_grad():
        assert {out.shape[-1] for *_, out in model_outputs(model, batches[:1], cpu, max_pixels=budget)} == {10, 9}
    in_pieces = calibrated(batches, budget)
    assert in_pieces[0] == pytest.approx(spread)
    assert_levels_equal(in_pieces[1], levels)


def test_level_calibration_reads_the_quantiles_where_the_truth_fell_on_new_windows():
    """A model whose quantiles sit below the truth (which scatters around 1.5 times
    persistence): the calibration fitted on half the windows moves the other half's median
    to where half the truth lies below it, and lowers their CRPS."""
    from pipeline.model import to_physical
    from pipeline.sampler import Window, collate_windows
    from pipeline.calibration import calibrate_levels

    torch.manual_seed(0)
    stats = {"mean": 0.0, "std": 1.0, "rms": 1.0}
    model = ConvLSTMForecaster(in_channels=1, leads=1, hidden_channels=2, quantiles=20)
    model.spread_scale.fill_(3.0)  # about the truth's scatter: the calibration only has to move them
    today = torch.log1p(torch.full((6, 1, 10, 12), 10.0))
    windows = [Window(today, torch.log1p(15 * torch.exp(0.3 * torch.randn(1, 1, 10, 12))),
                      torch.ones(1, 1, 10, 12, dtype=torch.bool), i, torch.zeros(1, 0, 10, 12)) for i in range(64)]
    batches = [collate_windows(windows[i:i + 8]) for i in range(0, 64, 8)]

    def scores() -> tuple[float, float]:
        ensemble, below = EnsembleScores(), []
        with torch.no_grad():
            for b in batches[4:]:
                members = to_physical(model(b.x), stats).clamp(min=0)[:, 0]  # (B, Q, H, W)
                truth = to_physical(b.y, stats)[:, 0, 0]
                below.append((truth < members[:, 9:11].mean(dim=1)).float().mean().item())
                ensemble.accumulate(members.transpose(0, 1).numpy(), truth.numpy())
        return float(np.mean(below)), ensemble.compute()["crps"]

    share_before, crps_before = scores()
    model.set_level_calibration(calibrate_levels(model, batches[:4], torch.device("cpu"), stats))
    share_after, crps_after = scores()
    assert share_before < 0.2 and abs(share_after - 0.5) < 0.08
    assert crps_after < 0.8 * crps_before
    rebuilt = ConvLSTMForecaster.from_config(model.config.to_dict())  # the checkpoint's config carries it
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(batches[4].x), model(batches[4].x))


@pytest.mark.parametrize("log_weight", [0.0, 0.3, 3.0])
def test_the_true_quantiles_minimise_the_quantile_loss_whatever_its_log_weight(log_weight):
    """The log values' pinball loss weighs pixels differently, but the quantiles of the
    truth's distribution stay its minimum: any one of them moved up or down scores worse;
    and the log term adds to the loss."""
    from pipeline.model import quantile_levels
    from pipeline.train import quantile_loss

    rng = np.random.default_rng(0)
    physical = np.where(rng.random((80, 120)) < 0.4, 0.0, rng.lognormal(1.0, 1.5, (80, 120)))
    logged = np.log1p(physical)
    stats = {"mean": float(logged.mean()), "std": float(logged.std()), "rms": float(np.sqrt((physical ** 2).mean()))}
    y = torch.tensor((logged - stats["mean"]) / stats["std"], dtype=torch.float32).view(1, 1, 1, 80, 120)
    levels = quantile_levels(20).numpy()
    true = torch.tensor(np.log1p(np.quantile(physical, levels)), dtype=torch.float32)
    true = ((true - stats["mean"]) / stats["std"]).view(1, 1, 20, 1, 1).expand(1, 1, 20, 80, 120)
    mask = torch.ones_like(y, dtype=torch.bool)
    loss = quantile_loss(stats, log_weight)
    best = float(loss(true, y, mask))
    for level in range(20):
        for step in (0.05, -0.05):
            moved = true.clone()
            moved[:, :, level] += step
            assert float(loss(moved, y, mask)) > best, (level, step)
    if log_weight:
        assert best > float(quantile_loss(stats)(true, y, mask))


def test_a_run_trains_on_the_log_values_pinball_loss_it_was_given(tmp_path):
    """``quantile_log_weight`` reaches the training loss (the same first steps score higher
    with it) and travels with the checkpoint, so a resumed run trains on the same loss."""
    from pipeline.train import TrainConfig, train

    write_series(tmp_path / "in", days=40, height=16, width=20, seed=3)
    losses = {}
    for weight in (0.0, 1.0):
        folder = tmp_path / f"w{weight:g}"
        result = train(TrainConfig(data_dir=str(tmp_path / "in"), patch=16, hidden_channels=[4], batch_size=4,
                                   epochs=1, probabilistic=True, quantile_log_weight=weight, device="cpu",
                                   checkpoint_dir=str(folder / "ckpt"), output_dir=str(folder / "out")))
        losses[weight] = result.history[0]["train_loss"]
        saved = torch.load(result.last_checkpoint, weights_only=True)
        assert saved["train_config"]["quantile_log_weight"] == weight
    assert losses[1.0] > losses[0.0]


def test_a_located_model_trains_its_centre_by_the_mse_and_places_its_quantiles_off_it():
    """With ``quantile_location`` the quantiles move with their own location output, the
    centre does not; the pinball loss reaches only the quantiles' outputs (the centre's
    gains get no gradient from it), the MSE only the centre's; and a checkpoint config
    without the key rebuilds the centred model it was."""
    from pipeline.train import located_quantile_loss, physical_loss, quantile_loss

    torch.manual_seed(0)
    stats = [{"mean": 0.5, "std": 1.0, "rms": 2.0}]
    model = ConvLSTMForecaster(leads=1, quantiles=20, linear_response=True, stats=stats, quantile_location=True)
    x, y = torch.randn(2, 6, 1, 9, 10), torch.randn(2, 1, 1, 9, 10)
    mask = torch.ones_like(y, dtype=torch.bool)
    before = model(x, with_centre=True).detach()
    location = model.response_terms  # the channel after the centre's gains and offset
    with torch.no_grad():
        model.head[-1].bias[location] = 0.3
    after = model(x, with_centre=True).detach()
    torch.testing.assert_close(after[:, :, :1], before[:, :, :1])
    torch.testing.assert_close(after[:, :, 1:], before[:, :, 1:] + 0.3)

    def head_gradient(loss_fn, part: slice) -> torch.Tensor:
        model.zero_grad()
        loss_fn(stats[0])(model(x, with_centre=True)[:, :, part], y, mask).backward()
        return model.head[-1].bias.grad.clone()

    centre_terms = slice(0, model.response_terms)
    from_pinball = head_gradient(quantile_loss, slice(1, None))
    from_mse = head_gradient(physical_loss, slice(0, 1))
    assert from_pinball[centre_terms].abs().max() == 0 and from_pinball[location:].abs().max() > 0
    assert from_mse[centre_terms].abs().max() > 0 and from_mse[location:].abs().max() == 0
    model.zero_grad()
    located_quantile_loss(stats[0])(model(x, with_centre=True), y, mask).backward()
    torch.testing.assert_close(model.head[-1].bias.grad, from_pinball + from_mse)

    older = {k: v for k, v in model.config.to_dict().items() if k != "quantile_location"}
    rebuilt = ConvLSTMForecaster.from_config(older)
    assert not rebuilt.config.quantile_location and rebuilt.outputs_per_lead == model.outputs_per_lead - 1


@pytest.mark.parametrize("options, located", [
    (["--probabilistic"], True),
    (["--probabilistic", "--no-quantile_location"], False),
    ([], False),  # a deterministic model has no quantiles to place
])
def test_probabilistic_training_is_located_by_default_and_predict_reads_either(tmp_path, run_cli, options, located):
    write_series(tmp_path / "in", days=60, height=20, width=24, seed=7)
    trained = run_cli("train", "--data_dir", tmp_path / "in", "--patch", "16", "--hidden_channels", "4",
                      "--batch_size", "4", "--epochs", "1", "--leads", "1,2", "--device", "cpu",
                      "--checkpoint_dir", tmp_path / "ckpt", "--output_dir", tmp_path / "out", *options)
    assert trained.status == 0, trained.err
    state = torch.load(tmp_path / "ckpt" / "best.pth", weights_only=True)
    assert state["model_config"]["quantile_location"] is located
    assert state["train_config"]["quantile_location"] is located  # resolved: a resumed run keeps it
    done = run_cli("predict", "--weights_path", tmp_path / "ckpt" / "best.pth", "--input_dir", tmp_path / "in",
                   "--output_dir", tmp_path / "pred", "--last")
    assert done.status == 0, done.err
    assert bool(sorted((tmp_path / "pred").glob("*_q*.tif"))) is bool(options)
    if options and not located:  # centred quantiles have no MSE-trained centre to move onto
        moved = run_cli("calibrate", "--weights_path", tmp_path / "ckpt" / "best.pth", "--data_dir", tmp_path / "in",
                        "--split", "val", "--calibrate_location", "--output_path", tmp_path / "moved.pth")
        assert moved.status == 2 and "--calibrate_location" in one_error_line(moved.err)
        assert not (tmp_path / "moved.pth").exists()


def test_a_probabilistic_checkpoint_from_before_the_location_setting_resumes_centred(tmp_path):
    """Checkpoints written before ``quantile_location`` existed centred their quantiles;
    resuming one keeps that model, not the new located default."""
    from pipeline.train import TrainConfig, train

    write_series(tmp_path / "in", days=60, height=20, width=24, seed=8)
    common = dict(data_dir=str(tmp_path / "in"), patch=16, hidden_channels=[4], batch_size=4, probabilistic=True,
                  device="cpu", checkpoint_dir=str(tmp_path / "ckpt"), output_dir=str(tmp_path / "out"))
    first = train(TrainConfig(epochs=1, quantile_location=False, **common))
    state = torch.load(first.last_checkpoint, weights_only=True)
    for config in (state["train_config"], state["model_config"]):
        del config["quantile_location"]
    torch.save(state, tmp_path / "old.pth")
    resumed = train(TrainConfig(epochs=2, resume=str(tmp_path / "old.pth"), **common), explicit={"epochs"})
    assert resumed.epochs_run == 2
    again = torch.load(resumed.last_checkpoint, weights_only=True)
    assert again["model_config"]["quantile_location"] is False and again["train_config"]["quantile_location"] is False


def test_calibrate_with_a_forecast_error_on_the_forcings(probabilistic, tmp_path, run_cli):
    """`runoff calibrate --forcing_error` scores the quantiles on validation windows whose rain
    carries a forecast's error, each window's drawn alike whatever the batches; the
    checkpoint and `runoff info` say so."""
    from pipeline.calibration import model_outputs
    from pipeline.forcing_error import window_errors
    from pipeline.inference import split_windows
    from pipeline.sampler import WindowSampler, collate_windows, data_loader

    best = probabilistic / "ckpt" / "best.pth"
    args = ("calibrate", "--weights_path", best, "--data_dir", probabilistic / "qs.zarr", "--split", "val",
            "--forcing_error", "1")
    one = run_cli(*args, "--output_path", tmp_path / "a.pth")
    assert one.status == 0, one.err
    assert "with the forcings' forecast error (log std 1)" in one.out
    assert run_cli(*args, "--batch_size", "1", "--output_path", tmp_path / "b.pth").status == 0
    a, b = (torch.load(tmp_path / name, weights_only=True) for name in ("a.pth", "b.pth"))
    assert a["calibrated_forcing_error"] == 1.0
    assert torch.equal(a["model_state"]["spread_scale"], b["model_state"]["spread_scale"])
    assert "with the forcings' forecast error (log std 1))" in run_cli("info", tmp_path / "a.pth").out

    ckpt = read_checkpoint(best)
    model, windows = ckpt.build_model().eval(), split_windows(ckpt, probabilistic / "qs.zarr", "val", best)
    sampler = WindowSampler(windows.store, windows.issues, windows.spec, ckpt.norm_stats, patch=None, shuffle=False,
                            maps=ckpt.maps)

    def quantiles(batch_size, forcing_error=None):
        with torch.no_grad(), data_loader(sampler, batch_size=batch_size, collate_fn=collate_windows) as loader:
            return torch.cat([out for *_, out in model_outputs(model, loader, torch.device("cpu"),
                                                               forcing_error=forcing_error)])

    errors = window_errors(ckpt.state, 1.0)
    noisy = quantiles(4, errors)
    assert not torch.allclose(noisy, quantiles(4))
    torch.testing.assert_close(noisy, quantiles(1, errors))


def test_calibrate_again_on_a_period_into_a_new_checkpoint(probabilistic, trained, tmp_path, run_cli):
    """`runoff calibrate` on the validation split gives best.pth's own spread back; on another
    period (with the levels and the location) it writes a new checkpoint that evaluate reads;
    bad input: one line, exit 2, nothing written or overwritten."""
    from pipeline.checkpoint import location_text

    best = probabilistic / "ckpt" / "best.pth"
    args = ("calibrate", "--weights_path", best, "--data_dir", probabilistic / "qs.zarr")
    again = run_cli(*args, "--split", "val", "--output_path", tmp_path / "val.pth")
    assert again.status == 0, again.err
    assert "spread calibrated on" in again.out and "lead 1 x" in again.out
    assert "quantiles moved" not in again.out  # trained without --calibrate_location
    old, new = (torch.load(p, weights_only=True) for p in (best, tmp_path / "val.pth"))
    assert new["point_maps"] == old["point_maps"]
    assert f"single map: the {new['point_maps'][0]} at every lead" in again.out
    for name, tensor in old["model_state"].items():
        assert torch.equal(tensor, new["model_state"][name]), name
    test = read_checkpoint(best).splits["test"]
    period = f"{test.start}.."
    later = run_cli(*args, "--split", period, "--calibrate_levels", "--calibrate_location",
                    "--output_path", tmp_path / "test.pth")
    assert later.status == 0, later.err
    state = torch.load(tmp_path / "test.pth", weights_only=True)
    assert state["calibrated_on"][0] == test.start.isoformat() and len(state["model_config"]["level_calibration"]) == 2
    described = {line[:12].strip(): line[12:] for line in run_cli("info", tmp_path / "test.pth").out.splitlines()}
    assert "probabilistic, 20 quantiles" in described["model"] and described["leads"] == "1, 2 day(s)"
    assert described["spread"].endswith(f"(calibrated on {test.start}..{test.end}; levels per flow class too)")
    moved = state["model_state"]["mean_at_centre"]
    assert ("location" in described) is bool(moved.any())  # the line names the leads moved, where any were
    assert f"quantiles moved to the centre's mean: {location_text(dict(zip([1, 2], moved.tolist())))}" in later.out
    val = read_checkpoint(best).splits["val"]
    assert f"(calibrated on {val.start}..{val.end})" in run_cli("info", best).out
    scored = run_cli("evaluate", "--weights_path", tmp_path / "test.pth", "--data_dir", probabilistic / "qs.zarr",
                     "--output_dir", tmp_path / "evaluation")
    assert scored.status == 0, scored.err
    assert "crps" in json.loads((tmp_path / "evaluation" / "metrics.json").read_text())["leads"]["1"]["model"]
    overlap = run_cli(*args, "--split", "all", "--output_path", tmp_path / "all.pth")
    assert overlap.status == 0 and "overlaps the training split" in overlap.err
    before = (tmp_path / "val.pth").read_bytes()
    for extra, words in ((["--split", "val", "--output_path", tmp_path / "val.pth"], "--output_path"),
                         (["--split", "later", "--output_path", tmp_path / "x.pth"], "--split"),
                         (["--split", "2030-01-01..", "--output_path", tmp_path / "x.pth"], "--split")):
        result = run_cli(*args, *extra)
        assert result.status == 2 and words in one_error_line(result.err), extra
    deterministic = run_cli("calibrate", "--weights_path", trained / "ckpt" / "best.pth", "--data_dir",
                            trained / "qs.zarr", "--split", "val", "--output_path", tmp_path / "x.pth")
    assert deterministic.status == 2 and "deterministic" in one_error_line(deterministic.err)
    assert not (tmp_path / "x.pth").exists() and (tmp_path / "val.pth").read_bytes() == before
