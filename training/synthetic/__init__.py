"""Offline procedural multi-domain image dataset (stand-in for Office-Home / DomainNet).

Every class is a procedurally drawn object: a distinctive silhouette built from a
few polygons / polylines in a canonical colour scheme (e.g. "traffic light" is a
dark box with red, yellow and green discs).  Seven domains render the same
geometry in clearly different styles, with a planted *family* structure:

==========  =========  =====================================================
family      domain     style
==========  =========  =====================================================
line        sketch     thin dark-tinted double strokes on paper-white
line        quickdraw  thick wobbly strokes in the class hue on pure white
flat        clipart    flat saturated fill + black outline, plain light bg
flat        infograph  flat fill on pastel bg with bar/text decorations
textured    photo      shaded object, noisy textured bg, lighting gradient
textured    painting   shaded, blurred, brush-streak texture, warm canvas
textured    product    shaded object on white with a soft drop shadow
==========  =========  =====================================================

Within a domain, position, scale, rotation, mirroring, colour, background and
distractor clutter vary per image.  Everything is deterministic: the pixels of
``image(class_index, domain, index, seed)`` depend only on those four values
(a per-image ``np.random.SeedSequence([seed, domain_idx, class_idx, index])``).

Label maps are drawn at 2x and box-downsampled to anti-alias edges; per-pixel effects run in Pillow
at the output size (its speed: docs/benchmarks.md, "Synthetic data").

Modules: `domains` (the seven domains and their families), `shapes` (geometry and the part builders),
`classes` (the class table), `render` (drawing a class in a domain's style), `text` (zero-shot prompts
and captions), `tree` (writing ImageFolder trees; the command line).

CLI::

    python -m training.synthetic --out DIR --per-class N [--size PX] [--domains a,b] [--seed S]

writes ``DIR/<domain>/<class_folder>/<index:05d>.png`` (ImageFolder per domain).
"""

from .classes import CLASSES, class_folder, class_name_from_folder
from .domains import DOMAINS, FAMILIES
from .render import batch, image, render
from .text import PROMPT_DOMAIN_WORDS, ZERO_SHOT_TEMPLATE, caption, prompt_text
from .tree import main, write_tree

__all__ = [
    "CLASSES",
    "DOMAINS",
    "FAMILIES",
    "PROMPT_DOMAIN_WORDS",
    "ZERO_SHOT_TEMPLATE",
    "batch",
    "caption",
    "class_folder",
    "class_name_from_folder",
    "image",
    "main",
    "prompt_text",
    "render",
    "write_tree",
]
