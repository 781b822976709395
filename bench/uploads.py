"""Synthetic photo-like JPEG uploads for the benchmarks: smooth colour blobs plus noise, quality 90."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def synthetic_jpegs(n: int, height: int, width: int | None = None, seed: int = 0) -> list[bytes]:
    """`n` JPEGs of height x width (square when width is None), deterministic by seed."""
    width = width or height
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    images = []
    for _ in range(n):
        canvas = np.zeros((height, width, 3))
        for _ in range(5):
            (cy, cx), r = rng.uniform(0, [height, width]), rng.uniform(10, height / 2)
            canvas += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None] * rng.uniform(0, 255, 3)
        canvas += rng.normal(0, 8, canvas.shape)  # texture, so the JPEG is not trivially small
        buffer = io.BytesIO()
        Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
        images.append(buffer.getvalue())
    return images
