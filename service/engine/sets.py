"""Reading one prompt set from the prompt directory, which is untrusted: symlinks are followed only while they
stay inside it (the set, its two files, its samples), and the weights file is size-limited before it is read
(`PromptSet.load`). Sample images for the web page: `<name>/samples/<task>/*.{png,jpg,jpeg,webp}`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from mmap_model import Backbone, PromptSet, PromptSetError

log = logging.getLogger(__name__)

SAMPLE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}
MAX_SAMPLE_BYTES = 8 * 1024 * 1024  # a sample image above this is not served
MAX_SAMPLES = 8


@dataclass
class SetRead:
    """A set read and validated, its text features not yet computed."""

    name: str
    path: Path
    prompt_set: PromptSet
    published_ns: int
    samples: dict[str, tuple[str, ...]]  # task -> the file names of its sample images


def inside(path: Path, root: Path) -> bool:
    """`path`, with every symlink followed, is within `root` (an already resolved directory)."""
    return path.resolve().is_relative_to(root)


def read_set(directory: Path, name: str, backbone: Backbone, published_ns: int) -> SetRead:
    """`<directory>/<name>`, validated against `backbone`; PromptSetError (or an OSError) when it cannot be."""
    path = directory / name
    if not path.is_dir():
        raise PromptSetError(f"{path}: no such prompt-set directory")
    root = directory.resolve()
    ps = PromptSet.load(path, backbone, within=root)  # untrusted: no symlink may lead out of root
    if ps.name != name:
        log.warning("prompt set in %s calls itself %r; it is served as %r (its directory name)", path, ps.name, name)
    samples = {}
    for task in ps.tasks:
        sample_dir = path / "samples" / task
        samples[task] = (tuple(sorted(p.name for p in sample_dir.glob("*") if p.suffix.lower() in SAMPLE_TYPES
                                      and p.is_file() and inside(p, root))[:MAX_SAMPLES])
                         if sample_dir.is_dir() else ())
    return SetRead(name, path, ps, published_ns, samples)
