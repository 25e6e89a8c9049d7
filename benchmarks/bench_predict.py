"""Prediction cost: forecast maps per second on 224x464, and peak memory of a tiled
2,000x2,000 forecast; prints measured figures.

    python benchmarks/bench_predict.py [--big 2000] [--tile 512]

Each measurement runs in a fresh process so that its peak RSS (VmHWM) is its own.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

CODE = r"""
import sys, time, numpy as np, torch
from pipeline.model import ConvLSTMForecaster
from pipeline.predict import forecast_window
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--big", type=int, default=2000)
    parser.add_argument("--tile", type=int, default=512)
    args = parser.parse_args()
    rate, rss = run(224, 464, args.tile, 10)
    print(f"224x464, untiled:            {rate:6.2f} forecast maps/s on CPU, peak RSS {rss:6.0f} MB")
    rate_big, rss_big = run(args.big, args.big, args.tile, 1)
    data_mb = 6 * args.big * args.big * 4 / 2**20
    print(f"{args.big}x{args.big}, tiles of {args.tile}: {rate_big:6.3f} forecast maps/s, peak RSS {rss_big:6.0f} MB "
          f"(the 6-day input alone is {data_mb:.0f} MB)")


if __name__ == "__main__":
    main()
