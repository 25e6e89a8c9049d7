"""Skill per lead against persistence and climatology, as ``runoff evaluate`` measures it
(MSE in physical units, test split), for the inputs a user can give: the rain of the days
being forecast as a forcing (observed: a perfect forecast), a noisy forecast of that rain,
and past days only.

    python benchmarks/bench_skill.py                      # synthetic river regime (runoff synth --regime river)
    python benchmarks/bench_skill.py --regime cells       # runoff where the rain falls, no rivers
    python benchmarks/bench_skill.py --runs rain,forcing_error   # trained on the observed rain, with and
                                                          # without --forcing_error, given the noisy forecast
    python benchmarks/bench_skill.py --cube stores/bhima.zarr --runs rain,past \\
        --rain precipitation --train_end 2000-08-31 --val_end 2000-09-20   # a real cube

Runs: ``rain`` trains and scores with the observed rain; ``forecast`` with its noisy
forecast (``--rain_forecast``); ``forcing_error`` trains on the observed rain times a
forecast's error (``runoff train --forcing_error``); ``past`` on past days only. The runs
trained on the observed rain are also scored given the noisy forecast in its place, as a
forecast made with a rain forecast is (where the cube holds one).

Prints one markdown table: lead, then per run the MSE skill vs persistence and vs
climatology (and vs persistence given the forecast rain), and whether the targets hold
(rain: >= 0.5 vs persistence at lead 1 and > 0 vs both at every lead; past only: >= 0 vs
persistence at every lead).
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
from pipeline.cube import open_cube  # noqa: E402
from pipeline.evaluate import evaluate  # noqa: E402
from pipeline.train import train  # noqa: E402


def main() -> int:
    p = skill_parser(__doc__)
    p.add_argument("--runs", default="rain,forecast,past", help="rain, forecast (noisy rain), forcing_error, past")
    p.add_argument("--rain_forecast", default="rainf_fc", help="its noisy forecast (synthetic cube)")
    p.add_argument("--forcing_error", type=float, default=0.5,
                   help="the forcing_error run's --forcing_error (default 0.5, the synthetic forecast's log std)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--linear_response", action=argparse.BooleanOptionalAction, default=True,
                   help="the default; --no-linear_response forms the change in log space")
    args = p.parse_args()
    leads = int_list(args.leads, "--leads")
    runs = {"rain": ([args.rain], 0.0), "forecast": ([args.rain_forecast], 0.0),
            "forcing_error": ([args.rain], args.forcing_error), "past": ([], 0.0)}
    chosen = [r.strip() for r in args.runs.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cube, described = skill_cube(args, tmp)
        holds_forecast = args.rain_forecast in open_cube(cube)
        table, given_forecast = {}, {}
        for name in chosen:
            started = time.perf_counter()
            forcings, forcing_error = runs[name]
            config = skill_train_config(args, cube, leads, tmp / name, batch_size=args.batch_size, lr=args.lr,
                                        linear_response=args.linear_response, forcings=forcings,
                                        forcing_error=forcing_error)
            result = train(config)
            report = evaluate(result.best_checkpoint, cube, split="test", output_dir=tmp / name / "eval")
            table[name] = report.metrics
            if holds_forecast and forcings == [args.rain]:  # runoff evaluate --forcings rainf=rainf_fc
                given_forecast[name] = evaluate(result.best_checkpoint, cube, split="test",
                                                output_dir=tmp / name / "eval_forecast_rain",
                                                forcings_from={args.rain: args.rain_forecast}).metrics
            print(f"{name}: {result.epochs_run} epochs (best {result.best_epoch}), "
                  f"{time.perf_counter() - started:.0f} s, {report.windows} test windows", file=sys.stderr)
    print(f"{machine()}; cube: {described}; "
          f"{args.epochs} epochs max, {args.num_layers} x {args.hidden_channels} hidden, patch {args.patch}, "
          f"change {'as a linear response in physical units' if args.linear_response else 'in log space'}"
          + covariates_note(args)
          + (f"; forcing_error: --forcing_error {args.forcing_error:g}" if "forcing_error" in chosen else "")
          + (f"; 'given {args.rain_forecast}': scored with {args.rain_forecast} in place of {args.rain}"
             if given_forecast else ""))
    columns = [f"{n}: vs persistence | {n}: vs climatology"
               + (f" | {n}, given {args.rain_forecast}: vs persistence" if n in given_forecast else "")
               for n in chosen]
    print("| lead | " + " | ".join(columns) + " |")
    print("|---" * (1 + 2 * len(chosen) + len(given_forecast)) + "|")
    for lead in leads:
        cells = []
        for name in chosen:
            row = table[name][lead]["model"]
            cells += [f"{row['skill_vs_persistence']:+.3f}", f"{row['skill_vs_climatology']:+.3f}"]
            if name in given_forecast:
                cells.append(f"{given_forecast[name][lead]['model']['skill_vs_persistence']:+.3f}")
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
    if {"rain", "forcing_error"} <= set(given_forecast):
        held = all(given_forecast["forcing_error"][lead]["model"]["skill_vs_persistence"]
                   >= given_forecast["rain"][lead]["model"]["skill_vs_persistence"] for lead in leads)
        checks.append(f"given {args.rain_forecast}: forcing_error at or above rain at every lead: "
                      f"{'yes' if held else 'NO'}")
    print("\n".join(checks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
