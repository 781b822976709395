"""The inference service: HTTP worker processes in front of one engine process that owns the frozen CLIP
and its hot-swappable MmAP prompt sets (docs/architecture.md). `python -m service` starts it all."""

from .settings import Settings

__all__ = ["Settings"]
