"""What the benchmark scripts share: a measured row, and one table of rows."""

from __future__ import annotations

import platform
from dataclasses import dataclass

import torch


@dataclass
class Row:
    """One measured comparison: ``measured`` is the figure (often a ratio), ``target`` the goal."""

    what: str
    measured: str
    target: str = ""
    met: bool | None = None  # None: a figure with no target


def table(rows: list[Row]) -> str:
    """The rows as one markdown table."""
    lines = ["| measurement | measured | target | met |", "|---|---:|---:|:---:|"]
    for r in rows:
        met = "" if r.met is None else ("yes" if r.met else "NO")
        lines.append(f"| {r.what} | {r.measured} | {r.target} | {met} |")
    return "\n".join(lines)


def machine() -> str:
    """One line naming the machine the figures come from."""
    import os

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA GPU"
    return (f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"torch {torch.__version__}, {gpu}")
