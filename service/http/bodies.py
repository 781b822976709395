"""JSON bodies of the upload routes: the images base64-encoded, or as URLs the worker fetches.

POST /classify and /embed take `{"image": "<base64>"}` or `{"url": "https://..."}`, /classify/batch
`{"images": [...]}` or `{"urls": [...]}`, each with an optional `"labels": [...]` (not /embed); a data URI
(`data:image/png;base64,...`) is base64 too. A body is JSON when its content-type is application/json; anything
else goes to uploads.read_upload as before. The limits are those of a multipart upload, counted on the decoded
bytes (max_upload_bytes an image, max_images a batch); the body may be as large as its images base64-encoded. URLs
need fetch_urls (fetch.py guards them). In a batch each image that cannot be had (bad base64, too large, a failed
fetch) is that image's own error, as a corrupt file of a multipart batch is.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Awaitable

import msgspec
from starlette.requests import Request

from service.errors import ServiceError
from service.schema import ImageBody
from service.settings import Settings

from .fetch import MAX_URL_CHARS, Fetcher
from .images import ImageRejected
from .uploads import Held, Upload, read_body, read_upload

JSON_MEDIA = "application/json"
JSON_OVERHEAD = 64 << 10  # braces, field names, a data URI's header
DATA_URI_HEADER = 256  # "data:image/png;base64," and kin
_decode_body = msgspec.json.Decoder(ImageBody).decode


def is_json(request: Request) -> bool:
    return request.headers.get("content-type", "")[:16].lower() == JSON_MEDIA


def base64_limit(max_bytes: int) -> int:
    """Characters of base64 that `max_bytes` bytes take."""
    return 4 * -(-max_bytes // 3)


def decode_base64(text: str, max_bytes: int, what: str) -> bytes:
    """The bytes of base64 `text` (standard alphabet, padded; a data URI too; line breaks ignored), at most
    `max_bytes` (413, before decoding where the text is longer than they take); 422 `invalid_base64` otherwise."""
    if text.startswith("data:"):
        header, comma, text = text.partition(",")
        if not comma or not header.lower().endswith(";base64"):
            raise ImageRejected(422, "invalid_base64", f"{what}: a data URI must be data:<type>;base64,<data>")
    if "\n" in text:  # MIME-style lines (base64 without -w0)
        text = "".join(text.split())
    if len(text) > base64_limit(max_bytes):
        raise ImageRejected(413, "upload_too_large", f"{what} is larger than the limit of {max_bytes} bytes")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageRejected(422, "invalid_base64", f"{what} is not valid base64 (standard alphabet, padded): "
                                                   f"{e}") from None
    if len(data) > max_bytes:
        raise ImageRejected(413, "upload_too_large", f"{what} is larger than the limit of {max_bytes} bytes")
    return data


async def read_images(request: Request, held: Held, settings: Settings, max_files: int = 1,
                      labels: bool = True) -> Upload:
    """The images of an upload route's body: a JSON body (below), else multipart or raw (uploads.read_upload)."""
    if not is_json(request):
        return await read_upload(request, held, settings.max_upload_bytes, settings.body_timeout_s, max_files)
    return await read_json(request, held, settings, max_files, labels)


async def read_json(request: Request, held: Held, settings: Settings, max_files: int, labels: bool) -> Upload:
    """The images of a JSON body: one (`image` or `url`; any refusal raises) or, with `max_files` > 1, several
    (`images` or `urls`; an image's refusal is its entry of `Upload.files`); `labels` (a JSON array) as the form
    field `labels`."""
    batch = max_files > 1
    one, many = ("images", "urls") if batch else ("image", "url")
    per_image = base64_limit(settings.max_upload_bytes) + DATA_URI_HEADER
    allowed = max_files * max(per_image, MAX_URL_CHARS) + JSON_OVERHEAD + (
        settings.max_labels * (6 * settings.max_label_chars + 4) if labels else 0)  # 6: a \uXXXX escape
    too_large = ImageRejected(413, "upload_too_large", f"JSON body larger than its {max_files} image(s) of "
                                                       f"{settings.max_upload_bytes} bytes base64-encoded take")
    body = await read_body(request, held, allowed, too_large, settings.body_timeout_s)
    try:
        parsed = _decode_body(body)
    except msgspec.ValidationError as e:
        raise ServiceError(422, "invalid_body", f"JSON body: {e}") from None
    except msgspec.DecodeError as e:
        raise ServiceError(422, "invalid_json", f"the body is not valid JSON: {e}") from None
    finally:
        body.clear()
    given = [name for name in ("image", "images", "url", "urls") if getattr(parsed, name) is not None]
    if given and given != [one] and given != [many]:
        raise ServiceError(422, "invalid_body", f"this route takes {one!r} or {many!r}" + (
            "" if batch else " (several images: POST /classify/batch with 'images' or 'urls')")
                           + f", one of them; the body has {', '.join(map(repr, given))}")
    if parsed.labels is not None and not labels:
        raise ServiceError(422, "invalid_body", "this route takes no labels")
    fields = {"labels": msgspec.json.encode(parsed.labels).decode()} if parsed.labels is not None else {}
    if not given:
        raise ImageRejected(422, "missing_file", f"the JSON body has no image: give {one!r} (base64) or {many!r}")
    key = given[0]
    values = getattr(parsed, key)
    items = values if batch else [values]
    if not items:
        raise ServiceError(422, "invalid_body", f"{key!r} is empty")
    if len(items) > max_files:
        raise ImageRejected(413, "too_many_images", f"at most {max_files} images a request")
    if key in ("url", "urls"):
        fetcher: Fetcher | None = request.app.state.fetcher
        if fetcher is None:
            raise ServiceError(403, "fetch_disabled", "this service does not fetch image URLs (fetch_urls): send "
                                                      f"the image itself, base64-encoded, as {one!r}")
        got = await asyncio.gather(*(_or_refusal(fetcher.fetch(url, held), batch) for url in items))
    else:
        # (the decoded bytes are not taken from the budget again: the body's were, as a multipart body's are)
        got = [_decoded(text, settings.max_upload_bytes, f"image {i}" if batch else "the image", batch)
               for i, text in enumerate(items)]
    return Upload(got, fields)


def _decoded(text: str, max_bytes: int, what: str, batch: bool) -> bytes | ServiceError:
    try:
        return decode_base64(text, max_bytes, what)
    except ServiceError as e:
        if not batch:
            raise
        return e


async def _or_refusal(fetched: Awaitable[bytes], batch: bool) -> bytes | ServiceError:
    try:
        return await fetched
    except ServiceError as e:
        if not batch:
            raise
        return e
