"""MmAP's coupling of rank r and selectable d_s (docs/method.md, "Coupling rank").

Rank 1 must be today's formulation bit for bit, and prompt sets written before `rank` existed
must load and score exactly as they did: `tests/data/demo_promptset_scores.json` holds the demo
sets' scores computed by the code before the change (regenerate only on purpose:
`python -m tests.test_prompt_rank`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mmap_model import (
    EMBEDDED_MODEL,
    EMBEDDED_PRETRAINED,
    EMBEDDED_PROMPTS_DIR,
    MultiTaskPrompts,
    PromptConfig,
    PromptedCLIP,
    PromptSet,
    Widths,
    class_text_features,
    load_backbone,
)
from mmap_model.prompts import MmAPPrompt

SCORES = Path(__file__).parent / "data" / "demo_promptset_scores.json"
WIDTHS = Widths(d_t=64, d_v=96, embed_dim=64, layers_t=3, layers_v=3)


def demo_scores(backbone) -> dict[str, list[list[float]]]:
    """Cosine similarity of 4 seeded images to every class text, per demo set and task, under its prompts."""
    clip = PromptedCLIP(backbone.model).eval()
    images = torch.rand(4, 3, backbone.image_size, backbone.image_size, generator=torch.Generator().manual_seed(0))
    out = {}
    for directory in sorted(p.parent for p in EMBEDDED_PROMPTS_DIR.glob("*/promptset.json")):
        promptset = PromptSet.load(directory, backbone)
        for task, spec in promptset.tasks.items():
            with torch.no_grad():
                prompts = promptset.prompts(task)
                text = class_text_features(clip, backbone.tokenizer, spec.classnames, spec.template, prompts.text)
                image = clip.encode_image(images, prompts.visual, normalize=True)
            out[f"{directory.name}/{task}"] = (image @ text.T).tolist()
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    SCORES.parent.mkdir(exist_ok=True)
    SCORES.write_text(json.dumps(demo_scores(load_backbone(EMBEDDED_MODEL, EMBEDDED_PRETRAINED))) + "\n")
