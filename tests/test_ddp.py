"""Data-parallel training: ``torchrun --nproc_per_node 2 -m pipeline.train`` on CPU (gloo)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.cube import cube_dates, make_splits, open_cube
from pipeline.sampler import WindowSpec, window_issues
from pipeline.checkpoint import load_checkpoint

from .conftest import synthetic_cube


@pytest.fixture(scope="module")
def cube(tmp_path_factory) -> str:
    return synthetic_cube(tmp_path_factory.mktemp("ddp"), days=90, height=24, width=32, seed=5)


def _torchrun(cube: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "pipeline.train", "--data_dir", cube, "--batch_size", "4", "--hidden_channels", "4",
               "--patch", "16", "--checkpoint_dir", str(out / "ckpt"), "--output_dir", str(out / "outputs"),
               "--device", "cpu", *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_two_ranks_train_disjoint_windows_and_resume_exactly(cube, tmp_path, run_cli):
    whole = _torchrun(cube, tmp_path / "whole", "--epochs", "2")
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert whole.stdout.count("epoch   1/2") == 1  # one log line per epoch: rank 0 only
    state = load_checkpoint(tmp_path / "whole" / "ckpt" / "last.pth")
    assert state["world_size"] == 2 and state["epoch"] == 2

    ranks = state["epoch_windows"]
    assert len(ranks) == 2 and all(ranks)
    assert not set(ranks[0]) & set(ranks[1]), "the ranks saw overlapping windows"
    ds = open_cube(cube)
    train_split = make_splits(*[cube_dates(ds)[i] for i in (0, -1)])["train"]
    assert sorted(ranks[0] + ranks[1]) == window_issues(ds, train_split, WindowSpec(6, (1,))).tolist()

    first = _torchrun(cube, tmp_path / "resumed", "--epochs", "1")
    assert first.returncode == 0, first.stderr[-2000:]
    resumed = _torchrun(cube, tmp_path / "resumed", "--epochs", "2",
                        "--resume", str(tmp_path / "resumed" / "ckpt" / "last.pth"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    again = load_checkpoint(tmp_path / "resumed" / "ckpt" / "last.pth")
    assert again["epoch"] == 2 and len(again["history"]) == 2
    for name, tensor in state["model_state"].items():
        torch.testing.assert_close(again["model_state"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)

    result = run_cli("predict", "--weights_path", tmp_path / "whole" / "ckpt" / "best.pth", "--input_dir", cube,
                     "--output_dir", tmp_path / "pred", "--last", "--max_plots", "0")
    assert result.status == 0, result.err
    assert len(list((tmp_path / "pred").glob("QS_*_lead1.tif"))) == 1


def test_two_ranks_train_and_calibrate_a_probabilistic_model(cube, tmp_path):
    run = _torchrun(cube, tmp_path / "prob", "--epochs", "1", "--probabilistic", "--calibrate_levels")
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("spread calibrated on the validation split") == 1  # rank 0 logs, both ranks score
    assert run.stdout.count("quantile levels calibrated per flow class") == 1
    state = load_checkpoint(tmp_path / "prob" / "ckpt" / "best.pth")
    assert state["world_size"] == 2 and state["model_config"]["quantiles"] == 20
    assert state["model_state"]["spread_scale"].shape == (1,) and state["model_state"]["lower_spread"].shape == (1,)
    assert len(state["model_config"]["level_calibration"]) == 1



def test_two_ranks_calibrate_the_model_best_pth_holds(tmp_path, run_cli):
    """The ranks' shares of this cube hold unequal numbers of batches, so one stops stepping
    before the other; each epoch ends with every rank on the main rank's weights, average and
    optimiser, so the spread and levels both ranks calibrate into best.pth (their forcings
    with a forecast error, drawn by window, not by rank) are those `runoff calibrate` finds
    alone. Before, the levels differed by up to 0.46."""
    from pipeline.ingest import ingest
    from pipeline.synth import write_series

    write_series(tmp_path / "in", days=80, height=24, width=32, seed=3, regime="river", covariates=["rainf"])
    ingest(tmp_path / "in", tmp_path / "qs.zarr")
    cube = str(tmp_path / "qs.zarr")
    run = _torchrun(cube, tmp_path / "prob", "--epochs", "2", "--probabilistic", "--leads", "1-2", "--forcings",
                    "rainf", "--forcing_error", "0.5", "--calibrate_levels")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "spread calibrated on the validation split with the forcings' forecast error (log std 0.5)" in run.stdout
    best = tmp_path / "prob" / "ckpt" / "best.pth"
    alone = run_cli("calibrate", "--weights_path", best, "--data_dir", cube, "--split", "val", "--output_path",
                    tmp_path / "alone.pth")
    assert alone.status == 0, alone.err
    ranks, one = load_checkpoint(best), load_checkpoint(tmp_path / "alone.pth")
    assert torch.equal(ranks["model_state"]["spread_scale"], one["model_state"]["spread_scale"])
    for ours, theirs in zip(ranks["model_config"]["level_calibration"], one["model_config"]["level_calibration"],
                            strict=True):
        for key in ("centres", "levels"):
            torch.testing.assert_close(torch.tensor(ours[key]), torch.tensor(theirs[key]), rtol=1e-5, atol=1e-5)

RELEASE_CHECK = r"""
import gc, sys
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from pipeline.train import TrainConfig, train

destroy = dist.destroy_process_group


def counting_destroy(*args, **kwargs):
    alive = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
    print(f"rank {dist.get_rank()} DDP alive at destroy: {alive}", flush=True)
    return destroy(*args, **kwargs)


dist.destroy_process_group = counting_destroy
train(TrainConfig(data_dir=sys.argv[1], epochs=1, batch_size=4, hidden_channels=[4], patch=16, device="cpu",
                  checkpoint_dir=sys.argv[2], output_dir=sys.argv[3]))
"""


def test_the_process_group_is_released_while_the_interpreter_is_alive(cube, tmp_path):
    """No DistributedDataParallel wrapper (which keeps the process group and gloo's work
    objects alive) survives to ``destroy_process_group``: otherwise the group is torn down
    at interpreter exit, where a rank can abort (SIGABRT) and torchrun reports failure."""
    script = tmp_path / "release.py"
    script.write_text(RELEASE_CHECK)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), cube, str(tmp_path / "ckpt"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    # both ranks write to one pipe, so their lines may run together
    counts = sorted(re.findall(r"rank (\d) DDP alive at destroy: (\d+)", done.stdout))
    assert counts == [("0", "0"), ("1", "0")], done.stdout[-2000:]
