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


@pytest.mark.parametrize("module", ["service.http.worker", "service.launcher"])
def test_the_http_side_and_the_launcher_import_no_torch(module):
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'open_clip', 'torchvision') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """The absolute names of every module `path` imports (anywhere in the file, relative imports resolved)."""
    package = module_name(path) if path.stem == "__init__" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]) if node.level else ""
            base = ".".join(p for p in (base, node.module or "") if p)
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


def imports_of(package: str) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports (anywhere in the file)."""
    modules = {module_name(path): path for path in sorted((REPO / package).rglob("*.py"))}
    return {name: {m for m in imported(path) if m in modules and m != name} for name, path in modules.items()}


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


SIDES = {"service.http": "service.engine", "service.engine": "service.http"}
MODEL = ("torch", "torchvision", "open_clip", "mmap_model")


@pytest.mark.parametrize("path", sorted((REPO / "service").rglob("*.py")), ids=lambda p: module_name(p))
def test_each_process_side_imports_only_what_it_may(path):
    """service/http/ (the HTTP workers) and service/engine/ (the engine) import nothing of each other; the HTTP
    side no model; the shared modules at service/'s top (launcher, transport, settings, ...) neither side."""
    name, found = module_name(path), imported(path)
    side = next((s for s in SIDES if name == s or name.startswith(f"{s}.")), None)
    if side is None:
        forbidden = [m for m in found if m.startswith(("service.http", "service.engine"))]
    else:
        forbidden = [m for m in found if m == SIDES[side] or m.startswith(f"{SIDES[side]}.")]
        if side == "service.http":
            forbidden += [m for m in found if m.split(".")[0] in MODEL]
    assert forbidden == [], f"{name} imports {sorted(set(forbidden))}"


@pytest.mark.parametrize("package", ["service", "mmap_model", "training", "bench", "deploy", "tests"])
def test_every_import_of_a_project_module_names_one_that_exists(package):
    """Imports inside functions too (a lazy import of a moved module fails only when it runs)."""
    missing = []
    for path in sorted((REPO / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and not node.level and node.module and \
                    node.module.split(".")[0] in ("service", "mmap_model", "training", "mmap_client"):
                base = REPO / node.module.replace(".", "/")
                if not (base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()):
                    missing.append(f"{path.relative_to(REPO)}: {node.module}")
    assert missing == []


def test_the_import_rule_resolves_relative_imports():
    engine = REPO / "service" / "engine" / "core.py"
    assert "service.http.images" in imported(REPO / "service" / "http" / "uploads.py")
    assert "service.transport" in imported(engine) and "service.engine.registry" in imported(engine)


@pytest.mark.parametrize("path", sorted((REPO / "service").rglob("*.py")), ids=lambda p: module_name(p))
def test_no_service_module_is_over_400_lines(path):
    assert len(path.read_text().splitlines()) <= 400


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_ruff_is_clean_with_the_120_column_limit():
    """`ruff check` as configured in pyproject.toml, with the line-length rule (E501) not switched off."""
    lint = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["ruff"]["lint"]
    assert "E501" not in lint.get("ignore", []) and "E" in lint["select"]
    ruff = Path(sys.executable).with_name("ruff")
    result = subprocess.run([str(ruff), "check", "--no-cache", "."], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
