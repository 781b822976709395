"""Every command the docs show still parses: each `python -m <project module> ...` and `python bench/<x>.py ...`
line in the code blocks of README.md and docs/*.md is handed to that command's own argparse parser (in this
process; parsing stops before the command does any work). A renamed or removed flag fails here, not for a user."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PROJECT = ("service", "training", "mmap_model", "bench/")


class Parsed(Exception):
    """Raised once a command's parser has accepted its arguments."""


def commands(path: Path) -> list[tuple[str, list[str]]]:
    """(target, arguments) of the project commands in a markdown file's indented code blocks."""
    found, lines = [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        while line.endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line[:-1] + " " + lines[i].strip()
        i += 1
        if not re.match(r"    ([A-Z_]+=\S*\s+)*\S*python\s", line) or "…" in line:
            continue
        words = shlex.split(line.strip(), comments=True)
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
            words = words[1:]
        if len(words) < 2 or not words[0].endswith("python"):
            continue
        if words[1] == "-m" and words[2].startswith(PROJECT):
            found.append((words[2], words[3:]))
        elif words[1].startswith("bench/"):
            found.append((words[1], words[2:]))
    return found


CASES = [(f"{path.name}: {target} {' '.join(args)}", target, args) for path in DOCS for target, args in commands(path)]


def test_the_docs_show_commands():
    targets = {target for _, target, _ in CASES}
    assert {"service", "training.fit", "training.publish", "bench/wrk_load.py", "bench/labels.py"} <= targets, targets


def _main(target: str):
    if not target.startswith("bench/"):
        return importlib.import_module("service.__main__" if target == "service" else target).main
    if str(REPO / "bench") not in sys.path:
        sys.path.insert(0, str(REPO / "bench"))  # the scripts import their neighbours, as when run from there
    spec = importlib.util.spec_from_file_location(f"docs_{Path(target).stem}", REPO / target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("case, target, args", CASES, ids=[c for c, _, _ in CASES])
def test_a_documented_command_parses(case, target, args, monkeypatch):
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, *a, **k):
        original(self, *a, **k)  # an unknown or malformed flag ends here, in parser.error (SystemExit 2)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    monkeypatch.setattr(sys, "argv", [target, *args])
    main = _main(target)
    with pytest.raises(Parsed):
        main()
