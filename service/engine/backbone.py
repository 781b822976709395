"""The backbone a service's settings name, loaded by the project's one factory (`mmap_model.load_backbone`)."""

from __future__ import annotations

import logging

from mmap_model import Backbone, load_backbone
from service.settings import Settings

log = logging.getLogger(__name__)


def load_configured_backbone(settings: Settings) -> Backbone:
    """The backbone the settings name; seeded random weights only when asked for explicitly."""
    seed = settings.random_seed
    try:
        if seed is None:
            if settings.pretrained is None:
                log.warning("serving RANDOM weights (pretrained=none): predictions are meaningless")
            return load_backbone(settings.model, settings.pretrained, settings.device, settings.precision)
        log.warning("serving RANDOM weights (seed %d): for tests and benchmarks only", seed)
        return load_backbone(settings.model, None, settings.device, settings.precision, seed=seed)
    except FileNotFoundError as e:
        raise RuntimeError(f"cannot load the backbone: {e}. Or serve another one with --model/--pretrained "
                           "(MMAP_MODEL/MMAP_PRETRAINED); the service does not fall back to random weights") from e
