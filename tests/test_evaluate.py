"""`runoff evaluate`: tables per lead, baselines on the same windows, files on the grid."""

import json

import numpy as np
import rasterio

from .conftest import one_error_line


def test_evaluate_writes_tables_figures_and_nse_map(trained, tmp_path, run_cli):
    out = tmp_path / "evaluation"
    result = run_cli("evaluate", "--weights_path", trained / "ckpt" / "best.pth", "--data_dir",
                     trained / "qs.zarr", "--split", "test", "--output_dir", out)
    assert result.status == 0, result.err
    assert "| model |" in result.out and "| persistence |" in result.out and "| climatology |" in result.out
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["leads"]) == {"1", "2"} and metrics["meta"]["windows"] > 0
    lead1 = metrics["leads"]["1"]
    for source in ("model", "persistence", "climatology"):
        assert {"mse", "rmse", "mae", "bias", "nse", "kge"} <= set(lead1[source])
        assert any(k.startswith("fss27@") for k in lead1[source]) and any(k.startswith("csi@") for k in lead1[source])
    m = lead1["model"]
    assert m["skill_vs_persistence"] == 1 - m["mse"] / lead1["persistence"]["mse"]
    assert lead1["persistence"]["bias"] == lead1["persistence"]["bias"]  # not NaN: same windows scored
    md = (out / "metrics.md").read_text()
    assert md.count("## Lead") == 2 and "Events at thresholds" in md
    assert (out / "skill_by_lead.png").stat().st_size > 10_000 and (out / "nse_map_lead1.png").exists()
    with rasterio.open(out / "nse_map_lead1.tif") as f, rasterio.open(trained / "in" / "QS_20190101.tif") as src:
        assert f.crs == src.crs and f.transform == src.transform and f.shape == src.shape
        assert np.nanmax(f.read(1, masked=True)) <= 1.0


def test_scores_are_labelled_in_the_cubes_units(trained, tmp_path, run_cli):
    """A cube in mm (not the default kg m-2) says so in metrics.md and metrics.json."""
    assert run_cli("ingest", trained / "in", tmp_path / "mm.zarr", "--units", "mm").status == 0
    out = tmp_path / "evaluation"
    result = run_cli("evaluate", "--weights_path", trained / "ckpt" / "best.pth", "--data_dir", tmp_path / "mm.zarr",
                     "--output_dir", out)
    assert result.status == 0, result.err
    md = (out / "metrics.md").read_text()
    assert "Events at thresholds (mm), lead 1:" in md and "Units: mse in (mm)²" in md and "kg m-2" not in md
    assert json.loads((out / "metrics.json").read_text())["meta"]["units"] == "mm"


def test_explicit_thresholds_and_bad_split(trained, tmp_path, run_cli):
    result = run_cli("evaluate", "--weights_path", trained / "ckpt" / "best.pth", "--data_dir", trained / "qs.zarr",
                     "--thresholds", "1,5", "--split", "val", "--output_dir", tmp_path)
    assert result.status == 0, result.err
    assert "csi@5" in (tmp_path / "metrics.md").read_text()
    bad = run_cli("evaluate", "--weights_path", trained / "ckpt" / "best.pth", "--data_dir", trained / "qs.zarr",
                  "--split", "later", "--output_dir", tmp_path / "x")
    assert bad.status == 2 and "--split" in one_error_line(bad.err)
    negative = run_cli("evaluate", "--weights_path", trained / "ckpt" / "best.pth", "--data_dir", trained / "qs.zarr",
                       "--thresholds", "5,-1", "--output_dir", tmp_path / "y")
    assert negative.status == 2 and "--thresholds 5,-1" in one_error_line(negative.err)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_period_scores_the_days_it_names(trained, tmp_path, run_cli):
    """``--split START..END`` scores the windows whose targets lie in those days: the test
    split's own days give the test split's figures; days of the training split say in-sample."""
    args = ("evaluate", "--weights_path", trained / "ckpt" / "best.pth", "--data_dir", trained / "qs.zarr")
    test = run_cli(*args, "--output_dir", tmp_path / "test")
    assert test.status == 0, test.err
    split = json.loads((tmp_path / "test" / "metrics.json").read_text())
    period = f"{split['meta']['start']}..{split['meta']['end']}"
    same = run_cli(*args, "--split", period, "--output_dir", tmp_path / "period")
    assert same.status == 0, same.err
    scored = json.loads((tmp_path / "period" / "metrics.json").read_text())
    assert scored["leads"] == split["leads"] and scored["meta"]["windows"] == split["meta"]["windows"]
    md = (tmp_path / "period" / "metrics.md").read_text()
    assert md.startswith(f"# Evaluation on the period ({split['meta']['start']} .. ") and "in-sample" not in md
    early = run_cli(*args, "--split", "..2019-02-10", "--output_dir", tmp_path / "early")
    assert early.status == 0, early.err
    meta = json.loads((tmp_path / "early" / "metrics.json").read_text())["meta"]
    assert (meta["start"], meta["end"]) == ("2019-01-01", "2019-02-10")
    assert "in-sample" in (tmp_path / "early" / "metrics.md").read_text()
    for bad in ("2019-03-10..2019-03-01", "2030-01-01..", "2019-13-01.."):
        result = run_cli(*args, "--split", bad, "--output_dir", tmp_path / "bad")
        assert result.status == 2 and f"--split {bad!r}" in one_error_line(result.err), bad
        assert not (tmp_path / "bad").exists()


def test_evaluate_scores_the_areas_mean_day_by_day(trained, tmp_path, run_cli):
    """Each source's map and the truth averaged over the area every day (on this projected
    grid, cells weigh alike) and scored as a series: the CSV holds the cube's own means, and
    metrics.json's scores are those of the CSV's columns."""
    import pandas as pd
    import xarray as xr

    out = tmp_path / "evaluation"
    result = run_cli("evaluate", "--weights_path", trained / "ckpt" / "best.pth", "--data_dir",
                     trained / "qs.zarr", "--output_dir", out)
    assert result.status == 0, result.err
    metrics = json.loads((out / "metrics.json").read_text())
    table = pd.read_csv(out / "area_mean.csv", parse_dates=["issue_date", "valid_date"])
    assert list(table.columns) == ["issue_date", "valid_date", "lead", "truth", "model", "persistence", "climatology"]
    assert sorted(table.lead.unique()) == [1, 2] and (table.lead == 1).sum() == metrics["meta"]["windows"]
    assert ((table.valid_date - table.issue_date).dt.days == table.lead).all()
    qs = xr.open_zarr(trained / "qs.zarr").qs
    for row in table[table.lead == 2].itertuples():
        truth, today = qs.sel(time=row.valid_date).values, qs.sel(time=row.issue_date).values
        valid = np.isfinite(truth) & np.isfinite(today)
        assert valid.sum() > 0.5 * valid.size
        assert np.isclose(row.truth, truth[valid].mean(), rtol=1e-5, atol=1e-6)
        assert np.isclose(row.persistence, today[valid].mean(), rtol=1e-5, atol=1e-6)
    for lead in (1, 2):
        rows, scored = metrics["area_mean"][str(lead)], table[table.lead == lead]
        assert set(rows) == {"model", "persistence", "climatology"}
        for source in rows:
            errors = scored[source] - scored.truth
            assert np.isclose(rows[source]["mse"], (errors ** 2).mean(), rtol=1e-4)
            assert np.isclose(rows[source]["bias"], errors.mean(), rtol=1e-4, atol=1e-6)
            spread = ((scored.truth - scored.truth.mean()) ** 2).sum()
            assert np.isclose(rows[source]["nse"], 1 - (errors ** 2).sum() / spread, rtol=1e-4, atol=1e-6)
        model = rows["model"]
        assert model["skill_vs_persistence"] == 1 - model["mse"] / rows["persistence"]["mse"]
    md = (out / "metrics.md").read_text()
    assert "## Mean over the scored area" in md and "cells weighted equally" in md
    assert f"| 2 | model | {rows['model']['mse']:.4g} |" in md
    assert (out / "area_mean.png").stat().st_size > 10_000


def test_the_areas_mean_weighs_cells_by_their_area_on_a_geographic_grid(tmp_path, run_cli):
    """On a latitude/longitude grid from 72.5 to 17.5 degrees north a cell at the top is a
    third of one at the bottom: the area's mean weighs each by the cosine of its latitude."""
    import pandas as pd
    import xarray as xr

    from pipeline.synth import write_lsm_files

    write_lsm_files(tmp_path / "nc", "multi", days=40, height=12, width=16, resolution=5.0, origin=(-100.0, 75.0))
    assert run_cli("ingest", tmp_path / "nc", tmp_path / "qs.zarr").status == 0
    trained = run_cli("train", "--data_dir", tmp_path / "qs.zarr", "--epochs", "1", "--hidden_channels", "4",
                      "--leads", "1", "--checkpoint_dir", tmp_path / "ckpt", "--output_dir", tmp_path / "out")
    assert trained.status == 0, trained.err
    out = tmp_path / "evaluation"
    result = run_cli("evaluate", "--weights_path", tmp_path / "ckpt" / "best.pth", "--data_dir", tmp_path / "qs.zarr",
                     "--output_dir", out)
    assert result.status == 0, result.err
    assert "weighted by cell area, the cosine of the latitude" in (out / "metrics.md").read_text()
    qs = xr.open_zarr(tmp_path / "qs.zarr").qs
    weights = np.cos(np.deg2rad(qs.y.values))[:, None] * np.ones(qs.shape[2])
    table = pd.read_csv(out / "area_mean.csv", parse_dates=["issue_date", "valid_date"])
    assert len(table) > 0
    for row in table.itertuples():
        truth, today = qs.sel(time=row.valid_date).values, qs.sel(time=row.issue_date).values
        valid = np.isfinite(truth) & np.isfinite(today)
        weighted = np.average(truth[valid], weights=weights[valid])
        assert np.isclose(row.truth, weighted, rtol=1e-5) and not np.isclose(row.truth, truth[valid].mean(), rtol=1e-3)
        assert np.isclose(row.persistence, np.average(today[valid], weights=weights[valid]), rtol=1e-5)


def test_a_mask_limits_every_score_to_the_pixels_it_selects(trained, tmp_path, run_cli):
    """``--mask`` (a catchment rasterised on the cube's grid) scores its pixels only: the
    pooled scores, the area's mean and the per-pixel maps; a mask off the grid, selecting
    nothing or missing is one line, exit 2, nothing written."""
    import pandas as pd
    import xarray as xr

    with rasterio.open(trained / "in" / "QS_20190101.tif") as src:
        profile = {**src.profile, "dtype": "uint8", "nodata": 255}
    inside = np.zeros((profile["height"], profile["width"]), np.uint8)
    inside[5:25, 10:40] = 1
    masks = {"basin": inside, "empty": inside * 0, "cut": inside[:-1]}
    for name, values in masks.items():
        shape = {"height": values.shape[0], "width": values.shape[1]}
        with rasterio.open(tmp_path / f"{name}.tif", "w", **{**profile, **shape}) as dst:
            dst.write(values, 1)
    args = ("evaluate", "--weights_path", trained / "ckpt" / "best.pth", "--data_dir", trained / "qs.zarr")
    out = tmp_path / "evaluation"
    result = run_cli(*args, "--mask", tmp_path / "basin.tif", "--output_dir", out)
    assert result.status == 0, result.err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["meta"]["mask"] == str(tmp_path / "basin.tif")
    assert f"Scored inside {tmp_path / 'basin.tif'} (--mask): 600 of the grid's 2080 pixels." in (
        out / "metrics.md").read_text()
    qs = xr.open_zarr(trained / "qs.zarr").qs
    table = pd.read_csv(out / "area_mean.csv", parse_dates=["issue_date", "valid_date"])
    errors = []
    for row in table[table.lead == 1].itertuples():
        truth, today = qs.sel(time=row.valid_date).values, qs.sel(time=row.issue_date).values
        valid = (inside == 1) & np.isfinite(truth) & np.isfinite(today)
        assert np.isclose(row.truth, truth[valid].mean(), rtol=1e-5, atol=1e-6)
        errors.append(today[valid] - truth[valid])
    errors = np.concatenate(errors)
    assert np.isclose(metrics["leads"]["1"]["persistence"]["mse"], np.mean(errors ** 2), rtol=1e-6)
    with rasterio.open(out / "nse_map_lead1.tif") as f:
        nse = f.read(1, masked=True)
    assert nse.mask[inside == 0].all() and not nse.mask[inside == 1].all()
    for name, words in (("cut", "differs from the cube"), ("empty", "selects no pixel"), ("absent", "no such file")):
        bad = run_cli(*args, "--mask", tmp_path / f"{name}.tif", "--output_dir", tmp_path / name)
        assert bad.status == 2 and words in one_error_line(bad.err) and "--mask" in bad.err
        assert not (tmp_path / name).exists()
