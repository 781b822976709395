"""The code layout: the HTTP side imports no model, and no module of service/, mmap_model/ or training/
imports itself through others (an import cycle), counting imports inside functions too."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module", ["service.worker", "service.launcher"])
def test_the_http_side_and_the_launcher_import_no_torch(module):
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'open_clip', 'torchvision') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def imports_of(package: str) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports (anywhere in the file)."""
    graph: dict[str, set[str]] = {}
    for path in sorted((REPO / package).glob("*.py")):
        name = f"{package}.{path.stem}" if path.stem != "__init__" else package
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package if node.level else (node.module or "")
                if node.level and node.module:
                    base = f"{package}.{node.module}"
                if base == package:
                    found |= {f"{package}.{alias.name}" for alias in node.names}
                elif base.startswith(f"{package}."):
                    found.add(base)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith(f"{package}.")}
        graph[name] = {m for m in found if m != name and (REPO / package / f"{m.split('.')[-1]}.py").is_file()}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append([*path[path.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


@pytest.mark.parametrize("package", ["service", "mmap_model", "training"])
def test_no_import_cycles(package):
    assert cycles(imports_of(package)) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_ruff_is_clean_with_the_120_column_limit():
    """`ruff check` as configured in pyproject.toml, with the line-length rule (E501) not switched off."""
    lint = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["ruff"]["lint"]
    assert "E501" not in lint.get("ignore", []) and "E" in lint["select"]
    ruff = Path(sys.executable).with_name("ruff")
    result = subprocess.run([str(ruff), "check", "--no-cache", "."], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
