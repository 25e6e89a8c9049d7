"""Training speed fp32 against bf16 on the device picked at run time (CUDA where present),
with the real sampler feeding it; prints samples/s and the data-wait share.

    python benchmarks/bench_precision.py [--days 365] [--patch 128] [--batch 16] [--epochs 3]

Target (issue 6, on CUDA): data wait < 10% of step time. The first epoch includes the
first decode of the training days; later epochs show the steady state. For scale, the same
step is also timed alone, on one batch already on the device: training near that speed is
bound by the device, far below it by the host (launching the step, cutting batches).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from common import Row, cube_parser, machine, synthetic_cube, table
from pipeline.model import ConvLSTMForecaster
from pipeline.device import grad_scaler, pick_device
from pipeline.train import TrainConfig, train, train_step


def step_alone(device: torch.device, precision: str, batch: int, patch: int, hidden: int,
               warmup: int = 10, steps: int = 30) -> float:
    """Samples/s of the training step (:func:`pipeline.train.train_step`) on one batch that
    is already on ``device``."""
    torch.manual_seed(0)
    model = ConvLSTMForecaster(1, [hidden]).to(device)
    optimiser, scaler = torch.optim.AdamW(model.parameters()), grad_scaler(device, precision)
    x = torch.randn(batch, 6, 1, patch, patch, device=device)
    y = torch.randn(batch, 1, 1, patch, patch, device=device)
    mask = torch.ones_like(y, dtype=torch.bool)
    synchronise = getattr(torch, device.type).synchronize if device.type in ("cuda", "mps") else (lambda: None)
    for i in range(warmup + steps):
        if i == warmup:
            synchronise()
            start = time.perf_counter()
        train_step(model, optimiser, scaler, x, y, mask, precision)
    synchronise()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = cube_parser(__doc__)
    parser.add_argument("--patch", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--num-workers", type=int, default=0)
    args = parser.parse_args()
    device = pick_device("auto")
    rows, rates = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store = synthetic_cube(tmp, args.days, args.height, args.width)
        for precision in ("fp32", "bf16"):
            result = train(TrainConfig(
                data_dir=store, epochs=args.epochs, patience=args.epochs, batch_size=args.batch,
                patch=args.patch, hidden_channels=[args.hidden], device=str(device), precision=precision,
                num_workers=args.num_workers, checkpoint_dir=str(tmp / precision), output_dir=str(tmp / precision)))
            later = result.history[1:] or result.history
            rates[precision] = sum(h["samples_per_s"] for h in later) / len(later)
            wait = max(h["data_wait"] for h in later)
            rows.append(Row(f"{device.type} {precision}: samples/s ({args.patch}x{args.patch}, batch {args.batch}, "
                            f"{args.hidden} hidden), epochs 2+", f"{rates[precision]:.1f}"))
            rows.append(Row(f"{device.type} {precision}: data wait, epochs 2+ (epoch 1: "
                            f"{result.history[0]['data_wait']:.1%})", f"{wait:.1%}", "< 10%", wait < 0.10))
            alone = step_alone(device, precision, args.batch, args.patch, args.hidden)
            rows.append(Row(f"{device.type} {precision}: training / the step alone on a batch already on the "
                            f"device ({alone:.1f} samples/s)", f"{rates[precision] / alone:.2f}x"))
    rows.append(Row(f"{device.type} bf16 / fp32 samples/s", f"{rates['bf16'] / rates['fp32']:.2f}x"))
    print(f"{machine()}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
