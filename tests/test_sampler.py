"""Splits, normalisation and the Dask-backed window sampler."""

import datetime as dt

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pipeline.cube import cube_dates, held_input, make_splits, map_stats, normalisation_stats, normalise, open_cube
from pipeline.errors import RunoffError, RunoffWarning
from pipeline.ingest import ingest
from pipeline.sampler import Window, WindowSampler, WindowSpec, collate_windows, window_issues
from pipeline.synth import write_series


@pytest.fixture(scope="module")
def cube(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampler")
    write_series(root / "in", days=60, height=24, width=30, seed=5, covariates=["rainf"])
    (root / "in" / "Qs" / "QS_20190120.tif").unlink()  # a missing day
    with pytest.warns(RunoffWarning, match="2019-01-20"):
        ingest(root / "in", root / "qs.zarr", chunks={"time": 8, "y": 16, "x": 16})
    return str(root / "qs.zarr")


def test_default_and_explicit_splits_do_not_overlap():
    s = make_splits(dt.date(2020, 1, 1), dt.date(2020, 12, 31))
    assert s["train"].end < s["val"].start <= s["val"].end < s["test"].start
    assert (s["test"].end - s["test"].start).days + 1 == round(0.15 * 366)
    s = make_splits(dt.date(2020, 1, 1), dt.date(2020, 12, 31), "2020-06-30", "2020-09-30")
    assert (s["train"].end, s["val"].end, s["test"].start) == (dt.date(2020, 6, 30), dt.date(2020, 9, 30),
                                                               dt.date(2020, 10, 1))
    with pytest.raises(RunoffError, match="--train_end"):
        make_splits(dt.date(2020, 1, 1), dt.date(2020, 12, 31), "2020-10-30", "2020-09-30")


def test_windows_skip_missing_days_and_keep_targets_inside_the_split(cube):
    ds = open_cube(cube)
    dates = cube_dates(ds)
    splits = make_splits(dates[0], dates[-1])
    spec = WindowSpec(input_days=4, leads=(1, 3))
    targets = {}
    for name, split in splits.items():
        issues = window_issues(ds, split, spec)
        for t in issues:
            days = [dates[t - k] for k in range(4)] + [dates[t + lead] for lead in (1, 3)]
            assert dt.date(2019, 1, 20) not in days
        targets[name] = {dates[t + lead] for t in issues for lead in (1, 3)}
        assert all(split.contains(d) for d in targets[name])
    assert not targets["train"] & targets["val"] and not targets["val"] & targets["test"]
    assert len(targets["train"]) > 10


def test_normalisation_uses_the_training_days_only(cube):
    ds = open_cube(cube)
    split = make_splits(*[cube_dates(ds)[i] for i in (0, -1)])["train"]
    stats = normalisation_stats(ds, ["qs"], split)
    values = ds.qs.sel(time=slice(str(split.start), str(split.end))).values
    logged = np.log1p(values[np.isfinite(values)])
    assert stats["qs"]["mean"] == pytest.approx(logged.mean(), rel=1e-5)
    assert stats["qs"]["std"] == pytest.approx(logged.std(), rel=1e-4)


def _sampler(cube, patch=None, shuffle=False, seed=0, variables=("qs",), leads=(1,)):
    ds = open_cube(cube)
    split = make_splits(*[cube_dates(ds)[i] for i in (0, -1)])["train"]
    spec = WindowSpec(6, leads, variables)
    stats = normalisation_stats(ds, list(variables), split)
    return WindowSampler(cube, window_issues(ds, split, spec), spec, stats, patch=patch, shuffle=shuffle,
                         seed=seed), ds, stats


def test_window_shapes_mask_and_values(cube):
    sampler, ds, stats = _sampler(cube, leads=(1, 2))
    x, y, mask, issue, _ = next(iter(sampler))
    assert x.shape == (6, 1, 24, 30) and y.shape == (2, 1, 24, 30) and mask.dtype == torch.bool
    t = int(sampler.issues[0])
    assert int(issue) == t
    truth = normalise(ds.qs.isel(time=t + 1).values, stats["qs"])
    np.testing.assert_allclose(y[0, 0][mask[0, 0]].numpy(), truth[np.isfinite(truth)], rtol=1e-6)
    assert not mask.all() and mask.any()  # the sea is masked
    assert torch.isfinite(x).all()


def test_patches_covariate_channels_and_determinism(cube):
    a, _, _ = _sampler(cube, patch=16, shuffle=True, seed=1, variables=("qs", "rainf"))
    b, _, _ = _sampler(cube, patch=16, shuffle=True, seed=1, variables=("qs", "rainf"))
    first_a = [w.x for w in a]
    assert first_a[0].shape == (6, 2, 16, 16)
    assert all(torch.equal(p, q) for p, q in zip(first_a, (w.x for w in b)))
    a.set_epoch(1)
    assert not all(torch.equal(p, q) for p, q in zip(first_a, (w.x for w in a)))


@pytest.mark.parametrize("task_bytes", [32 * 2**20, 1])
def test_a_block_read_equals_the_cube_normalised_with_covariates(cube, task_bytes):
    # 1 byte per task: one task per stored chunk (2 x 2 of them per day), each a strided region of the block
    sampler, ds, _ = _sampler(cube, variables=("qs", "rainf"))
    sampler.task_bytes = task_bytes
    stats = normalisation_stats(ds, ["qs", "rainf"], make_splits(*[cube_dates(ds)[i] for i in (0, -1)])["train"])
    data, valid = sampler._read(3, 40, sampler._normalisation)
    for v, name in enumerate(("qs", "rainf")):
        values = ds[name].values[3:41]
        assert np.isnan(values).any()
        np.testing.assert_array_equal(valid[:, v], np.isfinite(values))
        np.testing.assert_allclose(data[:, v], np.nan_to_num(normalise(values, stats[name])), rtol=1e-6)


def test_one_read_per_block_not_per_window(cube):
    sampler, _, _ = _sampler(cube, patch=8, shuffle=True)
    reads = []
    original = sampler.load_block
    sampler.load_block = lambda first, last, region=None: reads.append((first, last)) or original(first, last, region)
    n = sum(1 for _ in sampler)
    assert n == len(sampler) > 10
    assert len(reads) == len(sampler.blocks()) == 1
    sampler.block_bytes = 16 * 24 * 30 * 4  # force several small blocks
    reads.clear()
    assert sum(1 for _ in sampler) == n and 1 < len(reads) < n


def test_patches_of_a_grid_too_large_for_whole_map_blocks_come_from_regions(cube):
    """One stored time chunk (8 days) of whole maps overflows the budget, so each block
    reads a region of whole 16x16 stored chunks, as large as the budget holds, and cuts its
    patches there: every window
    is the patch of the whole-map window at some place inside its region, for the cube's
    variables, a static map held in memory and a season input alike."""
    ds = open_cube(cube)
    train = make_splits(*[cube_dates(ds)[i] for i in (0, -1)])["train"]
    spec = WindowSpec(6, (1, 2), ("qs", "place", "season_sin"), forcings=("rainf",))
    maps = {"place": np.arange(24 * 30, dtype=np.float32).reshape(24, 30)}  # each pixel its own value
    issues = window_issues(ds, train, spec)
    stats = {**normalisation_stats(ds, ["qs", "rainf"], train), "place": map_stats("place", maps["place"], train),
             "season_sin": map_stats("season_sin", held_input(ds, "season_sin"), train)}
    whole = {int(w.issue): w for w in WindowSampler(cube, issues, spec, stats, maps=maps)}
    day_bytes = 4 * 24 * 30 * 4
    regional = WindowSampler(cube, issues, spec, stats, patch=8, shuffle=True, seed=1, maps=maps,
                             block_bytes=day_bytes * 12)  # 12 days of whole maps: 5 issue days, not 8
    assert regional.regional and not WindowSampler(cube, issues, spec, stats, maps=maps).regional
    regions = set()
    original = regional.load_block
    regional.load_block = lambda first, last, region=None: (
        regions.add(tuple((r.start, r.stop) for r in region)) or original(first, last, region))
    seen = []
    for w in regional:
        full = whole[int(w.issue)]
        places = [(y0, x0) for y0 in range(24 - 7) for x0 in range(30 - 7)
                  if torch.equal(full.x[..., y0:y0 + 8, x0:x0 + 8], w.x)]
        assert len(places) == 1  # the static map makes every place's patch different
        (y0, x0), = places
        for field in ("y", "mask", "forcings"):
            assert torch.equal(getattr(full, field)[..., y0:y0 + 8, x0:x0 + 8], getattr(w, field))
        seen.append(int(w.issue))
    assert sorted(seen) == sorted(issues.tolist())
    # 576 px of 15 days and 4 inputs fit: 16 rows (one stored chunk) of the whole width, from row 0 or 8
    assert regional.region_shape() == (16, 30)
    assert regions == {((0, 16), (0, 30)), ((8, 24), (0, 30))}
    data, _ = regional.load_block(*next((b.min() - 5, b.max() + 2) for b in regional.blocks()),
                                  (slice(8, 24), slice(0, 30)))
    assert data.shape[-2:] == (16, 30)


def test_loader_workers_and_ranks_see_disjoint_windows(cube):
    sampler, _, _ = _sampler(cube)
    single = sorted(int(w.issue) for w in sampler)
    assert single == sorted(sampler.issues.tolist())  # every window once
    loader = DataLoader(sampler, batch_size=None, num_workers=2, multiprocessing_context="spawn")
    assert sorted(int(w.issue) for w in loader) == single
    halves = [[int(w.issue) for w in _sampler(cube)[0].shard(r, 2)] for r in (0, 1)]
    assert not set(halves[0]) & set(halves[1])
    assert sorted(halves[0] + halves[1]) == single


def test_workers_that_persist_across_epochs_follow_set_epoch(cube):
    sampler, _, _ = _sampler(cube, patch=8, shuffle=True, seed=3)

    def epoch(loader):
        windows = sorted(((int(w.issue), w.x) for w in loader), key=lambda item: item[0])
        return [t for t, _ in windows], torch.stack([x for _, x in windows])

    kw = dict(batch_size=None, num_workers=2, multiprocessing_context="spawn")
    persistent = DataLoader(sampler, persistent_workers=True, **kw)
    seen = {}
    for e in (1, 2):
        sampler.set_epoch(e)
        seen[e] = epoch(persistent)
        fresh = epoch(DataLoader(sampler, **kw))  # workers started for this epoch alone
        assert seen[e][0] == fresh[0] == sorted(sampler.issues.tolist())
        assert torch.equal(seen[e][1], fresh[1])
    assert not torch.equal(seen[1][1], seen[2][1])  # epoch 2 drew other patches


def test_stats_fitted_from_the_first_block_match_the_cube_pass_and_save_its_read(cube):
    ds = open_cube(cube)
    split = make_splits(*[cube_dates(ds)[i] for i in (0, -1)])["train"]
    spec = WindowSpec(6, (1,), ("qs", "rainf"))
    issues = window_issues(ds, split, spec)
    expected = normalisation_stats(ds, ["qs", "rainf"], split)
    reference = WindowSampler(cube, issues, spec, expected, patch=8, shuffle=True, seed=3)

    fitted = WindowSampler(cube, issues, spec, {}, patch=8, shuffle=True, seed=3)
    reads = []
    original = fitted._read
    fitted._read = lambda first, last, transform: reads.append((first, last)) or original(first, last, transform)
    stats = fitted.fit_stats(split)
    for name in ("qs", "rainf"):
        assert stats[name]["mean"] == pytest.approx(expected[name]["mean"], rel=1e-5)
        assert stats[name]["std"] == pytest.approx(expected[name]["std"], rel=1e-5)
        largest = float(ds[name].sel(time=slice(str(split.start), str(split.end))).max())
        assert stats[name]["max"] == pytest.approx(largest, rel=1e-5) == expected[name]["max"]
    windows = list(fitted)
    assert len(reads) == 1  # the stats' read is the epoch's: the block was not read again
    for got, want in zip(windows, reference):
        assert int(got.issue) == int(want.issue) and torch.equal(got.mask, want.mask)
        np.testing.assert_allclose(got.x.numpy(), want.x.numpy(), rtol=1e-4, atol=1e-5)

    several = WindowSampler(cube, issues, spec, {}, block_bytes=16 * 24 * 30 * 8)  # no single block
    several._read = lambda *args: pytest.fail("the stats of several blocks come from a cube pass")
    for name, values in several.fit_stats(split).items():
        assert values == pytest.approx(expected[name], rel=1e-6)  # Dask chunks differ: float32 sums, reordered


def test_collated_batches_equal_the_default_collation(cube):
    sampler, _, _ = _sampler(cube, patch=8, shuffle=True, variables=("qs", "rainf"), leads=(1, 3))
    ours = list(DataLoader(sampler, batch_size=5, collate_fn=collate_windows))
    default = list(DataLoader(sampler, batch_size=5))
    assert len(ours) == len(default) == -(-len(sampler) // 5)
    for a, b in zip(ours, default):
        assert a.x.shape == (len(b.issue), 6, 2, 8, 8)
        for field in Window._fields:
            assert getattr(a, field).dtype == getattr(b, field).dtype
            assert torch.equal(getattr(a, field), getattr(b, field)), field


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked memory needs CUDA")
def test_collated_batches_in_pinned_memory(cube):
    sampler, _, _ = _sampler(cube, patch=8)
    batch = collate_windows(list(sampler)[:3], pin_memory=True)
    assert all(t.is_pinned() for t in (batch.x, batch.y, batch.mask))
