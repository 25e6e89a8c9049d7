"""``python -m pipeline ARGS`` is ``runoff ARGS``; ``python -m pipeline.train ARGS`` (what
``torchrun`` launches) comes here with ``train`` first. The command line is imported only
when a process starts as a program, so no package module imports it and no import cycle
runs through it."""

from __future__ import annotations

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main())
