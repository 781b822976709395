"""Where the embedded default lives: a tiny CLIP shipped inside this package (no torch import here)."""

from __future__ import annotations

from pathlib import Path

EMBEDDED_MODEL = "mmap-tiny"
EMBEDDED_PRETRAINED = "embedded"
EMBEDDED_DIR = Path(__file__).parent / "weights" / EMBEDDED_MODEL
EMBEDDED_PROMPTS_DIR = EMBEDDED_DIR / "promptsets"  # demo prompt sets trained on the embedded default
