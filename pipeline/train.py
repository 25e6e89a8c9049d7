"""Train a ConvLSTM on a cube: masked MSE, AdamW, ReduceLROnPlateau, early stopping,
gradient clipping, mixed precision on CUDA, atomic checkpoints, exact resume, and
data-parallel training under ``torchrun`` (DistributedDataParallel).

The checkpoint carries everything needed to reproduce or use the run (the
neuralhydrology habit): model weights and hyper-parameters, optimiser and scheduler
state, epoch, early-stopping state, RNG state, normalisation statistics, input
length, leads, variables, splits, the grid and the package version.

Example
-------
>>> result = train(TrainConfig(data_dir="stores/qs.zarr", epochs=5))     # doctest: +SKIP
>>> result.best_checkpoint                                                # doctest: +SKIP
PosixPath('checkpoints/best.pth')
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import math
import os
import queue
import sys
import threading
import time
import zipfile
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from . import __version__
from .cube import TARGET, Split, cube_dates, cube_grid, make_splits, open_cube
from .errors import RunoffError
from .export import atomic_output, location
from .ingest import ensure_cube
from .model import ConvLSTMForecaster
from .plots import plot_loss_curves
from .rasters import Grid
from .sampler import WindowSampler, WindowSpec, check_windows, collate_windows, window_issues

CHECKPOINT_FORMAT = "runoff-checkpoint/1"
# Settings that fix the model's shape or its data: a resumed run must not change them.
_FROZEN_ON_RESUME = ("hidden_channels", "kernel_size", "num_layers", "input_days", "leads", "covariates",
                     "predict_delta")


@dataclass
class TrainConfig:
    """Every setting of a training run; saved in each checkpoint."""

    data_dir: str = "stores/qs.zarr"
    epochs: int = 50
    batch_size: int = 8
    hidden_channels: list[int] = field(default_factory=lambda: [16])
    kernel_size: int = 3
    num_layers: int = 1
    input_days: int = 6
    leads: list[int] = field(default_factory=lambda: [1])
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 8
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    checkpoint_dir: str = "checkpoints"
    output_dir: str = "outputs"
    resume: str | None = None
    patch: int = 64
    train_end: str | None = None
    val_end: str | None = None
    covariates: list[str] = field(default_factory=list)
    predict_delta: bool = False
    clip_grad: float = 1.0
    precision: str = "auto"  # auto (bf16 on CUDA where supported), fp32, bf16, fp16
    max_train_windows: int | None = None
    storage_options: dict | None = None


@dataclass
class TrainResult:
    """What a finished run produced."""

    epochs_run: int
    best_epoch: int
    best_val_loss: float
    best_checkpoint: Path
    last_checkpoint: Path
    history: list[dict]


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA if present, else Apple MPS, else CPU; named devices are checked."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise RunoffError(f"--device {name!r}: choose auto, cpu, cuda or mps")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RunoffError(f"--device {name}: PyTorch sees no CUDA GPU here; use --device auto or cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise RunoffError("--device mps: Apple MPS is not available here; use --device auto or cpu")
    return torch.device(name)


@dataclass(frozen=True)
class Ranks:
    """This process's place in a data-parallel run (``rank 0 of 1`` when not under torchrun)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Only the main rank writes checkpoints, history, plots and log lines."""
        return self.rank == 0

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum ``values`` over the ranks (in place, returned)."""
        if self.world_size > 1:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def gather(self, value):
        """Every rank's ``value``, in rank order (a one-item list when not distributed)."""
        if self.world_size == 1:
            return [value]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered


@contextlib.contextmanager
def data_parallel(device_name: str = "auto") -> Iterator[Ranks]:
    """The process group of a ``torchrun`` launch (gloo on CPU, nccl on CUDA), torn down
    on exit; outside torchrun, one rank on :func:`pick_device`."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if world_size == 1:
        yield Ranks(0, 1, device)
        return
    if device.type == "mps":
        raise RunoffError("--device mps: data-parallel training runs on cpu or cuda; pass --device cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield Ranks(dist.get_rank(), dist.get_world_size(), device)
    finally:
        dist.destroy_process_group()


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed blocks for reuse instead of unmapping them (Linux only).

    A CPU training step allocates and frees the same large activation buffers each time;
    by default glibc hands blocks over 32 MB back to the kernel and every step then pays
    for zeroed page faults: measured 2.4x slower steps at 8x256x256 px (PyTorch's CPU
    tuning guide suggests jemalloc/tcmalloc for the same reason). Returns whether it applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl and other libcs: leave them alone
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, (1 << 31) - 1))


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the valid pixels only (sea and nodata do not count)."""
    mask = mask.to(pred.dtype)
    return ((pred - target) ** 2 * mask).sum() / mask.sum().clamp(min=1.0)


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """``torch.save`` to a temporary file, then rename: a kill never leaves half a checkpoint."""
    with atomic_output(path) as tmp:
        torch.save(state, tmp)
    return location(path)


def load_checkpoint(path: str | Path, option: str = "--weights_path", storage_options: dict | None = None) -> dict:
    """Load a checkpoint (a path or URL) with ``weights_only=True``; one clear error for anything else."""
    path = location(path, storage_options)
    if not path.is_file():
        raise RunoffError(f"{option} {path}: no such file")
    try:
        with path.open("rb") as f:
            state = torch.load(f, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunoffError(f"{option} {path}: not a readable PyTorch checkpoint ({first[:120]})") from None
    except Exception as exc:  # the unpickler's own errors vary by torch version
        raise RunoffError(f"{option} {path}: not a runoff checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise RunoffError(f"{option} {path}: a PyTorch file, but not a runoff checkpoint")
    return state


def checkpoint_grid(state: dict) -> Grid:
    g = state["grid"]
    return Grid(g["crs_wkt"], tuple(g["transform"]), g["height"], g["width"])


def check_checkpoint_grid(state: dict, grid: Grid, checkpoint: str, data: str) -> None:
    """One clear error when ``data`` (an option and its value) is not on the checkpoint's grid."""
    trained = checkpoint_grid(state)
    if not trained.matches(grid):
        raise RunoffError(f"{checkpoint}: trained on grid {trained.describe()}, but {data} is on {grid.describe()}")


def checkpoint_splits(state: dict) -> dict[str, Split]:
    """The train / val / test date ranges a checkpoint was trained with."""
    return {name: Split(name, *(dt.date.fromisoformat(d) for d in ends)) for name, ends in state["splits"].items()}


def _grid_dict(grid: Grid) -> dict:
    return {"crs_wkt": grid.crs_wkt, "transform": list(grid.transform), "height": grid.height,
            "width": grid.width}


def build_model(state_or_config: dict) -> ConvLSTMForecaster:
    """The model of a checkpoint (weights loaded) or of a model-config dict (fresh)."""
    if "model_config" in state_or_config:
        model = ConvLSTMForecaster.from_config(state_or_config["model_config"])
        model.load_state_dict(state_or_config["model_state"])
        return model
    return ConvLSTMForecaster.from_config(state_or_config)


def check_writable(folder: Path, option: str) -> None:
    """One clear error, before any work, when ``folder`` (a path or URL) cannot take files."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except Exception as exc:  # OSError locally; object stores raise their clients' own errors
        why = getattr(exc, "strerror", None) or str(exc).splitlines()[0][:160] or type(exc).__name__
        raise RunoffError(f"{option} {folder}: cannot write there ({why})") from None


def _merge_resume(config: TrainConfig, explicit: set[str], state: dict) -> TrainConfig:
    """Settings of a resumed run: the checkpoint's, except what the user set explicitly
    (and that may change); shape and data settings must match."""
    saved = state["train_config"]
    for key in _FROZEN_ON_RESUME:
        if key in explicit and getattr(config, key) != saved[key]:
            raise RunoffError(f"--resume {config.resume}: the checkpoint has {key}={saved[key]}, "
                              f"but --{key} {getattr(config, key)} was asked; drop the option to continue that run")
    merged = dict(saved)
    for key in explicit:
        merged[key] = getattr(config, key)
    merged["resume"] = config.resume
    return TrainConfig(**merged)


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
Batch = TypeVar("Batch")


class _Failed(NamedTuple):
    error: BaseException


def prefetched(batches: Iterable[Batch], depth: int = 2) -> Iterator[Batch]:
    """Yield ``batches`` while a background thread prepares up to ``depth`` more.

    Cutting windows, collating and pinning release the GIL for their copies, so they
    overlap the step the main thread is launching on the accelerator. An error in the
    thread is raised here; closing the generator early stops the thread.

    >>> list(prefetched(range(5)))
    [0, 1, 2, 3, 4]
    """
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop, end = threading.Event(), object()

    def offer(item: object) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def fill() -> None:
        try:
            for batch in batches:
                if not offer(batch):
                    return
        except BaseException as error:  # re-raised in the consuming thread
            offer(_Failed(error))
            return
        offer(end)

    thread = threading.Thread(target=fill, name="runoff-prefetch", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not end:
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()


def queue_marker(device: torch.device) -> torch.cuda.Event | None:
    """An event behind the work queued on ``device`` so far (CUDA), else None.

    A CUDA step returns once its kernels are queued, so the training thread may wait
    for a batch while the GPU is still busy: that wait costs nothing. The data-wait
    share counts a wait only when this event has completed by its end (the GPU ran
    dry), which ``query`` tells without a host synchronisation. Elsewhere every wait counts.
    """
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event


def loader_batches(loader: DataLoader, device: torch.device) -> Iterator:
    """The batches of ``loader`` for a step on ``device``: prepared in a background thread
    on an accelerator when the loader has no worker processes (on an H200, cutting and
    pinning the next batch in the training thread left the GPU idle for 70% of each step).
    On the CPU the step itself uses every core, so batches are cut in turn."""
    if device.type == "cpu" or loader.num_workers > 0:
        return iter(loader)
    return prefetched(loader)


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``, or None for plain fp32.

    ``auto``: bf16 on CUDA GPUs that support it, fp16 on older ones, fp32 elsewhere.
    bf16 also runs on CPU (for tests and for CPUs with bf16 units); fp16 only on CUDA.
    """
    if precision not in PRECISIONS:
        raise RunoffError(f"--precision {precision!r}: choose {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp16" and device.type != "cuda":
        raise RunoffError(f"--precision fp16: needs a CUDA device (this run is on {device.type}); use bf16 or fp32")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast_for(device: torch.device, precision: str = "auto"):
    """Mixed-precision context for forward passes (see :func:`autocast_dtype`)."""
    dtype = autocast_dtype(device, precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def grad_scaler(device: torch.device, precision: str = "auto") -> torch.amp.GradScaler:
    """The loss scaler of a run: active for fp16 autocast only (bf16 has fp32's range)."""
    return torch.amp.GradScaler("cuda", enabled=autocast_dtype(device, precision) == torch.float16)


def train_step(net: torch.nn.Module, optimiser: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, precision: str = "auto",
               clip_grad: float = 1.0) -> torch.Tensor:
    """One optimisation step on a batch already on the model's device: forward under
    autocast, masked MSE, backward, gradient clipping, optimiser step. Returns the detached
    loss, still on the device (reading it would synchronise)."""
    optimiser.zero_grad(set_to_none=True)
    with autocast_for(x.device, precision):
        pred = net(x)
    loss = masked_mse(pred.float(), y, mask)
    scaler.scale(loss).backward()
    scaler.unscale_(optimiser)
    torch.nn.utils.clip_grad_norm_(net.parameters(), clip_grad)
    scaler.step(optimiser)
    scaler.update()
    return loss.detach()


def evaluate_loader(model: ConvLSTMForecaster, loader: DataLoader, device: torch.device,
                    stats: dict[str, float], ranks: Ranks = Ranks(), precision: str = "auto") -> dict[str, float]:
    """Validation loss and skill against persistence, in normalised space (the loss) and as
    MSE in physical units: skill = 1 - MSE_model / MSE_persistence. Under data-parallel
    training each rank scores its shard and the sums are combined."""
    model.eval()
    # loss, count, persistence loss (normalised); sse model, sse persistence (physical units)
    sums = torch.zeros(5, dtype=torch.float64, device=device)
    phys = lambda v: torch.expm1(v * stats["std"] + stats["mean"]).clamp(min=0)  # noqa: E731
    with torch.no_grad():
        for x, y, mask, _ in loader_batches(loader, device):
            x, y, mask = (t.to(device, non_blocking=True) for t in (x, y, mask))
            with autocast_for(device, precision):
                pred = model(x)
            pred = pred.float()
            m = mask.float()
            last = x[:, -1:, :1].expand_as(y)
            sums[0] += (((pred - y) ** 2) * m).sum().double()
            sums[1] += m.sum().double()
            sums[2] += (((last - y) ** 2) * m).sum().double()
            truth = phys(y)
            sums[3] += (((phys(pred) - truth) ** 2) * m).sum().double()
            sums[4] += (((phys(last) - truth) ** 2) * m).sum().double()
    loss, count, loss_p, sse, sse_p = ranks.sum(sums).tolist()
    count = max(count, 1.0)
    return {"val_loss": loss / count, "val_skill": 1.0 - loss / loss_p if loss_p > 0 else float("nan"),
            "val_mse": sse / count, "persistence_mse": sse_p / count,
            "val_mse_skill": 1.0 - sse / sse_p if sse_p > 0 else float("nan")}


def _write_history(history: list[dict], output_dir: Path) -> None:
    with atomic_output(output_dir / "history.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    plot_loss_curves(history, output_dir / "plots" / "loss_curves.png")


def train(config: TrainConfig, explicit: set[str] | None = None, progress: bool = False) -> TrainResult:
    """Run (or resume) training; see :class:`TrainConfig`. ``explicit`` names the settings
    the user gave on the command line (they override a resumed checkpoint's).

    Under ``torchrun --nproc_per_node N -m pipeline.train ...`` each rank trains a
    DistributedDataParallel replica on its own disjoint share of the windows; only rank 0
    writes checkpoints, history, plots and log lines.
    """
    resume_state = None
    if config.resume:
        resume_state = load_checkpoint(config.resume, "--resume", config.storage_options)
        config = _merge_resume(config, explicit if explicit is not None else set(), resume_state)
    _validate(config)
    with data_parallel(config.device) as ranks, contextlib.ExitStack() as on_exit:
        return _train(config, resume_state, ranks, progress, on_exit)


@contextlib.contextmanager
def data_loader(dataset: torch.utils.data.Dataset, **kwargs) -> Iterator[DataLoader]:
    """A :class:`~torch.utils.data.DataLoader` whose worker processes are shut down when the
    block exits.

    Persistent workers otherwise live until the loader's iterator is garbage-collected, which
    a reference cycle can put off to interpreter exit; DataLoader skips its own shutdown then,
    and the workers are killed, leaking their semaphores (numcodecs' Blosc lock) with a
    warning. PyTorch has no public call for this, hence the private ``_shutdown_workers``.
    """
    loader = DataLoader(dataset, **kwargs)
    try:
        yield loader
    finally:
        if loader._iterator is not None:
            loader._iterator._shutdown_workers()
            loader._iterator = None


def _train(config: TrainConfig, resume_state: dict | None, ranks: Ranks, progress: bool,
           on_exit: contextlib.ExitStack) -> TrainResult:
    if ranks.device.type == "cpu":
        keep_freed_memory()
    checkpoint_dir = location(config.checkpoint_dir, config.storage_options)
    output_dir = location(config.output_dir, config.storage_options)
    device = ranks.device
    outcome = None
    if ranks.is_main:  # rank 0 checks the outputs and ingests a raster folder once; the others wait
        try:
            check_writable(checkpoint_dir, "--checkpoint_dir")
            check_writable(output_dir, "--output_dir")
            outcome = ("ok", ensure_cube(config.data_dir, storage_options=config.storage_options, progress=progress))
        except RunoffError as exc:
            outcome = ("error", str(exc))
    kind, store = ranks.gather(outcome)[0]
    if kind == "error":  # every rank stops with rank 0's message
        raise RunoffError(store)
    log = print if ranks.is_main else (lambda *args, **kwargs: None)
    progress = progress and ranks.is_main
    ds = open_cube(store, config.storage_options)
    grid = cube_grid(ds)
    variables = [TARGET] + [c for c in config.covariates if c != TARGET]
    unknown = [v for v in variables if v not in ds.data_vars]
    if unknown:
        raise RunoffError(f"--covariates {','.join(unknown)}: not in the cube {store} "
                          f"(it has {', '.join(ds.data_vars)})")
    dates = cube_dates(ds)
    splits = make_splits(dates[0], dates[-1], config.train_end, config.val_end)
    spec = WindowSpec(config.input_days, tuple(config.leads), tuple(variables))
    issues = {name: window_issues(ds, split, spec) for name, split in splits.items()}
    for name in ("train", "val"):
        check_windows(issues[name], splits[name], spec, len(dates))

    train_issues = issues["train"]
    if config.max_train_windows:
        train_issues = train_issues[:: max(1, len(train_issues) // config.max_train_windows)]
    if resume_state is not None:
        check_checkpoint_grid(resume_state, grid, f"--resume {config.resume}", str(store))
    train_set = WindowSampler(store, train_issues, spec, resume_state["norm_stats"] if resume_state is not None else {},
                              patch=config.patch, shuffle=True, seed=config.seed,
                              storage_options=config.storage_options)
    # a new run's statistics come from the read its first epoch needs anyway, where the cube allows
    stats = train_set.stats if resume_state is not None else train_set.fit_stats(splits["train"])

    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model = ConvLSTMForecaster(len(variables), config.hidden_channels, config.kernel_size, config.num_layers,
                               leads=len(config.leads), predict_delta=config.predict_delta).to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimiser, factor=0.5,
                                                           patience=max(1, config.patience // 3))
    scaler = grad_scaler(device, config.precision)
    start_epoch, best_val, best_epoch, bad_epochs, history = 0, math.inf, 0, 0, []
    if resume_state is not None:
        model.load_state_dict(resume_state["model_state"])
        optimiser.load_state_dict(resume_state["optimizer_state"])
        scheduler.load_state_dict(resume_state["scheduler_state"])
        torch.set_rng_state(resume_state["rng_state"])
        start_epoch = resume_state["epoch"]
        best_val, best_epoch = resume_state["best_val_loss"], resume_state["best_epoch"]
        bad_epochs, history = resume_state["bad_epochs"], list(resume_state["history"])
    net = model
    if ranks.world_size > 1:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    val_set = WindowSampler(store, issues["val"], spec, stats, patch=None, shuffle=False,
                            storage_options=config.storage_options)
    for sampler in (train_set, val_set):
        sampler.shard(ranks.rank, ranks.world_size)
    pin = device.type == "cuda"
    # workers persist across epochs (no process start-up per epoch, each keeps its decoded
    # block); in-process batches are stacked straight into pinned memory, and workers' batches
    # are pinned by the loader in this process
    loader_kw = dict(num_workers=config.num_workers, pin_memory=pin and config.num_workers > 0,
                     collate_fn=partial(collate_windows, pin_memory=pin and config.num_workers == 0),
                     persistent_workers=config.num_workers > 0,
                     multiprocessing_context="spawn" if config.num_workers else None)
    train_loader, val_loader = (on_exit.enter_context(data_loader(dataset, batch_size=config.batch_size, **loader_kw))
                                for dataset in (train_set, val_set))

    base_state = {
        "format": CHECKPOINT_FORMAT, "package_version": __version__,
        "model_config": model.config.to_dict(), "norm_stats": stats,
        "input_days": config.input_days, "leads": list(config.leads), "variables": variables,
        "grid": _grid_dict(grid), "data": str(store),
        "splits": {name: [s.start.isoformat(), s.end.isoformat()] for name, s in splits.items()},
        "train_config": asdict(config), "world_size": ranks.world_size,
    }
    epoch = start_epoch
    last_path = location(config.resume, config.storage_options) if config.resume else checkpoint_dir / f"model_epoch{epoch}.pth"
    if resume_state is not None and (start_epoch >= config.epochs or bad_epochs >= config.patience):
        why = "stopped early" if bad_epochs >= config.patience else f"reached --epochs {config.epochs}"
        log(f"{config.resume}: this run already {why} at epoch {start_epoch}; nothing to do "
            f"(raise --epochs to train on)")
        return TrainResult(0, best_epoch, best_val, checkpoint_dir / "best.pth", last_path, history)
    from tqdm import tqdm

    for epoch in range(start_epoch + 1, config.epochs + 1):
        if bad_epochs >= config.patience:
            break
        train_set.set_epoch(epoch)
        model.train()
        started, waited_s = time.perf_counter(), 0.0  # seconds spent waiting for the next batch
        # loss sum, steps, samples, seconds waiting for data: summed over ranks at the epoch's end
        totals = torch.zeros(4, dtype=torch.float64, device=device)
        seen: list[torch.Tensor] = []
        bar = tqdm(total=len(train_set), unit="win", desc=f"epoch {epoch}/{config.epochs}",
                   disable=not progress, leave=False)
        batches = loader_batches(train_loader, device)
        # Join: ranks whose share holds fewer batches shadow the others' all-reduces
        with Join([net]) if ranks.world_size > 1 else contextlib.nullcontext():
            while True:
                waited, queued = time.perf_counter(), queue_marker(device)
                try:
                    x, y, mask, issue = next(batches)
                except StopIteration:
                    break
                if queued is None or queued.query():  # the device had run out of work: it waited too
                    waited_s += time.perf_counter() - waited
                x, y, mask = (t.to(device, non_blocking=True) for t in (x, y, mask))
                loss = train_step(net, optimiser, scaler, x, y, mask, config.precision, config.clip_grad)
                totals[0] += loss
                totals[1] += 1
                totals[2] += x.shape[0]
                seen.append(issue)
                bar.update(x.shape[0])
        bar.close()
        totals[3] += waited_s
        loss_sum, steps, samples, wait = ranks.sum(totals).tolist()  # also waits for the queued steps
        elapsed = time.perf_counter() - started
        data_wait = wait / ranks.world_size / elapsed if elapsed > 0 else 0.0
        windows = ranks.gather(torch.cat(seen).tolist() if seen else [])
        val = evaluate_loader(model, val_loader, device, stats[TARGET], ranks, config.precision)
        train_loss = loss_sum / max(steps, 1)
        scheduler.step(val["val_loss"])
        lr = optimiser.param_groups[0]["lr"]
        improved = val["val_loss"] < best_val
        if improved:
            best_val, best_epoch, bad_epochs = val["val_loss"], epoch, 0
        else:
            bad_epochs += 1
        history.append({"epoch": epoch, "train_loss": train_loss, **val, "lr": lr,
                        "samples_per_s": samples / elapsed if elapsed > 0 else 0.0, "data_wait": data_wait})
        log(f"epoch {epoch:3d}/{config.epochs}  train {train_loss:.4f}  val {val['val_loss']:.4f}  "
            f"skill vs persistence {val['val_skill']:+.3f} (MSE in kg m-2: {val['val_mse_skill']:+.3f})  "
            f"lr {lr:.1e}  "
            f"{samples / elapsed:6.1f} samples/s  data wait {data_wait:5.1%}" + ("  *" if improved else ""),
            flush=True)
        last_path = checkpoint_dir / f"model_epoch{epoch}.pth"
        if ranks.is_main:
            state = {**base_state, "model_state": model.state_dict(), "optimizer_state": optimiser.state_dict(),
                     "scheduler_state": scheduler.state_dict(), "epoch": epoch, "best_val_loss": best_val,
                     "best_epoch": best_epoch, "bad_epochs": bad_epochs, "history": history,
                     "rng_state": torch.get_rng_state(), "epoch_windows": windows}
            save_checkpoint(state, last_path)
            save_checkpoint(state, checkpoint_dir / "last.pth")  # what --resume continues from
            if improved:
                save_checkpoint(state, checkpoint_dir / "best.pth")
            _write_history(history, output_dir)
    if bad_epochs >= config.patience and epoch < config.epochs and ranks.is_main:
        print(f"early stopping: no validation improvement for {config.patience} epochs "
              f"(best epoch {best_epoch})", file=sys.stderr)
    return TrainResult(len(history), best_epoch, best_val, checkpoint_dir / "best.pth", last_path, history)


def _validate(config: TrainConfig) -> None:
    """One clear error per impossible setting; expands one hidden size to every layer."""
    checks = [
        (config.epochs >= 1, "--epochs", config.epochs, "must be >= 1"),
        (config.batch_size >= 1, "--batch_size", config.batch_size, "must be >= 1"),
        (config.input_days >= 1, "--input_days", config.input_days, "must be >= 1"),
        (bool(config.leads) and min(config.leads) >= 1, "--leads", config.leads, "lead times must be >= 1 day"),
        (config.kernel_size % 2 == 1 and config.kernel_size >= 1, "--kernel_size", config.kernel_size,
         "must be odd (1, 3, 5...)"),
        (bool(config.hidden_channels) and min(config.hidden_channels) >= 1, "--hidden_channels",
         config.hidden_channels, "must be >= 1"),
        (config.num_layers >= 1, "--num_layers", config.num_layers, "must be >= 1"),
        (config.lr > 0, "--lr", config.lr, "must be > 0"),
        (config.patience >= 1, "--patience", config.patience, "must be >= 1"),
        (config.patch >= 4, "--patch", config.patch, "must be >= 4 pixels"),
        (config.num_workers >= 0, "--num_workers", config.num_workers, "must be >= 0"),
    ]
    for ok, option, value, why in checks:
        if not ok:
            raise RunoffError(f"{option} {value}: {why}")
    if len(config.hidden_channels) == 1:
        config.hidden_channels = config.hidden_channels * config.num_layers
    elif config.num_layers not in (1, len(config.hidden_channels)):
        raise RunoffError(f"--hidden_channels {config.hidden_channels}: give one size or one per layer "
                          f"(--num_layers {config.num_layers})")
    config.num_layers = len(config.hidden_channels)


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.train ...`` is ``runoff train ...``."""
    from .cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
