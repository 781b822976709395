"""Zero-shot prompts and the captions pretraining pairs with images."""

from __future__ import annotations

import numpy as np

from .classes import _OBJECTS
from .domains import DOMAINS
from .render import _check

# ---------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------

# Hand-written zero-shot prompt.  "a ... of a {classname}" keeps the CLIP
# convention (no a/an agreement); domain words are chosen to start with a consonant.
ZERO_SHOT_TEMPLATE = "a {domain} of a {classname}."
PROMPT_DOMAIN_WORDS: dict[str, str] = {
    "sketch": "sketch",
    "quickdraw": "doodle",
    "clipart": "clipart",
    "infograph": "graphic",
    "photo": "photo",
    "painting": "painting",
    "product": "product photo",
}


def prompt_text(classname: str, domain: str | None = None) -> str:
    """Zero-shot prompt, e.g. ``"a photo of a apple."`` or ``"a sketch of a apple."``."""
    if domain is not None and domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; valid: {', '.join(DOMAINS)}")
    word = "photo" if domain is None else PROMPT_DOMAIN_WORDS[domain]
    return ZERO_SHOT_TEMPLATE.format(domain=word, classname=classname)


_DOMAIN_SYNONYMS: dict[str, tuple[str, ...]] = {
    "sketch": ("sketch", "pencil sketch", "line drawing", "drawing"),
    "quickdraw": ("quick doodle", "doodle", "quick drawing", "scribble"),
    "clipart": ("clipart", "clip art illustration", "cartoon", "vector illustration"),
    "infograph": ("infographic", "infographic icon", "chart illustration", "diagram"),
    "photo": ("photo", "photograph", "picture", "snapshot"),
    "painting": ("painting", "oil painting", "artwork", "painted picture"),
    "product": ("product photo", "catalog photo", "studio shot", "product shot"),
}
_BACKDROPS: dict[str, str] = {
    "sketch": "paper",
    "quickdraw": "a white page",
    "clipart": "a plain background",
    "infograph": "a pastel chart",
    "photo": "a cluttered background",
    "painting": "canvas",
    "product": "white",
}
_SIZES = ("small", "large", "big", "tiny", "little")
_CAPTION_TEMPLATES = (
    "{dom_np} of {obj_np}.",
    "{dom_np} of the {cls}.",
    "{dom_np} showing {obj_np}.",
    "{dom_np} depicting {obj_np}.",
    "{obj_np} in {dom} style.",
    "there is {obj_np} in this {dom}.",
    "this is {dom_np} of {obj_np}.",
    "{dom_np} of the {cls} on {backdrop}.",
    "{dom_np}: {cls}.",
    "close-up {dom} of {obj_np}.",
    "{obj_np}, shown as {dom_np}.",
    "my {dom} of {obj_np}.",
    "{dom_np} featuring the {colour} {cls}.",
)


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def caption(class_index: int, domain: str, rng: np.random.Generator) -> str:
    """Random natural caption naming the class, the domain (or a synonym) and attributes."""
    _check(class_index, domain)
    obj = _OBJECTS[class_index]
    dom = str(rng.choice(_DOMAIN_SYNONYMS[domain]))
    size = str(rng.choice(_SIZES))
    obj_phrase = (
        obj.name,
        f"{obj.colour_word} {obj.name}",
        f"{size} {obj.name}",
        f"{size} {obj.colour_word} {obj.name}",
    )[int(rng.integers(4))]
    template = _CAPTION_TEMPLATES[int(rng.integers(len(_CAPTION_TEMPLATES)))]
    return template.format(
        dom=dom,
        dom_np=_a(dom),
        obj_np=_a(obj_phrase),
        cls=obj.name,
        colour=obj.colour_word,
        backdrop=_BACKDROPS[domain],
    )
