"""The project documents itself: every document the code, README or docs cite exists in the repository."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CITED = re.compile(r"\b((?:docs|service|deploy|bench)/[\w./-]+\.md)\b")


def test_every_cited_document_exists():
    sources = [*REPO.glob("*.md"), *REPO.glob("docs/*.md"),
               *(p for d in ("mmap_model", "training", "service", "bench", "deploy") for p in (REPO / d).rglob("*.py"))]
    cited = {(src.relative_to(REPO), ref) for src in sources for ref in CITED.findall(src.read_text())}
    assert cited, "no citation found: the pattern is broken"
    missing = sorted((str(src), ref) for src, ref in cited if not (REPO / ref).is_file())
    assert not missing, missing


def test_no_file_cites_design_notes_outside_the_repository():
    for d in ("mmap_model", "training", "service", "bench"):
        for path in (REPO / d).rglob("*.py"):
            text = path.read_text()
            assert "METHOD.md" not in text and "ARCHITECTURE.md" not in text, path
