"""Batch prefetching against a step that keeps the training thread busy, on any machine.

    python benchmarks/bench_prefetch.py [--step-ms 9] [--patch 128] [--batch 16] [--epochs 4]

On an accelerator the training thread spends each step launching kernels while a background
thread (`pipeline.device.prefetched`) cuts and collates the next batches. Here the training
thread stands in for that launch with small torch ops for --step-ms per batch (9 ms: the
bf16 step of 128 px, batch 16, 32 hidden channels on an H200), and the real sampler feeds
it. Compared side by side, in interleaved rounds: the DataLoader's default collation
(`torch.stack`) and `pipeline.sampler.collate_windows` (numpy's single-threaded copies).
Prints the share of time the training thread waited for a batch, epochs 2+.

Why the collation matters: `torch.stack` runs an OpenMP parallel region, and libgomp's
worker threads spin-wait after it, taking cores from the training thread
(`OMP_WAIT_POLICY=passive` removes the difference). After CPU training has run in the same
process the difference is gone too (libgomp then seems to throttle its spinning); a CUDA
training process never trains on the CPU, so run this before any CPU training, as
`report.py` does.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, default_collate

from common import Row, cube_parser, machine, synthetic_cube, table, training_sampler
from pipeline.sampler import WindowSampler, collate_windows
from pipeline.device import prefetched


def launch_bound_step(seconds: float) -> None:
    """Keep this thread busy as a kernel launch does: many tiny torch ops, each a short
    release of the GIL."""
    a = torch.zeros(64)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(20):
            a.add_(1.0)


def data_wait(loader: DataLoader, sampler: WindowSampler, epochs: int, step_s: float) -> float:
    """Share of wall time, epochs 2+, that the busy training thread waited for a batch."""
    waited = total = 0.0
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        start = time.perf_counter()
        wait = 0.0
        batches = prefetched(loader)
        while True:
            asked = time.perf_counter()
            if next(batches, None) is None:
                break
            wait += time.perf_counter() - asked
            launch_bound_step(step_s)
        if epoch:  # epoch 1 includes the first decode of the block
            waited, total = waited + wait, total + time.perf_counter() - start
    return waited / total


def parser() -> argparse.ArgumentParser:
    p = cube_parser(__doc__)
    p.add_argument("--patch", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--step-ms", type=float, default=9.0)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--repeat", type=int, default=3, help="interleaved rounds of each collation; best of each")
    return p


def measure(args: argparse.Namespace) -> list[Row]:
    with tempfile.TemporaryDirectory() as tmp:
        sampler = training_sampler(synthetic_cube(Path(tmp), args.days, args.height, args.width), args.patch)
        collations = {"default collation (torch.stack)": default_collate, "collate_windows (numpy)": collate_windows}
        waits: dict[str, list[float]] = {name: [] for name in collations}
        for _ in range(args.repeat):
            for name, collate in collations.items():
                loader = DataLoader(sampler, batch_size=args.batch, collate_fn=collate)
                waits[name].append(data_wait(loader, sampler, args.epochs, args.step_ms / 1000))
    what = (f"prefetch thread, {args.patch}x{args.patch} batches of {args.batch}, training thread busy "
            f"{args.step_ms:g} ms per batch ({torch.get_num_threads()} torch threads): data wait, epochs 2+")
    rows = [Row(f"{what}, {name} (rounds: {', '.join(f'{w:.1%}' for w in found)})", f"{min(found):.1%}")
            for name, found in waits.items()]
    default, ours = (min(found) for found in waits.values())
    rows.append(Row("prefetch thread: data wait, default collation / collate_windows",
                    f"{default / ours:.1f}x" if ours > 0 else "-"))
    return rows


def main() -> None:
    rows = measure(parser().parse_args())
    print(f"{machine()}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
