"""MmAP model library: a frozen open_clip CLIP, deep multi-modal prompts, and the prompt-set format.

Names are imported on first use (PEP 562), so `import mmap_model.embedded` and the settings of a
process that never runs the model (the service's HTTP workers) do not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {
    "EMBEDDED_MODEL": "embedded", "EMBEDDED_PRETRAINED": "embedded", "EMBEDDED_PROMPTS_DIR": "embedded",
    "Backbone": "backbone", "UnsupportedBackboneError": "backbone", "Widths": "backbone",
    "count_parameters": "backbone", "load_backbone": "backbone",
    "PromptedCLIP": "encoders", "class_text_features": "encoders", "prompt_texts": "encoders",
    "ClassTexts": "encoders", "many_class_text_features": "encoders",
    "METHODS": "prompts", "MultiTaskPrompts": "prompts", "PromptConfig": "prompts", "PromptModule": "prompts",
    "Prompts": "prompts",
    "calibrated_logits": "calibration", "calibrated_probabilities": "calibration",
    "FORMAT_VERSION": "promptset", "PromptSet": "promptset", "PromptSetError": "promptset", "TaskSpec": "promptset",
}
__all__ = [
    "ClassTexts", "EMBEDDED_MODEL", "EMBEDDED_PRETRAINED", "EMBEDDED_PROMPTS_DIR", "FORMAT_VERSION", "METHODS",
    "Backbone", "MultiTaskPrompts",
    "PromptConfig", "PromptModule", "PromptSet", "PromptSetError", "PromptedCLIP", "Prompts", "TaskSpec",
    "UnsupportedBackboneError", "Widths", "calibrated_logits", "calibrated_probabilities", "class_text_features",
    "count_parameters", "load_backbone",
    "many_class_text_features", "prompt_texts",
]

if TYPE_CHECKING:
    from .backbone import Backbone, UnsupportedBackboneError, Widths, count_parameters, load_backbone
    from .calibration import calibrated_logits, calibrated_probabilities
    from .embedded import EMBEDDED_MODEL, EMBEDDED_PRETRAINED, EMBEDDED_PROMPTS_DIR
    from .encoders import ClassTexts, PromptedCLIP, class_text_features, many_class_text_features, prompt_texts
    from .prompts import METHODS, MultiTaskPrompts, PromptConfig, PromptModule, Prompts
    from .promptset import FORMAT_VERSION, PromptSet, PromptSetError, TaskSpec


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'mmap_model' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value
