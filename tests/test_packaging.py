"""pyproject.toml, requirements.txt and environment.yml name the same dependencies."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _name(spec: str) -> str:
    return re.split(r"[<>=!~ ]", spec.strip(), maxsplit=1)[0].lower()


def _specs(lines):
    return {_name(s): s.replace(" ", "") for s in lines if s.strip() and not s.strip().startswith("#")}


def test_three_dependency_lists_agree():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pyproject = _specs(project["dependencies"] + project["optional-dependencies"]["test"])
    requirements = _specs((ROOT / "requirements.txt").read_text().splitlines())
    env_text = (ROOT / "environment.yml").read_text().split("dependencies:", 1)[1]
    env_lines = [line.strip()[2:] for line in env_text.splitlines()
                 if line.strip().startswith("- ") and not line.strip().startswith("- pip:")]
    environment = _specs(s for s in env_lines if not s.startswith(("python", "pip", "-e")))
    assert pyproject == requirements
    assert environment == pyproject


def test_torch_is_pinned():
    assert "torch==2.13.0" in (ROOT / "requirements.txt").read_text()
