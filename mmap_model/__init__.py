"""MmAP model library: a frozen open_clip CLIP, deep multi-modal prompts, and the prompt-set format."""

from .backbone import (
    EMBEDDED_MODEL,
    EMBEDDED_PRETRAINED,
    EMBEDDED_PROMPTS_DIR,
    Backbone,
    UnsupportedBackboneError,
    Widths,
    count_parameters,
    load_backbone,
)
from .encoders import PromptedCLIP, class_text_features, prompt_texts
from .prompts import METHODS, MultiTaskPrompts, PromptConfig, PromptModule, Prompts
from .promptset import FORMAT_VERSION, PromptSet, PromptSetError, TaskSpec

__all__ = [
    "EMBEDDED_MODEL", "EMBEDDED_PRETRAINED", "EMBEDDED_PROMPTS_DIR", "FORMAT_VERSION", "METHODS", "Backbone", "MultiTaskPrompts",
    "PromptConfig", "PromptModule", "PromptSet", "PromptSetError", "PromptedCLIP", "Prompts", "TaskSpec",
    "UnsupportedBackboneError", "Widths", "class_text_features", "count_parameters", "load_backbone", "prompt_texts",
]
