"""Data-parallel runs under ``torchrun``: this process's rank, and the process group
(gloo on CPU, nccl on CUDA) around a training run.

>>> Ranks().is_main, Ranks().world_size
(True, 1)
"""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from .device import pick_device
from .errors import RunoffError


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

    def from_main(self, value):
        """The main rank's ``value`` (any picklable object; tensors on the CPU) on every rank:
        ``value`` itself when not distributed."""
        if self.world_size == 1:
            return value
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

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
        dist.barrier()  # no rank tears down while another still has a collective in flight
    finally:
        release_process_group()


def release_process_group() -> None:
    """Destroy the process group now, while the interpreter is fully alive.

    ``destroy_process_group`` only drops the registry's reference: a DistributedDataParallel
    wrapper (its reducer) that is still alive, for instance in a reference cycle through
    the frames of a finished training run, keeps the group, and gloo's worker threads keep
    the work objects (and tensors) of its last collectives. The group is then destroyed at
    interpreter exit, where freeing those tensors takes the GIL of an interpreter being torn
    down and the process aborts (``terminate called without an active exception``, SIGABRT)
    in about 4% of two-rank CPU runs. Collecting the cycles first lets the group go here.
    """
    gc.collect()
    dist.destroy_process_group()
