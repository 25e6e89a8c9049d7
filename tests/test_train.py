"""`runoff train`: it learns, checkpoints, exact resume after a kill, bad input."""

from __future__ import annotations

import inspect
import math
import multiprocessing
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from pipeline.checkpoint import load_checkpoint
from pipeline.cube import cube_dates, make_splits, open_cube
from pipeline.device import loader_batches, prefetched, queue_marker
from pipeline.sampler import WindowSampler, WindowSpec, window_issues
from pipeline.synth import write_series
from pipeline.train import TrainConfig, train

from .conftest import one_error_line, synthetic_cube, tree_digest


@pytest.fixture(scope="module")
def small_cube(tmp_path_factory) -> str:
    return synthetic_cube(tmp_path_factory.mktemp("train"), days=120, height=24, width=32, seed=3)


def _train_cmd(cube: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.train", "--data_dir", cube, "--epochs", "4", "--batch_size", "4",
            "--hidden_channels", "4", "--patch", "16", "--checkpoint_dir", str(out / "ckpt"),
            "--output_dir", str(out / "outputs"), "--seed", "7", "--device", "cpu", *extra]


def test_checkpoint_contents_and_outputs(small_cube, tmp_path, run_cli):
    result = run_cli("train", "--data_dir", small_cube, "--epochs", "2", "--batch_size", "4", "--hidden_channels",
                     "4", "--kernel_size", "3", "--leads", "1-2", "--checkpoint_dir", tmp_path / "ckpt",
                     "--output-dir", tmp_path / "out", "--patch", "16")
    assert result.status == 0, result.err
    assert "epoch   2/2" in result.out and "skill vs persistence" in result.out and "data wait" in result.out
    state = torch.load(tmp_path / "ckpt" / "model_epoch2.pth", weights_only=True)
    for key in ("model_state", "model_config", "optimizer_state", "scheduler_state", "epoch", "norm_stats",
                "input_days", "leads", "grid", "package_version", "rng_state", "splits", "train_config"):
        assert key in state, key
    assert state["leads"] == [1, 2] and state["input_days"] == 6 and state["epoch"] == 2
    assert state["grid"]["height"] == 24 and "LAMBERT" in state["grid"]["crs_wkt"].upper()
    assert (tmp_path / "ckpt" / "best.pth").exists()
    assert (tmp_path / "out" / "plots" / "loss_curves.png").stat().st_size > 1000
    lines = (tmp_path / "out" / "history.csv").read_text().splitlines()
    assert len(lines) == 3 and "val_skill" in lines[0]
    assert not list((tmp_path / "ckpt").glob("*.partial"))
    described = run_cli("info", tmp_path / "ckpt" / "best.pth")
    assert described.status == 0 and "1 layer(s) of 4 hidden channels" in described.out
    assert "training    epoch 2 of 2; best epoch" in described.out and "spread" not in described.out
    not_a_checkpoint = run_cli("info", tmp_path / "out" / "history.csv")
    assert not_a_checkpoint.status == 2 and "neither a Zarr cube" in one_error_line(not_a_checkpoint.err)
    folder = run_cli("info", tmp_path / "ckpt")
    assert folder.status == 2 and f"runoff info {tmp_path / 'ckpt' / 'best.pth'}" in one_error_line(folder.err)


def test_validation_on_at_most_max_val_windows(small_cube, tmp_path, run_cli):
    """--max_val_windows validates on that many evenly spaced windows: said in the log,
    kept in the checkpoint, and the same training scored on fewer windows scores apart."""
    common = ["--data_dir", small_cube, "--epochs", "1", "--batch_size", "4", "--hidden_channels", "4",
              "--patch", "16"]
    runs = {}
    for name, extra in (("all", []), ("two", ["--max_val_windows", "2"])):
        result = run_cli("train", *common, *extra, "--checkpoint_dir", tmp_path / name, "--output_dir",
                         tmp_path / f"{name}_out")
        assert result.status == 0, result.err
        runs[name] = result.out, torch.load(tmp_path / name / "best.pth", weights_only=True)
    assert "validation on 2 of the" in runs["two"][0] and "validation on" not in runs["all"][0]
    assert runs["two"][1]["train_config"]["max_val_windows"] == 2
    assert runs["two"][1]["model_state"].keys() == runs["all"][1]["model_state"].keys()
    for key, value in runs["all"][1]["model_state"].items():  # the same training
        assert torch.equal(value, runs["two"][1]["model_state"][key]), key
    assert runs["two"][1]["best_val_loss"] != pytest.approx(runs["all"][1]["best_val_loss"])


def test_kill_after_epoch_then_resume_equals_uninterrupted(small_cube, tmp_path):
    full = subprocess.run(_train_cmd(small_cube, tmp_path / "full"), capture_output=True, text=True)
    assert full.returncode == 0, full.stderr
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(small_cube, killed), stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("epoch   2/"):
            break
    deadline = time.monotonic() + 60
    while not (killed / "ckpt" / "model_epoch2.pth").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "ckpt" / "model_epoch4.pth").exists(), "training finished before the kill"
    resumed = subprocess.run(_train_cmd(small_cube, killed, "--resume", str(killed / "ckpt" / "model_epoch2.pth")),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(tmp_path / "full" / "ckpt" / "model_epoch4.pth", weights_only=True)
    b = torch.load(killed / "ckpt" / "model_epoch4.pth", weights_only=True)
    for key in ("model_state", "live_model_state"):  # the weights' moving average, and the optimiser's own
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)
    assert a["ema_steps"] == b["ema_steps"] > 0
    assert a["history"][-1]["val_loss"] == b["history"][-1]["val_loss"]


def test_it_learns_to_beat_persistence(tmp_path):
    """Two years of synthetic runoff, 12 epochs at most: the model must beat persistence."""
    write_series(tmp_path / "in", days=730, height=48, width=64, seed=0)
    result = train(TrainConfig(data_dir=str(tmp_path / "in"), epochs=12, batch_size=8, hidden_channels=[16],
                               patch=32, seed=0, device="cpu", checkpoint_dir=str(tmp_path / "ckpt"),
                               output_dir=str(tmp_path / "out"), patience=4),
                   )
    best = result.history[result.best_epoch - 1]
    assert best["val_skill"] > 0.2, best        # MSE skill in kg m-2 vs persistence (what is optimised)
    assert best["val_mse"] < best["persistence_mse"], best  # MSE in kg m-2 vs persistence


def _bad_train_cases(small_cube: str, tmp_path: Path) -> dict:
    not_cube = tmp_path / "not_cube"
    not_cube.mkdir(exist_ok=True)
    (not_cube / "notes.txt").write_text("x")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    pngs = tmp_path / "pngs"
    if not pngs.exists():
        write_series(pngs, days=3, height=16, width=16, fmt="png")
    return {
        "unknown store": (["--data_dir", tmp_path / "nowhere.zarr"], "no such cube or folder"),
        "not a cube": (["--data_dir", not_cube], "no rasters or NetCDF/HDF5 files"),
        "input_days too long": (["--data_dir", small_cube, "--input_days", "100"], "no complete window"),
        "lead too far": (["--data_dir", small_cube, "--lead", "110"], "no complete window"),
        "corrupt checkpoint": (["--data_dir", small_cube, "--resume", corrupt], "corrupt.pth"),
        "checkpoint dir not writable": (["--data_dir", small_cube, "--checkpoint_dir", blocker / "sub"],
                                        "--checkpoint_dir"),
        "even kernel": (["--data_dir", small_cube, "--kernel_size", "4"], "--kernel_size 4"),
        "bad leads": (["--data_dir", small_cube, "--leads", "one-six"], "--leads"),
        "repeated lead": (["--data_dir", small_cube, "--leads", "1-3,2"], "--leads [1, 2, 3, 2]: lead times must increase"),
        "fp16 on cpu": (["--data_dir", small_cube, "--device", "cpu", "--precision", "fp16"], "needs a CUDA device"),
        "linear response without delta": (["--data_dir", small_cube, "--linear_response", "--no-predict_delta"],
                                          "--no-predict_delta"),
        "quantile location without quantiles": (["--data_dir", small_cube, "--quantile_location"], "--probabilistic"),
        "calibration without quantiles": (["--data_dir", small_cube, "--calibration", "brier"], "--probabilistic"),
        "level calibration without quantiles": (["--data_dir", small_cube, "--calibrate_levels"], "--probabilistic"),
        "location calibration without quantiles": (["--data_dir", small_cube, "--calibrate_location"],
                                                   "--probabilistic"),
        "location calibration of centred quantiles": (["--data_dir", small_cube, "--probabilistic",
                                                        "--no-quantile_location", "--calibrate_location"],
                                                       "--calibrate_location"),
        "unknown calibration": (["--data_dir", small_cube, "--probabilistic", "--calibration", "crps"],
                                "--calibration"),
        "ema decay of 1": (["--data_dir", small_cube, "--ema_decay", "1"], "--ema_decay 1.0"),
        "log weight without quantiles": (["--data_dir", small_cube, "--quantile_log_weight", "0.3"],
                                         "--probabilistic"),
        "negative log weight": (["--data_dir", small_cube, "--probabilistic", "--quantile_log_weight", "-1"],
                                "--quantile_log_weight -1.0"),
        "negative weight decay": (["--data_dir", small_cube, "--weight_decay", "-1"], "--weight_decay -1.0"),
        "negative seed": (["--data_dir", small_cube, "--seed", "-1"], "--seed -1"),
        "no training windows": (["--data_dir", small_cube, "--max_train_windows", "0"], "--max_train_windows 0"),
        "no validation windows": (["--data_dir", small_cube, "--max_val_windows", "0"], "--max_val_windows 0"),
        "png folder without a crs": (["--data_dir", pngs], "pass --crs (e.g. --crs EPSG:4326) (an option of runoff "
                                                         f"ingest: run `runoff ingest {pngs} stores/pngs.zarr` with it"),
    }


@pytest.mark.parametrize("case", ["unknown store", "not a cube", "input_days too long", "lead too far",
                                  "corrupt checkpoint", "checkpoint dir not writable", "even kernel", "bad leads", "repeated lead",
                                  "fp16 on cpu", "linear response without delta",
                                  "quantile location without quantiles", "calibration without quantiles",
                                  "level calibration without quantiles", "unknown calibration", "ema decay of 1",
                                  "log weight without quantiles", "negative log weight", "negative weight decay",
                                  "negative seed", "no training windows", "no validation windows",
                                  "png folder without a crs"])
def test_bad_input_is_one_line_exit_2(case, small_cube, tmp_path, run_cli):
    args, words = _bad_train_cases(small_cube, tmp_path)[case]
    result = run_cli("train", "--epochs", "1", "--checkpoint_dir", tmp_path / "ckpt", "--output_dir",
                     tmp_path / "out", *args) if "--checkpoint_dir" not in args else \
        run_cli("train", "--epochs", "1", "--output_dir", tmp_path / "out", *args)
    assert result.status == 2
    assert words in one_error_line(result.err)
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "out").exists()  # not even an empty folder


def test_resume_refuses_another_grid_or_shape_and_keeps_checkpoints(small_cube, tmp_path, run_cli):
    ckpt = tmp_path / "ckpt"
    common = ["--epochs", "1", "--batch_size", "4", "--hidden_channels", "4", "--patch", "16",
              "--checkpoint_dir", ckpt, "--output_dir", tmp_path / "out"]
    assert run_cli("train", "--data_dir", small_cube, *common).status == 0
    before = tree_digest(ckpt)
    other = tmp_path / "other"
    write_series(other, days=60, height=20, width=20, seed=1)
    result = run_cli("train", "--data_dir", other, *common, "--epochs", "2", "--resume", ckpt / "model_epoch1.pth")
    assert result.status == 2 and "grid" in one_error_line(result.err)
    result = run_cli("train", "--data_dir", small_cube, *common, "--epochs", "2", "--hidden_channels", "8",
                     "--resume", ckpt / "model_epoch1.pth")
    assert result.status == 2 and "hidden_channels" in one_error_line(result.err)
    assert tree_digest(ckpt) == before
    assert load_checkpoint(ckpt / "best.pth")["epoch"] == 1


def test_resuming_a_finished_run_elsewhere_names_its_best_checkpoint(small_cube, tmp_path, run_cli):
    common = ["--data_dir", small_cube, "--epochs", "1", "--batch_size", "4", "--hidden_channels", "4",
              "--patch", "16", "--output_dir", tmp_path / "out"]
    assert run_cli("train", *common, "--checkpoint_dir", tmp_path / "ckpt").status == 0
    result = run_cli("train", *common, "--checkpoint_dir", tmp_path / "again",
                     "--resume", tmp_path / "ckpt" / "last.pth")
    assert result.status == 0, result.err
    assert "nothing to do" in result.out
    assert result.out.rstrip().endswith(str(tmp_path / "ckpt" / "best.pth"))


def test_a_fresh_run_refuses_a_folder_holding_another_run_and_resume_continues_it(small_cube, tmp_path, run_cli):
    common = ["--data_dir", small_cube, "--batch_size", "4", "--hidden_channels", "4", "--patch", "16",
              "--output_dir", tmp_path / "out", "--checkpoint_dir", tmp_path / "ckpt"]
    assert run_cli("train", *common, "--epochs", "1").status == 0
    before = tree_digest(tmp_path / "ckpt")
    again = run_cli("train", *common, "--epochs", "2", "--lr", "0.01")
    assert again.status == 2 and "--resume" in one_error_line(again.err)
    assert tree_digest(tmp_path / "ckpt") == before
    resumed = run_cli("train", *common, "--epochs", "2", "--resume", tmp_path / "ckpt" / "last.pth")
    assert resumed.status == 0, resumed.err
    assert load_checkpoint(tmp_path / "ckpt" / "last.pth")["epoch"] == 2


def test_bf16_mixed_precision_path_trains_on_cpu(small_cube, tmp_path):
    """The autocast path CUDA takes (bf16), exercised on CPU: the loss is finite, the
    weights stay fp32, and the checkpoint records the precision."""
    from pipeline.device import autocast_dtype, pick_device

    assert autocast_dtype(pick_device("cpu"), "auto") is None  # plain fp32 on CPU unless asked
    result = train(TrainConfig(data_dir=small_cube, epochs=1, batch_size=4, hidden_channels=[4], patch=16,
                               device="cpu", precision="bf16", checkpoint_dir=str(tmp_path / "ckpt"),
                               output_dir=str(tmp_path / "out")))
    assert torch.isfinite(torch.tensor(result.history[0]["train_loss"]))
    state = load_checkpoint(result.best_checkpoint)
    assert state["train_config"]["precision"] == "bf16"
    assert all(t.dtype == torch.float32 for t in state["model_state"].values() if t.is_floating_point())


def test_prefetched_batches_keep_their_order_and_bound_and_errors_reach_the_step():
    assert list(prefetched(range(50))) == list(range(50))
    made = []

    def batches():
        for i in range(20):
            made.append(i)
            yield i

    ahead = prefetched(batches(), depth=2)
    assert next(ahead) == 0
    time.sleep(0.3)
    assert len(made) == 4  # the one taken, two queued, one waiting for room
    ahead.close()
    assert not [t for t in threading.enumerate() if t.name == "runoff-prefetch"]

    def broken():
        yield 1
        raise OSError("block 3: truncated chunk")

    with pytest.raises(OSError, match="truncated chunk"):
        list(prefetched(broken()))


def test_accelerator_steps_take_the_loaders_own_batches_from_a_thread(small_cube):
    ds = open_cube(small_cube)
    dates = cube_dates(ds)
    spec = WindowSpec(6, (1,), ("qs",))
    split = make_splits(dates[0], dates[-1])["train"]
    sampler = WindowSampler(small_cube, window_issues(ds, split, spec), spec, {}, patch=16, shuffle=True)
    sampler.fit_stats(split)
    loader = DataLoader(sampler, batch_size=4)
    on_cpu = loader_batches(loader, torch.device("cpu"))
    assert not inspect.isgenerator(on_cpu) and queue_marker(torch.device("cpu")) is None
    accelerator = torch.device("meta")  # any device but the CPU takes the prefetching path
    threaded = loader_batches(loader, accelerator)
    assert inspect.isgenerator(threaded)
    pairs = list(zip(on_cpu, threaded, strict=True))
    assert len(pairs) == -(-len(sampler) // 4) > 5
    assert all(torch.equal(a, b) for one, other in pairs for a, b in zip(one, other))


def test_training_with_worker_processes(small_cube, tmp_path):
    """Loader workers (spawned, kept across epochs) cut and collate the batches: each epoch
    trains on every training window once, as the in-process run does; they exit when
    training returns (left to interpreter exit, they are killed and leak semaphores)."""
    seen, children = {}, set(multiprocessing.active_children())
    for workers in (0, 2):
        ckpt = tmp_path / f"ckpt{workers}"
        result = train(TrainConfig(data_dir=small_cube, epochs=2, batch_size=4, hidden_channels=[4], patch=16,
                                   device="cpu", num_workers=workers, seed=7, checkpoint_dir=str(ckpt),
                                   output_dir=str(tmp_path / f"out{workers}")))
        assert all(torch.isfinite(torch.tensor(epoch["train_loss"])) for epoch in result.history)
        assert set(multiprocessing.active_children()) <= children
        ranks = [load_checkpoint(ckpt / f"model_epoch{e}.pth")["epoch_windows"] for e in (1, 2)]
        seen[workers] = [sorted(t for rank in windows for t in rank) for windows in ranks]
    assert seen[2] == seen[0] and len(seen[0][0]) > 10


def test_a_checkpoint_from_before_the_linear_response_resumes_as_it_was_trained(small_cube, tmp_path):
    """Checkpoints written before ``linear_response`` existed formed the change in log space,
    and those before ``ema_decay`` did not average; resuming one keeps that model, not the
    new defaults."""
    common = dict(data_dir=small_cube, batch_size=4, hidden_channels=[4], patch=16, device="cpu",
                  checkpoint_dir=str(tmp_path / "ckpt"), output_dir=str(tmp_path / "out"))
    first = train(TrainConfig(epochs=1, linear_response=False, **common))
    state = load_checkpoint(first.last_checkpoint)
    for config in (state["train_config"], state["model_config"]):
        del config["linear_response"]
    del state["model_config"]["stats"]
    state["model_state"] = state.pop("live_model_state")  # nor did they average the weights
    del state["train_config"]["ema_decay"], state["ema_steps"]
    torch.save(state, tmp_path / "old.pth")
    resumed = train(TrainConfig(epochs=2, resume=str(tmp_path / "old.pth"), **common), explicit={"epochs"})
    assert resumed.epochs_run == 2
    again = load_checkpoint(resumed.last_checkpoint)
    assert again["model_config"]["linear_response"] is False
    assert again["train_config"]["ema_decay"] == 0.0 and "live_model_state" not in again


def test_forecasts_use_the_moving_average_and_it_leaves_the_optimiser_alone(small_cube, tmp_path):
    """``model_state`` (what predict and evaluate load, and what validation scores) is the
    moving average of the weights; the optimiser's own weights follow the same path as
    without averaging, and ``--ema_decay 0`` keeps the last step's weights alone."""
    common = dict(data_dir=small_cube, epochs=2, batch_size=4, hidden_channels=[4], patch=16, device="cpu", seed=5)
    plain = train(TrainConfig(ema_decay=0.0, checkpoint_dir=str(tmp_path / "plain"), output_dir=str(tmp_path / "o1"),
                              **common))
    averaged = train(TrainConfig(ema_decay=0.9, checkpoint_dir=str(tmp_path / "ema"), output_dir=str(tmp_path / "o2"),
                                 **common))
    p, a = load_checkpoint(plain.last_checkpoint), load_checkpoint(averaged.last_checkpoint)
    assert "live_model_state" not in p and "ema_steps" not in p
    for name, tensor in p["model_state"].items():
        assert torch.equal(a["live_model_state"][name], tensor), name
    moved = [name for name, tensor in a["model_state"].items() if not torch.equal(tensor, a["live_model_state"][name])]
    windows = sum(len(rank) for rank in a["epoch_windows"])
    assert moved and a["ema_steps"] == 2 * math.ceil(windows / 4)  # one update per optimiser step
    assert p["history"][-1]["train_loss"] == a["history"][-1]["train_loss"]
    assert p["history"][-1]["val_loss"] != a["history"][-1]["val_loss"]  # scored with the averaged weights
