"""Prediction cost: forecast maps per second on 224x464, and peak memory of a tiled
2,000x2,000 forecast; prints measured figures.

    python benchmarks/bench_predict.py [--big 2000] [--tile 512]

Each measurement runs in a fresh process so that its peak RSS (VmHWM) is its own.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from common import Row, table

CODE = r"""
import sys, time, numpy as np, torch
from pipeline.model import ConvLSTMForecaster
from pipeline.inference import forecast_window
h, w, tile, n = (int(v) for v in sys.argv[1:5])
torch.manual_seed(0)
model = ConvLSTMForecaster(hidden_channels=16, kernel_size=3)
x = np.random.default_rng(0).normal(size=(6, 1, h, w)).astype(np.float32)
forecast_window(model, x[:, :, :64, :64], torch.device("cpu"))  # warm-up
start = time.perf_counter()
for _ in range(n):
    out = forecast_window(model, x, torch.device("cpu"), tile=tile)
elapsed = time.perf_counter() - start
hwm = [l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(n / elapsed, int(hwm) / 1024, out.shape)
"""


def run(h: int, w: int, tile: int, n: int) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", CODE, str(h), str(w), str(tile), str(n)], capture_output=True,
                         text=True, check=True)
    rate, rss, _ = out.stdout.strip().split(" ", 2)
    return float(rate), float(rss)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--big", type=int, default=2000)
    p.add_argument("--tile", type=int, default=512)
    return p


def measure(args: argparse.Namespace) -> list[Row]:
    rate, rss = run(224, 464, args.tile, 10)
    rate_big, rss_big = run(args.big, args.big, args.tile, 1)
    data_mb = 6 * args.big * args.big * 4 / 2**20
    return [Row(f"prediction 224x464, untiled, CPU (peak RSS {rss:.0f} MB)", f"{rate:.2f} maps/s"),
            Row(f"prediction {args.big}x{args.big} in tiles of {args.tile}, CPU ({rate_big:.3f} maps/s; "
                f"the 6-day input alone is {data_mb:.0f} MB)", f"{rss_big:.0f} MB peak RSS")]


def main() -> None:
    print(table(measure(parser().parse_args())))


if __name__ == "__main__":
    main()
