"""Skill per lead against persistence and climatology, as ``runoff evaluate`` measures it
(MSE in physical units, test split), for the inputs a user can give: the rain of the days
being forecast as a forcing (observed: a perfect forecast), a noisy forecast of that rain,
and past days only.

    python benchmarks/bench_skill.py                      # synthetic river regime (runoff synth --regime river)
    python benchmarks/bench_skill.py --regime cells       # runoff where the rain falls, no rivers
    python benchmarks/bench_skill.py --cube stores/bhima.zarr --runs rain,past \\
        --rain precipitation --train_end 2000-08-31 --val_end 2000-09-20   # a real cube

Prints one markdown table: lead, then per run the MSE skill vs persistence and vs
climatology, and whether the targets hold (rain: >= 0.5 vs persistence at lead 1 and > 0
vs both at every lead; past only: >= 0 vs persistence at every lead).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import covariates_note, machine, skill_cube, skill_parser, skill_train_config  # noqa: E402

from pipeline.cli import int_list  # noqa: E402
from pipeline.evaluate import evaluate  # noqa: E402
from pipeline.train import train  # noqa: E402


def main() -> int:
    p = skill_parser(__doc__)
    p.add_argument("--runs", default="rain,forecast,past", help="rain, forecast (noisy rain), past")
    p.add_argument("--rain_forecast", default="rainf_fc", help="its noisy forecast (synthetic cube)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--linear_response", action=argparse.BooleanOptionalAction, default=True,
                   help="the default; --no-linear_response forms the change in log space")
    args = p.parse_args()
    leads = int_list(args.leads, "--leads")
    runs = {"rain": [args.rain], "forecast": [args.rain_forecast], "past": []}
    chosen = [r.strip() for r in args.runs.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cube, described = skill_cube(args, tmp)
        table = {}
        for name in chosen:
            started = time.perf_counter()
            config = skill_train_config(args, cube, leads, tmp / name, batch_size=args.batch_size, lr=args.lr,
                                        linear_response=args.linear_response, forcings=runs[name])
            result = train(config)
            report = evaluate(result.best_checkpoint, cube, split="test", output_dir=tmp / name / "eval")
            table[name] = report.metrics
            print(f"{name}: {result.epochs_run} epochs (best {result.best_epoch}), "
                  f"{time.perf_counter() - started:.0f} s, {report.windows} test windows", file=sys.stderr)
    print(f"{machine()}; cube: {described}; "
          f"{args.epochs} epochs max, {args.num_layers} x {args.hidden_channels} hidden, patch {args.patch}, "
          f"change {'as a linear response in physical units' if args.linear_response else 'in log space'}"
          + covariates_note(args))
    header = "| lead | " + " | ".join(f"{n}: vs persistence | {n}: vs climatology" for n in chosen) + " |"
    print(header)
    print("|---" * (1 + 2 * len(chosen)) + "|")
    for lead in leads:
        cells = []
        for name in chosen:
            row = table[name][lead]["model"]
            cells += [f"{row['skill_vs_persistence']:+.3f}", f"{row['skill_vs_climatology']:+.3f}"]
        print(f"| {lead} | " + " | ".join(cells) + " |")
    for name in chosen:
        bias = ", ".join(f"{table[name][lead]['model']['bias']:+.3g}" for lead in leads)
        print(f"{name}: test bias of the model (forecast - truth, data units) at leads {args.leads}: {bias}")
    checks = []
    if "rain" in table:
        first = table["rain"][leads[0]]["model"]["skill_vs_persistence"]
        every = all(table["rain"][lead]["model"][f"skill_vs_{b}"] > 0 for lead in leads
                    for b in ("persistence", "climatology"))
        checks.append(f"rain: lead {leads[0]} vs persistence {first:+.3f} (target >= 0.5: "
                      f"{'yes' if first >= 0.5 else 'NO'}); beats both at every lead: {'yes' if every else 'NO'}")
    if "past" in table:
        worst = min(table["past"][lead]["model"]["skill_vs_persistence"] for lead in leads)
        checks.append(f"past only: worst lead vs persistence {worst:+.3f} (target >= 0: {'yes' if worst >= 0 else 'NO'})")
    if {"rain", "forecast", "past"} <= set(table):
        between = all(table["past"][lead]["model"]["skill_vs_persistence"]
                      <= table["forecast"][lead]["model"]["skill_vs_persistence"]
                      <= table["rain"][lead]["model"]["skill_vs_persistence"] for lead in leads)
        checks.append(f"noisy forecast between past only and perfect rain at every lead: {'yes' if between else 'NO'}")
    print("\n".join(checks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
