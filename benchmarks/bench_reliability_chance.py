"""How much of a probabilistic forecast's reliability gap chance alone would give on the same
days: its widest gap per lead (as ``runoff evaluate`` scores it) beside the widest gaps of
forecasts with the same members that are calibrated by construction
(:class:`pipeline.verify.ChanceReliability`).

    python benchmarks/bench_reliability_chance.py --weights_path CK/best.pth --data_dir CUBE
    python benchmarks/bench_reliability_chance.py --weights_path A/best.pth B/best.pth C/best.pth \\
        --data_dir stores/cwatm.zarr --split test --forcings rainf=rainf_fc --block_days 1

Each calibrated forecast keeps the members and replaces each truth by one of them, at a level
that keeps the truth's pattern over a map and over ``--block_days`` consecutive days: its
probabilities come true exactly as often as they say, so its gaps are what the test days give
by chance. Prints, per lead, the model's widest gap, the median and 90th percentile of the
calibrated forecasts' widest gaps, and how many of them are within 0.1 (the issue's target),
at each lead and at every lead at once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Row, machine, reliability_by_chance, table  # noqa: E402

from pipeline.errors import RunoffError  # noqa: E402
from pipeline.evaluate import BAND_BLOCK_DAYS  # noqa: E402
from pipeline.inference import parse_forcing_sources  # noqa: E402
from pipeline.verify import CHANCE_DRAWS  # noqa: E402

TARGET_GAP = 0.1  # the reliability target: every bin of >= 100 pixels within 0.1 of the diagonal


def chance_rows(chance: dict[int, tuple[float, np.ndarray]], draws: int) -> list[Row]:
    """The table's rows: per lead the model's widest gap and the calibrated forecasts' gaps,
    then how many calibrated forecasts meet the target at every lead."""
    rows = []
    for lead, (gap, widest) in chance.items():
        rows += [Row(f"lead {lead}: widest reliability gap of the model", f"{gap:.3f}", f"<= {TARGET_GAP}",
                     gap <= TARGET_GAP),
                 Row(f"lead {lead}: widest gap of a calibrated forecast by chance, median "
                     f"(90th percentile {np.quantile(widest, 0.9):.3f})", f"{np.median(widest):.3f}"),
                 Row(f"lead {lead}: calibrated forecasts within {TARGET_GAP}",
                     f"{100 * np.mean(widest <= TARGET_GAP):.0f}%")]
    every = np.all([widest <= TARGET_GAP for _, widest in chance.values()], axis=0)
    rows.append(Row(f"calibrated forecasts within {TARGET_GAP} at every lead ({draws} draws)",
                    f"{100 * every.mean():.0f}%"))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights_path", nargs="+", required=True,
                   help="a probabilistic checkpoint, or several forecasting together (as runoff evaluate)")
    p.add_argument("--data_dir", required=True, help="the cube")
    p.add_argument("--split", default="test", help="train, val, test, all or START..END (as runoff evaluate)")
    p.add_argument("--forcings", help="NAME=VARIABLE: read a forcing from another variable (as runoff evaluate)")
    p.add_argument("--draws", type=int, default=CHANCE_DRAWS, help="calibrated forecasts drawn")
    p.add_argument("--block_days", type=int, default=BAND_BLOCK_DAYS,
                   help="consecutive valid days over which a calibrated forecast keeps the truth's pattern "
                        f"(default {BAND_BLOCK_DAYS}, the reliability band's blocks; 1: days independent)")
    args = p.parse_args()
    for name in ("draws", "block_days"):
        if getattr(args, name) < 1:
            p.error(f"--{name} {getattr(args, name)}: at least 1")
    try:
        chance = reliability_by_chance(args.weights_path, args.data_dir, args.split,
                                       parse_forcing_sources(args.forcings), args.draws, args.block_days)
    except RunoffError as e:
        p.error(str(e))
    print(f"{machine()}; checkpoints: {' '.join(args.weights_path)}; cube: {args.data_dir}, {args.split} split"
          + (f"; forcings {args.forcings}" if args.forcings else "")
          + f"; calibrated forecasts keep the truth's pattern over {args.block_days} day(s)")
    print(table(chance_rows(chance, args.draws)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
