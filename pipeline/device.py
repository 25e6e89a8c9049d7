"""Where and how the model runs: device choice, mixed precision (autocast and the loss
scaler), the CPU allocator setting, and the background thread that prepares batches for an
accelerator. Training and inference both use it; it knows nothing of cubes or checkpoints.

>>> pick_device("cpu")
device(type='cpu')
>>> autocast_dtype(torch.device("cpu"), "bf16")
torch.bfloat16
"""

from __future__ import annotations

import queue
import sys
import threading
from typing import Iterable, Iterator, NamedTuple, TypeVar

import torch
from torch.utils.data import DataLoader

from .errors import RunoffError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
Batch = TypeVar("Batch")


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


def accumulator_dtype(device: torch.device) -> torch.dtype:
    """The dtype of running sums (losses, scores) kept on ``device``: float64, but float32
    on Apple MPS, which has no float64 (a tensor of it there raises a TypeError).

    >>> accumulator_dtype(torch.device("mps")), accumulator_dtype(torch.device("cpu"))
    (torch.float32, torch.float64)
    """
    return torch.float32 if device.type == "mps" else torch.float64


def keep_freed_memory(device: torch.device) -> bool:
    """Ask glibc to keep freed blocks for reuse instead of unmapping them, for work on a
    CPU ``device`` (Linux only; nothing for an accelerator, whose buffers glibc never sees).

    A CPU training step or forward pass allocates and frees the same large activation
    buffers each time; by default glibc hands blocks over 32 MB back to the kernel and every
    step then pays for zeroed page faults: measured 2.4x slower training steps at 8x256x256
    px, and forecasts at 224x464 at 2.33 against 3.09 maps/s one issue day at a time, 1.31
    against 2.27 in batches of 8 (PyTorch's CPU tuning guide suggests jemalloc/tcmalloc for
    the same reason). Returns whether it applied.
    """
    if device.type != "cpu" or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl and other libcs: leave them alone
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, (1 << 31) - 1))


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
