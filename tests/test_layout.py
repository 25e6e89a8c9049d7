"""The package's layout: imports point down, predicting never loads the trainer, and the
verification module stands alone (DESIGN.md)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"


def _is_main_guard(node: ast.stmt) -> bool:
    """``if __name__ == "__main__":``: runs only as the program ``__main__``, a module of its
    own that no package module imports."""
    test = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
            and test.left.id == "__name__")


def _imports(path: Path) -> set[str]:
    """The package modules ``path`` imports anywhere (functions included), by short name."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_main_guard(child):
                continue
            if isinstance(child, ast.ImportFrom):
                module = child.module or ""
                if child.level == 1 and module:
                    found.add(module.split(".")[0])
                elif child.level == 1:
                    found.update(alias.name for alias in child.names)
                elif module.startswith("pipeline."):
                    found.add(module.split(".")[1])
            elif isinstance(child, ast.Import):
                found.update(a.name.split(".")[1] for a in child.names if a.name.startswith("pipeline."))
            visit(child)

    visit(ast.parse(path.read_text()))
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    return found & modules - {path.stem}


GRAPH = {p.stem: _imports(p) for p in PACKAGE.glob("*.py")}


def _reaches(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in GRAPH[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_the_package_has_no_import_cycle():
    cycles = [m for m in GRAPH if m in _reaches(m)]
    assert not cycles, {m: sorted(GRAPH[m]) for m in cycles}


def test_forecasting_and_scoring_never_import_the_trainer_or_the_command_line():
    for module in ("predict", "evaluate", "recalibrate", "inference", "checkpoint", "baselines"):
        assert not {"train", "cli"} & _reaches(module), (module, sorted(_reaches(module)))
    assert GRAPH["verify"] == set(), "verify imports nothing else of the package"
    out = subprocess.run([sys.executable, "-c", "import pipeline.predict, pipeline.evaluate, sys; "
                          "print('pipeline.train' in sys.modules)"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_only_the_command_line_imports_the_commands():
    commands = {"ingest", "train", "predict", "evaluate", "recalibrate"}
    for module, imported in GRAPH.items():
        if module not in ("cli", "__main__"):
            # train and predict/evaluate open raster folders through ingest.ensure_cube
            assert not (imported & commands - {"ingest"}), (module, sorted(imported))
