"""Stress check: launch two-rank CPU data-parallel training N times; every launch must exit 0.

A rank that aborts at interpreter exit (``terminate called without an active exception``,
SIGABRT) makes torchrun report the whole run as failed. At a 4% failure rate, 100 clean
launches in a row happen by chance about 2 times in 100.

    python benchmarks/stress_ddp.py --runs 100            # prints failures / runs, exits 1 on any

Prints one line per failed launch (its exit status and the last stderr line) and a summary.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import synthetic_cube  # noqa: E402


def launch(cube: str, out: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "pipeline.train", "--data_dir", cube, "--epochs", "1", "--batch_size", "4",
               "--hidden_channels", "4", "--patch", "16", "--checkpoint_dir", str(out / "ckpt"),
               "--output_dir", str(out / "outputs"), "--device", "cpu"]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cube = synthetic_cube(Path(tmp), days=90, height=24, width=32)
        failures, started = 0, time.perf_counter()
        for i in range(args.runs):
            done = launch(cube, Path(tmp) / f"run{i}")
            if done.returncode != 0:
                failures += 1
                last = [line for line in done.stderr.splitlines() if line.strip()][-3:]
                print(f"run {i}: exit {done.returncode}: {' | '.join(last)[-300:]}", flush=True)
        elapsed = time.perf_counter() - started
    print(f"two-rank launches: {failures} failed of {args.runs} ({failures / args.runs:.1%}), "
          f"{elapsed / args.runs:.1f} s per launch")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
