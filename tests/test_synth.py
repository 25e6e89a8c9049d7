"""The synthetic series is deterministic and has the statistics of real surface runoff."""

import numpy as np
import pytest
import rasterio

from pipeline.synth import NODATA, simulate, write_series

from .conftest import one_error_line


def _stack(days=365, seed=0):
    series = list(simulate(days=days, height=64, width=80, seed=seed))
    return np.stack([d.qs for d in series]), series


def test_deterministic_for_a_seed():
    a, _ = _stack(30, seed=3)
    b, _ = _stack(30, seed=3)
    c, _ = _stack(30, seed=4)
    assert np.array_equal(a, b, equal_nan=True)
    assert not np.array_equal(a, c, equal_nan=True)


def test_runoff_is_sparse_skewed_coherent_persistent_and_seasonal():
    qs, series = _stack(365)
    land = ~np.isnan(qs[0])
    assert 0.05 < (~land).mean() < 0.5                       # a sea area is masked
    values = qs[:, land]
    assert (values == 0).mean() > 0.6                         # zero on most pixels of most days
    wet = values[values > 0]
    assert np.mean((wet - wet.mean()) ** 3) / wet.std() ** 3 > 1.5   # heavily right-skewed
    day = np.nan_to_num(qs[np.argmax(values.mean(1))])
    assert np.corrcoef(day[:, 1:].ravel(), day[:, :-1].ravel())[0, 1] > 0.8   # spatially coherent
    mean = values.mean(1)
    assert np.corrcoef(mean[1:], mean[:-1])[0, 1] > 0.3      # memory from day to day
    months = np.array([d.date.month for d in series])
    assert mean[np.isin(months, [11, 12, 1])].mean() > mean[np.isin(months, [7, 8, 9])].mean()


def test_runoff_never_exceeds_rain_plus_storage_and_is_non_negative():
    _, series = _stack(60)
    for d in series:
        land = ~np.isnan(d.qs)
        assert (d.qs[land] >= 0).all() and (d.soilm[land] >= 0).all()
        assert (d.qs[land] <= d.rainf[land] + 1e-4).all()


def test_geotiffs_carry_crs_nodata_units(tmp_path):
    paths = write_series(tmp_path, days=3, height=16, width=20, crs="EPSG:2154", covariates=["rainf", "soilm"])
    assert [p.parent.name for p in paths] == ["Qs"] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Qs", "Rainf", "SoilM"]
    with rasterio.open(paths[0]) as src:
        assert src.crs.to_epsg() == 2154 and src.nodata == NODATA and src.dtypes[0] == "float32"
        assert src.tags()["units"] == "kg m-2"


@pytest.mark.parametrize("args, words", [(["--start", "2019-13-01"], "--start '2019-13-01'"),
                                         (["--days", "0"], "--days >= 1"),
                                         (["--height", "4"], "8x8 pixels"),
                                         (["--days", "3", "--format", "png", "--png_scale", "-3"], "--png_scale -3")])
def test_bad_synth_options_are_one_line_exit_2_and_make_no_folder(args, words, tmp_path, run_cli):
    result = run_cli("synth", tmp_path / "series", *args)
    assert result.status == 2 and words in one_error_line(result.err)
    assert not (tmp_path / "series").exists()
