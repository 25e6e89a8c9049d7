"""The benchmark scripts run end to end on small data and print a table of measured figures.

Only that they run and what they print is tested here: their figures are machine-dependent
measurements, read in BENCHMARKS.md, never asserted by a test.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\| (?P<what>[^|]+) \| (?P<measured>[^|]+) \| (?P<target>[^|]*) \| (?P<met>yes|NO|) \|$")


def _table_rows(script: str, *args: str) -> list[dict[str, str]]:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                         text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [m.groupdict() for m in map(ROW.match, out.stdout.splitlines()) if m and m["what"] != "measurement"]
    assert rows, out.stdout[-2000:]
    return rows


@pytest.mark.parametrize("script, args, expected", [
    ("bench_ingest.py", ["--days", "20", "--big-days", "40", "--height", "16", "--width", "20", "--repeat", "1"],
     ["ingest / read limit", "ingest / naive", "ingest peak memory"]),
    ("bench_sampler.py", ["--days", "60", "--height", "72", "--width", "80", "--windows", "40",
                          "--xbatcher-windows", "3", "--repeat", "1"],
     ["numpy gather from cold", "numpy gather in memory, its read left out", "after the first decode",
      "training epoch 1", "training epoch 2"]),
    ("bench_prefetch.py", ["--days", "40", "--height", "48", "--width", "64", "--patch", "32", "--batch", "4",
                           "--step-ms", "1", "--epochs", "2", "--repeat", "1"],
     ["default collation (torch.stack)", "collate_windows (numpy)"]),
    ("bench_predict.py", ["--big", "96", "--tile", "64"], ["prediction 224x464", "prediction 96x96"]),
    ("bench_netcdf.py", ["--days", "2", "--height", "8", "--width", "10"],
     ["ingest against open_mfdataset", "ingest against reading every file with netCDF4"]),
    ("bench_calibration.py", ["--height", "64", "--width", "80", "--max_pixels", "1024", "--windows", "1"],
     ["runoff calibrate over 1 window(s) of 64x80", "leads whose spread factor the lattice picks"]),
    ("bench_evaluate.py", ["--size", "48", "--windows", "10,30", "--issues", "3"],
     ["evaluate peak RSS", "prediction 224x464"]),
    ("bench_precision.py", ["--days", "60", "--height", "32", "--width", "40", "--patch", "16", "--batch", "4",
                            "--hidden", "4", "--epochs", "2"],
     ["fp32: data wait", "bf16: data wait", "fp32: training / the step alone", "bf16 / fp32 samples/s"]),
])
def test_benchmark_prints_a_row_with_a_measured_figure_for_each_comparison(script, args, expected):
    rows = _table_rows(script, *args)
    for name in expected:
        matching = [r for r in rows if name in r["what"]]
        assert matching, f"{script}: no row for {name!r} in {[r['what'] for r in rows]}"
        assert re.fullmatch(r"\d+(\.\d+)?(x|%| maps/s| MB peak RSS)", matching[0]["measured"].strip()), matching[0]


def _stdout_lines(script: str, *args: str) -> list[str]:
    """Run a benchmark script; assert it exits 0 and return its stdout's lines."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                         cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.splitlines()


def test_skill_benchmark_prints_skill_per_lead_and_the_targets():
    lines = _stdout_lines("bench_skill.py", "--days", "80", "--height", "24", "--width", "32", "--epochs", "1",
                          "--leads", "1-2", "--runs", "rain,forecast,forcing_error,past")
    header = next(line for line in lines if line.startswith("| lead | rain: vs persistence"))
    # the runs trained on the observed rain are scored given the noisy forecast too
    assert "| rain, given rainf_fc: vs persistence |" in header and "forcing_error, given rainf_fc" in header
    assert "forecast, given" not in header and "past, given" not in header
    rows = [line for line in lines if re.match(r"^\| [12] \| [+-]\d\.\d{3} \|", line)]
    assert len(rows) == 2 and all(row.count("|") == header.count("|") for row in rows), lines
    assert any(line.startswith("rain: lead 1 vs persistence") for line in lines)
    assert any(line.startswith("past only: worst lead") for line in lines)
    assert any(line.startswith("given rainf_fc: forcing_error at or above rain at every lead: ") for line in lines)


@pytest.mark.parametrize("options, heading", [
    (["--calibration", "brier", "--calibrate_levels"],
     ["; rain: rainf (observed, a perfect forecast);", "; spread calibration: brier; levels calibrated per flow class"]),
    (["--past_only"], ["; no rain (past days only);"]),
    (["--num_layers", "2", "--hidden_channels", "4"], [", 2 x 4 hidden,"]),
    (["--seeds", "2"], ["; 2 seeds together (0..1)"]),
])
def test_probabilistic_benchmark_prints_scores_per_lead_and_the_targets(options, heading):
    lines = _stdout_lines("bench_probabilistic.py", "--days", "100", "--height", "24", "--width", "32", "--epochs", "1",
                          "--patch", "16", "--leads", "1,2", *options)
    assert any(all(words in line for words in heading) for line in lines), lines
    assert any(line.startswith("| lead | CRPS skill vs climatology") for line in lines), lines
    rows = [line for line in lines if re.match(r"^\| [12] \| [+-]\d\.\d{3} \| [+-]\d\.\d{3} \| \d", line)]
    assert len(rows) == 2, lines
    for target in ("CRPS skill > 0.3 vs climatology", "spread/skill in 0.8 .. 1.2", "median MSE within 10%",
                   "training time per window", "(beside the target) the diagonal inside",
                   "(beside the target) calibrated forecasts as sharp within 0.1 at every lead"):
        assert any(line.startswith(target) and line.endswith((": yes", ": NO")) for line in lines), target
