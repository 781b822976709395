"""Uploads, in an HTTP worker: read and check the body, decode it, and preprocess it to uint8 pixels.

`read_upload` takes the image bytes of multipart fields `file` or of a raw image/* body (and the
other form fields), refusing more than the limit before reading where the client declares its
length, and as soon as it is exceeded otherwise.
`Preprocessor` is open_clip's eval transform up to, not including, ToTensor and
Normalize: resize (PIL, the same call torchvision makes) and center crop, giving [H, W, 3] uint8.
The engine divides by 255 and normalises on its device, so the whole pipeline is bit-identical to
open_clip's own transform while a quarter of the bytes cross to the engine and the device.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from service.errors import ServiceError

from .images import ImageRejected, load_image, open_image

CLIENT_CLOSED = 499  # nginx's status for a request its client abandoned
MULTIPART_OVERHEAD = 64 << 10  # boundary and part headers around the file in a multipart body
RAW_TYPES = ("image/", "application/octet-stream")
QUICK_PIXELS = 256 * 256  # an image this small decodes and resizes in about a millisecond at most ...
QUICK_RESIZED_PIXELS = 512 * 512  # ... if its resize is no larger (a 4:3 image resized to 224 px is 298 x 224)
RESIZE_ALLOWANCE = 16  # a resize of up to 16x the model's input area is always allowed (a 16:1 panorama)
PIL_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
               "nearest": Image.Resampling.NEAREST}


class ByteBudget:
    """The bytes of upload bodies one worker holds at once (being read, parsed or decoded), at most `limit`:
    beyond it a request gets 503 `busy` instead of the worker's memory. Used on the worker's event loop only."""

    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0

    @contextmanager
    def hold(self) -> Iterator[Held]:
        """What one request takes from the budget; all of it is given back when the request's upload is done."""
        held = Held(self)
        try:
            yield held
        finally:
            self.held -= held.bytes


class Held:
    def __init__(self, budget: ByteBudget):
        self.budget = budget
        self.bytes = 0

    def take(self, n: int) -> None:
        if self.budget.held + n > self.budget.limit:
            raise ServiceError(503, "busy", f"this worker holds {self.budget.held} bytes of uploads, and "
                                            f"{n} more would pass its limit of {self.budget.limit} "
                                            "(max_inflight_bytes); retry shortly", {"Retry-After": "1"})
        self.budget.held += n
        self.bytes += n


@dataclass
class Upload:
    """What a request body brought: its images (in order) and its other form fields. In a JSON body of a batch
    (bodies.py) an image that could not be had (bad base64, too large, a failed fetch) is its refusal instead,
    answered as that image's own error."""

    files: list[bytes | ServiceError]
    fields: dict[str, str]


async def read_upload(request: Request, held: Held, max_bytes: int, body_timeout_s: float,
                      max_files: int = 1) -> Upload:
    """The images of a raw image/* body or of multipart fields `file` (at most `max_files`), and the body's other
    form fields (ImageRejected otherwise). Each image may have `max_bytes`; the body, that many per image. The
    body's bytes are taken from the worker's budget (`held`): its declared length before reading, else each
    piece as it arrives.

    A body that pauses longer than `body_timeout_s` is cut with 408 (nginx's client_body_timeout); a client
    that goes away mid-body is a 499 (nginx's code), which no one receives but the metrics count."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    is_form = media == "multipart/form-data"
    if not is_form and not media.startswith(RAW_TYPES):
        raise ImageRejected(415, "unsupported_type", "send the image as multipart/form-data field 'file' or as a raw "
                                                     f"image/* body (content-type was {media or 'missing'!r})")
    allowed = max_bytes * max_files + (MULTIPART_OVERHEAD if is_form else 0)
    too_large = ImageRejected(413, "upload_too_large", f"upload larger than the limit of {max_bytes} bytes"
                                                       + (f" an image ({max_files} images)" if max_files > 1 else ""))
    body = await read_body(request, held, allowed, too_large, body_timeout_s)
    if is_form:
        upload = await _parse_form(request, body, max_files)
        body.clear()  # the files are copies: free the body now, not when this request ends
    else:
        upload = Upload([bytes(body)], {})
        del body
    if max_files == 1 and len(upload.files[0]) > max_bytes:
        raise too_large
    return upload


async def read_body(request: Request, held: Held, allowed: int, too_large: ServiceError,
                    body_timeout_s: float) -> bytearray:
    """The request's body, at most `allowed` bytes (else `too_large`: before reading where the client declares its
    length, as soon as it is passed otherwise), taken from the worker's budget (`held`): the declared length before
    reading, else each piece as it arrives. 408 after a pause of `body_timeout_s`, 499 when the client goes away."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > allowed:
        raise too_large
    if declared.isdigit():
        held.take(int(declared))
    body = bytearray()
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(body_timeout_s) as pause:  # one deadline, moved on with every piece
            async for chunk in request.stream():
                body += chunk
                if len(body) > allowed:
                    raise too_large
                if len(body) > held.bytes:  # no declared length (chunked), or more than declared
                    held.take(len(body) - held.bytes)
                pause.reschedule(loop.time() + body_timeout_s)
    except TimeoutError:
        raise ServiceError(408, "body_timeout", f"no part of the upload's body arrived for {body_timeout_s:g} s",
                           {"Connection": "close"}) from None
    except ClientDisconnect:
        raise ServiceError(CLIENT_CLOSED, "client_closed_request", "the client closed the connection before "
                                                                   "the upload was complete") from None
    return body


async def _parse_form(request: Request, body: bytearray, max_files: int) -> Upload:
    async def chunks() -> AsyncIterator[bytes]:
        yield body

    try:  # one file more than allowed, so that "too many" is told apart from a malformed body
        form = await MultiPartParser(request.headers, chunks(), max_files=max_files + 1, max_fields=16).parse()
    except MultiPartException as e:
        raise ImageRejected(422, "corrupt", f"malformed multipart body: {e}") from e
    try:
        files = [f for f in form.getlist("file") if isinstance(f, UploadFile)]
        if not files:
            raise ImageRejected(422, "missing_file", "the multipart body has no file field named 'file'")
        if len(files) > max_files:
            raise ImageRejected(413 if max_files > 1 else 422, "too_many_images",
                                f"at most {max_files} images a request" if max_files > 1 else
                                "/classify and /embed take one image: send several to /classify/batch")
        return Upload([await f.read() for f in files], {k: v for k, v in form.multi_items() if isinstance(v, str)})
    finally:
        await form.close()


class Preprocessor:
    """Decoded upload -> [H, W, 3] uint8 at the model's input size, as open_clip's eval transform makes it.

    `cfg` holds open_clip's PreprocessCfg fields. Supported: resize_mode "shortest" with a square size
    (torchvision Resize of the short side, then CenterCrop) and "squash" (Resize to (H, W)); others
    raise ValueError at start-up rather than serve different pixels.
    """

    def __init__(self, cfg: dict[str, Any], max_pixels: int):
        size = cfg["size"]
        self.height, self.width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.mode = cfg.get("resize_mode", "shortest")
        if self.mode not in ("shortest", "squash") or (self.mode == "shortest" and self.height != self.width):
            raise ValueError(f"the workers cannot preprocess resize_mode={self.mode!r} at size {size}")
        interpolation = cfg.get("interpolation", "bicubic")
        if interpolation not in PIL_FILTERS:
            raise ValueError(f"the workers cannot preprocess interpolation={interpolation!r}")
        self.filter = PIL_FILTERS[interpolation]
        self.max_pixels = max_pixels

    def __call__(self, data: bytes) -> np.ndarray:
        """Decode (safely, see images.py) and preprocess one upload."""
        return self.finish(self.open(data))

    def open(self, data: bytes) -> Image.Image:
        """The upload's checked header (see images.open_image); `finish` decodes and preprocesses it.

        Its resize is checked too: a short side of one pixel and a long side of a thousand (a 92-byte PNG)
        resize to 224 x 224,000, seconds of CPU and 150 MB. A resize larger than `max_pixels` and than
        `RESIZE_ALLOWANCE` times the model's input is a 413 as well."""
        image = open_image(data, self.max_pixels)
        width, height = self.resized_size(image)
        if width * height > max(self.max_pixels, RESIZE_ALLOWANCE * self.height * self.width):
            raise ImageRejected(413, "too_many_pixels",
                                f"image is {image.width}x{image.height}: its resize for the model would be "
                                f"{width}x{height} = {width * height} pixels, and the limit is {self.max_pixels}; "
                                "send it cropped to a less extreme aspect ratio")
        return image

    def quick(self, image: Image.Image) -> bool:
        """Decoding and preprocessing it takes about a millisecond at most (less than a hand-off to a thread)."""
        width, height = self.resized_size(image)
        return image.width * image.height <= QUICK_PIXELS and width * height <= QUICK_RESIZED_PIXELS

    def finish(self, image: Image.Image) -> np.ndarray:
        return self.pixels(load_image(image))

    def resized_size(self, image: Image.Image) -> tuple[int, int]:
        """(width, height) of the image after the resize, before the crop."""
        width, height = image.size
        if self.mode == "squash":
            return self.width, self.height
        # torchvision's _compute_resized_output_size for an int size: the short side becomes `size`
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.height * long / short)
        return (self.height, new_long) if width <= height else (new_long, self.height)

    def pixels(self, image: Image.Image) -> np.ndarray:
        target = self.resized_size(image)
        if target != image.size:
            image = image.resize(target, self.filter)
        if image.size != (self.width, self.height):  # torchvision's center_crop (the resize never undershoots)
            left = int(round((image.size[0] - self.width) / 2.0))
            top = int(round((image.size[1] - self.height) / 2.0))
            image = image.crop((left, top, left + self.width, top + self.height))
        return np.asarray(image, dtype=np.uint8)
