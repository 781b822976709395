"""Safe decoding of untrusted image uploads into RGB PIL images.

Order matters: the header is parsed lazily first and the pixel count checked against the limit
BEFORE any pixel is decoded, so a decompression bomb (a small file claiming a huge canvas) is
refused without allocating it. Pillow's own bomb guard (`Image.MAX_IMAGE_PIXELS`) is set to the
same limit as a second line. The HTTP workers decode small images on the event loop and larger ones
on a thread pool (uploads.py).
"""

from __future__ import annotations

import io
import logging
import re
import warnings

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from service.errors import ServiceError

log = logging.getLogger(__name__)

FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
_SIXTEEN_BIT = {"I", "I;16", "I;16L", "I;16B", "I;16N"}
_ALPHA = {"RGBA", "RGBa", "LA", "La", "PA"}
_SIGNATURES = {"JPEG": (b"\xff\xd8\xff",), "PNG": (b"\x89PNG\r\n\x1a\n",), "GIF": (b"GIF87a", b"GIF89a"),
               "BMP": (b"BM",), "TIFF": (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")}
_BACKGROUND = (255, 255, 255)  # transparent pixels are shown on white, as a browser would

# Our explicit check refuses anything above the limit, so Pillow's warning zone is redundant noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class ImageRejected(ServiceError):
    """An upload the service refuses; its `error` code is the `reason` label of `mmap_images_rejected_total`."""


def set_pillow_pixel_limit(max_pixels: int) -> None:
    """Pillow's process-wide bomb guard: it raises for images above twice this many pixels."""
    Image.MAX_IMAGE_PIXELS = max_pixels


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode an upload (JPEG, PNG, WebP, BMP, GIF first frame, TIFF first page) to an RGB image.

    EXIF orientation is applied. Raises `ImageRejected`: 413 above `max_pixels`, 415 for
    anything that is not one of the supported formats, 422 for an empty, truncated or corrupt file.
    """
    return load_image(open_image(data, max_pixels))


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """The upload's header, checked (format, pixel count), with no pixel decoded yet: `decode_image`'s first half."""
    if not data:
        raise ImageRejected(422, "empty", "the upload is empty")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
    except Image.DecompressionBombError as e:  # Pillow's message quotes its own guard, twice the limit
        found = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(found[1])} pixels" if found else "more than twice that many pixels"
        raise ImageRejected(413, "too_many_pixels", f"image is {size}; the limit is {max_pixels}") from e
    except UnidentifiedImageError as e:
        claimed = _claimed_format(data)
        if claimed:  # Pillow reports a broken file of a known format as unidentified too
            raise ImageRejected(422, "corrupt",
                                f"starts like a {claimed} file but cannot be read (truncated or corrupt)") from e
        raise ImageRejected(415, "unsupported_type", f"not a supported image; send one of {', '.join(FORMATS)}") from e
    except Exception as e:  # a recognised format whose header is broken: Pillow raises many types
        raise ImageRejected(422, "corrupt", f"corrupt image header: {type(e).__name__}: {e}") from e
    width, height = image.size
    if width * height > max_pixels:
        raise ImageRejected(413, "too_many_pixels",
                            f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
    if width < 1 or height < 1:
        raise ImageRejected(422, "corrupt", f"image has an empty canvas ({width}x{height})")
    return image


def load_image(image: Image.Image) -> Image.Image:
    """The pixels of an image from `open_image`, oriented and in RGB: `decode_image`'s second half."""
    try:
        image.load()
        image = _apply_orientation(image)
        return to_rgb(image)
    except Exception as e:  # truncated data, broken chunks, unsupported sub-formats: all undecodable
        raise ImageRejected(422, "corrupt",
                            f"cannot decode this {image.format} image (truncated or corrupt): "
                            f"{type(e).__name__}: {e}") from e


def plain_jpeg(image: Image.Image) -> bool:
    """A JPEG (from `open_image`) that decodes to the same RGB on any decoder: RGB or greyscale, no EXIF
    rotation (the engine's decoder neither converts CMYK like Pillow nor rotates on CUDA)."""
    if image.format != "JPEG" or image.mode not in ("RGB", "L"):
        return False
    try:
        return image.getexif().get(ExifTags.Base.Orientation, 1) == 1
    except Exception:  # unreadable EXIF: let the worker's Pillow path decide, as it does for every other file
        return False


def _claimed_format(data: bytes) -> str | None:
    """The supported format whose signature the data starts with, if any."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for fmt, signatures in _SIGNATURES.items() if data.startswith(signatures)), None)


def _apply_orientation(image: Image.Image) -> Image.Image:
    """EXIF orientation; a broken EXIF block costs the rotation, not the request."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception as e:  # EXIF parsing is lenient elsewhere too (browsers ignore bad tags)
        log.info("ignoring unreadable EXIF orientation: %s", e)
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB.

    16-bit samples are scaled to 8 bit (Pillow's convert would clip them, turning most of the
    image white); alpha, including palette transparency, is composited on white (dropping it
    would expose whatever colour the transparent pixels happen to store).
    """
    if image.mode in _SIXTEEN_BIT:
        samples = np.clip(np.asarray(image, dtype=np.float64), 0, 65535) / 257.0
        image = Image.fromarray(np.round(samples).astype(np.uint8), "L")
    if image.mode in _ALPHA or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*_BACKGROUND, 255)), rgba).convert("RGB")
    return image.convert("RGB")
