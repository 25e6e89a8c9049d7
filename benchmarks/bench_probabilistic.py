"""The probabilistic model against its targets, as ``runoff evaluate`` scores it (test split),
with the rain of the forecast days as a forcing (observed: a perfect forecast), or (``--past_only``)
with the past days only.

    python benchmarks/bench_probabilistic.py                  # synthetic river regime
    python benchmarks/bench_probabilistic.py --no-quantile_location   # quantiles centred, no MSE-trained centre
    python benchmarks/bench_probabilistic.py --days 2922 --train_end 2024-12-31 --val_end 2025-12-31 \
        --epochs 10 --calibrate_levels       # eight years, the quantiles' levels calibrated on a whole year
    python benchmarks/bench_probabilistic.py --cube stores/cwatm.zarr --patch 32 \\
        --train_end 2000-08-31 --val_end 2000-09-20       # a real cube (CWatM, monsoon split)
    python benchmarks/bench_probabilistic.py --cube stores/vic.zarr --patch 10 --past_only   # a cube without rain
    python benchmarks/bench_probabilistic.py --cube stores/cwatm.zarr --patch 32 --train_end 2000-08-31 \\
        --val_end 2000-09-20 --epochs 30 --patience 8 --seeds 3   # three seeds of each model, forecasting together

Trains a deterministic and a probabilistic model with the same settings, evaluates both,
and prints per lead: CRPS skill against the climatological and the persistence ensembles
(targets > 0.3 and > 0), the spread/skill ratio (0.8 .. 1.2 at leads 1 and 6), the largest
gap between forecast probability and observed frequency in reliability bins of >= 100
pixels (<= 0.1) and how much of it lies outside the observed frequency's 5-95% band over
resampled test days (what the test days can tell from chance), and the MSE of the median and of the mean against the deterministic
model's (median within 10%; both rows of ``runoff evaluate``); then the training cost per epoch (<= 2x).
Beside the targets, the widest reliability gaps that forecasts with the same members, calibrated
by construction, show on the same test days (``benchmarks/bench_reliability_chance.py``): what
chance alone gives, and how often such a forecast would meet the reliability target.
With ``--seeds N`` each model is trained N times (seeds ``--seed`` .. ``--seed`` + N - 1) and
its N checkpoints are scored together, as ``runoff evaluate --weights_path A B C`` does.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (covariates_note, machine, reliability_by_chance, skill_cube, skill_parser,  # noqa: E402
                    skill_train_config)

from pipeline.cli import int_list  # noqa: E402
from pipeline.evaluate import evaluate  # noqa: E402
from pipeline.calibration import CALIBRATIONS  # noqa: E402
from pipeline.train import train  # noqa: E402
from pipeline.verify import CHANCE_DRAWS, RELIABILITY_ROWS, widest_reliability_gap  # noqa: E402


def main() -> int:
    parser = skill_parser(__doc__)
    parser.add_argument("--quantile_location", action=argparse.BooleanOptionalAction, default=True,
                        help="the probabilistic model's centre trained by the MSE, its quantiles placed off it "
                             "(default, as runoff train)")
    parser.add_argument("--calibration", default="spread_skill", choices=CALIBRATIONS,
                        help="how the spread factor is picked among the near-best by validation CRPS")
    parser.add_argument("--calibrate_levels", action="store_true",
                        help="then the quantiles' levels per flow class, as runoff train --calibrate_levels")
    parser.add_argument("--quantile_log_weight", type=float, default=0.0,
                        help="the probabilistic model's weight of the log values' pinball loss, as runoff train")
    parser.add_argument("--past_only", action="store_true",
                        help="no rain of the forecast days: the past days only (a cube without rain, such as VIC's)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="train each model this many times (seeds --seed, --seed + 1, ...) and score the "
                             "checkpoints together, as runoff evaluate --weights_path A B C")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: at least 1")
    leads = int_list(args.leads, "--leads")
    forcings = [] if args.past_only else [args.rain]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cube, described = skill_cube(args, tmp)
        runs = {}
        for name, probabilistic in (("deterministic", False), ("probabilistic", True)):
            results = []
            for seed in range(args.seed, args.seed + args.seeds):
                config = skill_train_config(args, cube, leads, tmp / f"{name}{seed}", forcings=forcings,
                                            probabilistic=probabilistic,
                                            quantile_location=args.quantile_location if probabilistic else None,
                                            calibration=args.calibration if probabilistic else "spread_skill",
                                            calibrate_levels=args.calibrate_levels and probabilistic,
                                            quantile_log_weight=args.quantile_log_weight if probabilistic else 0.0)
                started = time.perf_counter()
                result = train(replace(config, seed=seed))
                results.append(result)
                print(f"{name}, seed {seed}: {result.epochs_run} epochs (best {result.best_epoch}), "
                      f"{time.perf_counter() - started:.0f} s", file=sys.stderr)
            report = evaluate([r.best_checkpoint for r in results], cube, split="test", output_dir=tmp / name / "eval")
            runs[name] = (results, report)
        chance = reliability_by_chance([r.best_checkpoint for r in runs["probabilistic"][0]], cube, "test")
    det, prob = runs["deterministic"][1].metrics, runs["probabilistic"][1].metrics
    ensemble = runs["probabilistic"][1].ensemble
    rain = f"rain: {','.join(forcings)} (observed, a perfect forecast)" if forcings else "no rain (past days only)"
    print(f"{machine()}; cube: {described}; {rain}; {args.epochs} epochs max, "
          f"{args.num_layers} x {args.hidden_channels} hidden, patch {args.patch}"
          + covariates_note(args)
          + ("; quantiles located off an MSE-trained centre" if args.quantile_location else "; quantiles centred")
          + f"; spread calibration: {args.calibration}"
          + ("; levels calibrated per flow class" if args.calibrate_levels else "")
          + (f"; log values' pinball loss x{args.quantile_log_weight:g}" if args.quantile_log_weight else "")
          + (f"; {args.seeds} seeds together ({args.seed}..{args.seed + args.seeds - 1})" if args.seeds > 1 else ""))
    print("| lead | CRPS skill vs climatology | CRPS skill vs persistence | spread/skill | reliability gap "
          "| median MSE / deterministic | mean MSE / deterministic | reliability gap beyond the 5-95% band "
          "| MSE skill vs persistence: deterministic, mean | a calibrated forecast's widest gap by chance: median "
          "(90th percentile) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = {}
    for lead in leads:
        model, reference = prob[lead]["model"], det[lead]["model"]["mse"]
        gap, beyond_band = (widest_reliability_gap(model, beyond_band=beyond) for beyond in (False, True))
        rows[lead] = (model["crps_skill_vs_climatology"], model["crps_skill_vs_persistence"], model["spread_skill"],
                      gap, prob[lead]["median"]["mse"] / reference, prob[lead]["mean"]["mse"] / reference, beyond_band)
        print(f"| {lead} | " + " | ".join(f"{v:+.3f}" if i < 2 else f"{v:.3f}" for i, v in enumerate(rows[lead]))
              + f" | {det[lead]['model']['skill_vs_persistence']:+.3f}, "
              f"{prob[lead]['mean']['skill_vs_persistence']:+.3f} | {np.median(chance[lead][1]):.3f} "
              f"({np.quantile(chance[lead][1], 0.9):.3f}) |")
    # training throughput of epochs 2+ (epoch 1 also pays the first reads and the start-up)
    cost = [1 / np.mean([h["samples_per_s"] for r in runs[n][0] for h in r.history[1:] or r.history])
            for n in ("deterministic", "probabilistic")]
    checks = [
        ("CRPS skill > 0.3 vs climatology at every lead", all(r[0] > 0.3 for r in rows.values())),
        ("CRPS skill > 0 vs persistence at every lead", all(r[1] > 0 for r in rows.values())),
        (f"spread/skill in 0.8 .. 1.2 at leads {leads[0]} and {leads[-1]}",
         all(0.8 <= rows[lead][2] <= 1.2 for lead in (leads[0], leads[-1]))),
        ("reliability within 0.1 of the diagonal (bins >= 100 pixels)", all(r[3] <= 0.1 for r in rows.values())),
        ("(beside the target) the diagonal inside every such bin's 5-95% band",
         all(r[6] == 0 for r in rows.values())),
        (f"(beside the target) calibrated forecasts as sharp within 0.1 at every lead, by chance: "
         f"{100 * np.mean(np.all([c[1] <= 0.1 for c in chance.values()], axis=0)):.0f}% of {CHANCE_DRAWS}; "
         "the model's widest gap within the 90th percentile of theirs at every lead",
         all(rows[lead][3] <= np.quantile(chance[lead][1], 0.9) for lead in leads)),
        ("median MSE within 10% of the deterministic model's", all(r[4] <= 1.1 for r in rows.values())),
        (f"training time per window {cost[1] * 1e3:.2f} ms against {cost[0] * 1e3:.2f} ms: "
         f"{cost[1] / cost[0]:.2f}x (<= 2x)", cost[1] <= 2 * cost[0]),
    ]
    print("\n".join(f"{what}: {'yes' if ok else 'NO'}" for what, ok in checks))
    for lead in (leads[0], leads[-1]):
        for threshold, table in ensemble[lead]["reliability"].items():
            cells = [f"{p:.2f}->{o:.2f} [{lo:.2f}, {hi:.2f}] ({int(c)})" for c, p, o, lo, hi in
                     zip(*(table[row] for row in RELIABILITY_ROWS)) if c]
            print(f"reliability, lead {lead}, > {threshold}: forecast -> observed [5-95% band] (pixels): " + ", ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
