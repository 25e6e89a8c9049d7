"""Every `runoff` command line in the README is a valid command of the real parser, and
the quick start is exactly the two make targets."""

import re
import shlex
from pathlib import Path

import pytest

from pipeline.cli import build_parser

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _commands() -> list[str]:
    blocks = re.findall(r"^```(\w*)\n(.*?)^```", README, flags=re.S | re.M)
    return [line.strip() for lang, block in blocks if lang == "" for line in block.splitlines()
            if line.strip().startswith("runoff ")]


def test_quick_start_is_two_commands():
    quick = README.split("## Quick start", 1)[1].split("##", 1)[0]
    block = re.search(r"```\n(.*?)```", quick, flags=re.S).group(1)
    assert block.split("\n")[:2] == ["make demo", "make test"] and block.strip().count("\n") == 1


@pytest.mark.parametrize("command", _commands())
def test_readme_command_parses(command):
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert callable(args.func)


def test_readme_names_every_subcommand():
    used = {shlex.split(c)[1] for c in _commands()}
    assert {"ingest", "info", "train", "predict", "evaluate", "synth"} <= used
