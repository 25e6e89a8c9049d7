"""`make bench`: every benchmark with its default settings, then one table of ratios.

    python benchmarks/report.py [--skip-big]

Each ratio is measured side by side in the same run on the same data (see each script's
docstring for what it compares). Paste the table into BENCHMARKS.md with the machine line.
"""

from __future__ import annotations

import argparse
import datetime as dt
import warnings

import bench_ingest
import bench_predict
import bench_prefetch
import bench_sampler
from common import machine, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-big", action="store_true", help="leave out the 3,650-day memory run")
    options = parser.parse_args()
    warnings.simplefilter("ignore")
    rows = []
    # bench_prefetch before any CPU training in this process: see its docstring
    for module in (bench_ingest, bench_prefetch, bench_sampler, bench_predict):
        args = module.parser().parse_args([])
        if options.skip_big and hasattr(args, "big_days"):
            args.big_days = 0
        print(f"running {module.__name__} ...", flush=True)
        rows += module.measure(args)
    print(f"\n{machine()}; {dt.date.today()}; python benchmarks/report.py\n")
    print(table(rows))


if __name__ == "__main__":
    main()
