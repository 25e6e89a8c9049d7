"""Several checkpoints trained alike forecast together: ``--weights_path A B`` in predict and
evaluate averages their maps, or pools a probabilistic model's quantiles."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from pipeline.checkpoint import read_checkpoint
from pipeline.cube import open_cube
from pipeline.inference import Forecaster
from pipeline.storage import file_sha256
from pipeline.synth import write_series

from .conftest import one_error_line, tree_digest


def _train(data_dir: Path, checkpoint_dir: Path, seed: int, **settings) -> Path:
    from pipeline.train import TrainConfig, train

    train(TrainConfig(data_dir=str(data_dir), epochs=2, batch_size=4, patch=16, leads=[1, 2], seed=seed,
                      checkpoint_dir=str(checkpoint_dir), output_dir=str(checkpoint_dir / "out"), device="cpu",
                      **settings))
    return checkpoint_dir / "best.pth"


@pytest.fixture(scope="module")
def seeds(trained, tmp_path_factory) -> list[Path]:
    """The ``trained`` fixture's checkpoint and one trained alike with another seed."""
    other = _train(trained / "qs.zarr", tmp_path_factory.mktemp("seed1"), seed=1, hidden_channels=[4])
    return [trained / "ckpt" / "best.pth", other]


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1, masked=True).filled(np.nan)


def test_predict_with_two_checkpoints_writes_the_mean_of_their_maps(trained, seeds, tmp_path, run_cli):
    outputs = {}
    for name, weights in (("a", seeds[:1]), ("b", seeds[1:]), ("both", seeds)):
        result = run_cli("predict", "--weights_path", *weights, "--input_dir", trained / "qs.zarr",
                         "--output_dir", tmp_path / name, "--last", "--max_plots", "0")
        assert result.status == 0, result.err
        outputs[name] = sorted((tmp_path / name).glob("QS_*.tif"))
    assert [p.name for p in outputs["both"]] == [p.name for p in outputs["a"]] and len(outputs["both"]) == 2
    for a, b, both in zip(outputs["a"], outputs["b"], outputs["both"]):
        single, other, mean = _read(a), _read(b), _read(both)
        ok = np.isfinite(mean)
        assert ok.any() and np.array_equal(ok, np.isfinite(single))
        assert not np.allclose(single[ok], other[ok])  # two different models
        np.testing.assert_allclose(mean[ok], (single[ok] + other[ok]) / 2, rtol=1e-5, atol=1e-6)
        with rasterio.open(both) as src:
            tags = src.tags()
        assert tags["checkpoint_sha256"] == ",".join(file_sha256(p) for p in seeds)
        assert str(seeds[1]) in tags["source"]


def test_evaluate_with_two_checkpoints_scores_their_mean_and_names_both(trained, seeds, tmp_path, run_cli):
    result = run_cli("evaluate", "--weights_path", *seeds, "--data_dir", trained / "qs.zarr",
                     "--output_dir", tmp_path / "eval")
    assert result.status == 0, result.err
    document = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert document["meta"]["checkpoint"] == [str(p) for p in seeds]
    assert "2 checkpoints forecasting together" in (tmp_path / "eval" / "metrics.md").read_text()
    # the model row is the MSE of the two models' mean map over the scored windows
    forecaster = Forecaster.load([read_checkpoint(p) for p in seeds], "cpu")
    singles = [Forecaster.load(read_checkpoint(p), "cpu") for p in seeds]
    ds = open_cube(trained / "qs.zarr")
    issues = list(range(len(ds.time) - 8, len(ds.time) - 2))
    np.testing.assert_allclose(forecaster.forecast(ds, issues),
                               (singles[0].forecast(ds, issues) + singles[1].forecast(ds, issues)) / 2, rtol=1e-5)
    single = run_cli("evaluate", "--weights_path", seeds[0], "--data_dir", trained / "qs.zarr",
                     "--output_dir", tmp_path / "single")
    assert single.status == 0, single.err
    lead1 = json.loads((tmp_path / "single" / "metrics.json").read_text())["leads"]["1"]
    assert document["leads"]["1"]["model"]["mse"] != lead1["model"]["mse"]
    assert document["leads"]["1"]["persistence"] == lead1["persistence"]  # the same windows and pixels


@pytest.mark.parametrize("change, words", [
    (lambda state: {**state, "leads": [1]}, "in its leads"),
    (lambda state: {**state, "norm_stats": {v: {**s, "mean": s["mean"] + 1} for v, s in state["norm_stats"].items()}},
     "in its normalisation"),
    (lambda state: {**state, "splits": {**state["splits"], "train": ["2019-01-01", "2019-01-30"]}},
     "in its split days"),
    (lambda state: {**state, "model_config": {**state["model_config"], "quantiles": 20}},
     "in its kind (deterministic or probabilistic)"),
])
def test_checkpoints_that_cannot_forecast_together_are_refused_in_one_line(trained, seeds, tmp_path, run_cli,
                                                                         change, words):
    state = torch.load(seeds[0], weights_only=True)
    other = tmp_path / "other.pth"
    torch.save(change(state), other)
    before = tree_digest(trained)
    for command, data in (("predict", "--input_dir"), ("evaluate", "--data_dir")):
        result = run_cli(command, "--weights_path", seeds[0], other, data, trained / "qs.zarr",
                         "--output_dir", tmp_path / command)
        assert result.status == 2
        line = one_error_line(result.err)
        assert f"--weights_path {other}: differs from {seeds[0]}" in line and words in line
        assert not (tmp_path / command).exists()
    twice = run_cli("evaluate", "--weights_path", seeds[0], seeds[0], "--data_dir", trained / "qs.zarr",
                    "--output_dir", tmp_path / "twice")
    assert twice.status == 2 and "given twice" in one_error_line(twice.err) and not (tmp_path / "twice").exists()
    assert tree_digest(trained) == before


def test_probabilistic_checkpoints_pool_their_quantiles(tmp_path, run_cli):
    write_series(tmp_path / "in", days=60, height=16, width=24, seed=3, regime="river", covariates=["rainf"])
    assert run_cli("ingest", tmp_path / "in", tmp_path / "qs.zarr").status == 0
    paths = [_train(tmp_path / "qs.zarr", tmp_path / f"seed{s}", seed=s, hidden_channels=[4], probabilistic=True,
                    forcings=["rainf"]) for s in (0, 1)]
    ds = open_cube(tmp_path / "qs.zarr")
    issues = [20, 30]
    singles = [Forecaster.load(read_checkpoint(p), "cpu").forecast(ds, issues, members=True) for p in paths]
    pooled = Forecaster.load([read_checkpoint(p) for p in paths], "cpu")
    assert pooled.members == 40
    members = pooled.forecast(ds, issues, members=True)
    assert members.shape[2] == 40
    np.testing.assert_array_equal(members, np.sort(np.concatenate(singles, axis=2), axis=2))
    np.testing.assert_allclose(pooled.forecast(ds, issues), (singles[0].mean(axis=2) + singles[1].mean(axis=2)) / 2,
                               rtol=1e-5)
    result = run_cli("evaluate", "--weights_path", *paths, "--data_dir", tmp_path / "qs.zarr",
                     "--output_dir", tmp_path / "eval")
    assert result.status == 0, result.err
    assert "their quantiles pooled, 40 members" in (tmp_path / "eval" / "metrics.md").read_text()
    ranks = json.loads((tmp_path / "eval" / "metrics.json").read_text())["ensemble"]["1"]["rank_histogram"]
    assert len(ranks) == 41
