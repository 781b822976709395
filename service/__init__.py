"""The inference service: FastAPI over a frozen CLIP with hot-swappable MmAP prompt sets."""

from .app import create_app
from .settings import Settings

__all__ = ["Settings", "create_app"]
