"""Hostile uploads through the HTTP API, each built inside the test: every one gets its documented status and a
JSON error (or, for the odd-but-valid ones, the same answer as its plain equivalent), bodies over the byte limit
are refused without being read whole, and a loop of good requests running alongside never fails.

Documented answers (service/README.md): 413 over `max_upload_bytes` or `max_image_pixels` (read from the header,
before decoding), 415 not a supported image (JPEG, PNG, WebP, BMP, GIF, TIFF; decided by the bytes, never by the
file name or the declared part type), 422 empty, truncated or corrupt, or a malformed multipart body.
"""

from __future__ import annotations

import asyncio
import io
import select
import socket
import struct
import time
import zipfile
import zlib
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
from helpers.images import gif_claiming, png_claiming
from helpers.reliability import GoodTraffic, assert_json_error
from helpers.service import OFFICE, image_bytes, make_set, publish, run, scores, serve, served, settings
from PIL import Image

from service import Settings
from service.http.images import decode_image
from service.http.uploads import MULTIPART_OVERHEAD

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
GOOD_TASKS = ("clipart", "product", "real")
LIMIT_BYTES = 2 << 20  # the tests' upload limit; the pixel limit is the default (40 M)


@pytest.fixture(scope="module")
def prompts_dir(tiny, tmp_path_factory):
    directory = tmp_path_factory.mktemp("prompts")
    publish(make_set(tiny, "office", OFFICE, 1), directory)
    return directory


# ---- building hostile files by hand (headers only: nothing large is ever allocated) ----

def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png16_rgb(pixels: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (colour type 2, depth 16), written chunk by chunk."""
    h, w, _ = pixels.shape
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + png_chunk(b"IDAT", zlib.compress(rows)) + png_chunk(b"IEND", b""))


def tiff_claiming(width: int, height: int) -> bytes:
    """A little-endian baseline TIFF whose IFD declares a huge 8-bit gray strip image (no pixel data)."""
    entries = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 8),
               (277, 3, 1), (278, 4, height), (279, 4, min(width * height, 0xFFFFFFFF))]
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value))
        for tag, kind, value in entries) + struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8) + ifd


def _riff_webp(kind: bytes, payload: bytes) -> bytes:
    payload += b"\x00" * (len(payload) % 2)
    chunk = kind + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def webp_lossless_claiming(width: int, height: int) -> bytes:
    """A complete, valid VP8L bitstream of a constant image: five one-symbol prefix codes make every pixel cost
    0 bits, so 16384 x 16384 (the format's maximum, 268 M pixels) fits in 28 bytes."""
    fields = [(width - 1, 14), (height - 1, 14), (0, 1), (0, 3),  # size, no alpha, version 0
              (0, 1), (0, 1), (0, 1)]  # no transform, no colour cache, no meta prefix codes
    fields += [(1, 1), (0, 1), (0, 1), (0, 1)] * 5  # simple code, 1 symbol, 1-bit symbol, symbol 0
    value, shift = 0, 0
    for field, bits in fields:
        value |= field << shift
        shift += bits
    return _riff_webp(b"VP8L", b"\x2f" + value.to_bytes((shift + 7) // 8, "little"))


def webp_extended_claiming(width: int, height: int) -> bytes:
    """A VP8X (extended) header declaring a canvas, then a tiny real frame."""
    canvas = (struct.pack("<I", 0)[:1] + b"\x00\x00\x00" + (width - 1).to_bytes(3, "little")
              + (height - 1).to_bytes(3, "little"))
    frame = webp_lossless_claiming(2, 2)[12:]
    body = b"VP8X" + struct.pack("<I", 10) + canvas + frame
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body


def halves(size=(48, 40)) -> Image.Image:
    w, h = size
    array = np.zeros((h, w, 3), np.uint8)
    array[:, : w // 2] = (230, 40, 20)
    array[:, w // 2:] = (20, 60, 220)
    array[: h // 4] = (250, 250, 40)  # a band on top: every orientation looks different
    return Image.fromarray(array)


def zip_holding(name: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(name, data)
    return buffer.getvalue()


def jpeg_with_comment(comment: bytes) -> bytes:
    """A JPEG carrying an extra COM segment right after SOI (the classic JPEG/HTML polyglot)."""
    jpeg = image_bytes(7, fmt="JPEG")
    return jpeg[:2] + b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment + jpeg[2:]


SCRIPT = b"<script>alert(document.cookie)</script>"
SVG = (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10" onload="alert(1)">'
       + SCRIPT + b"</svg>")
HTML = b"<!doctype html><html><body>" + SCRIPT + b"</body></html>"
PDF = b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"  # Pillow would hand EPS to Ghostscript


@dataclass(frozen=True)
class Hostile:
    name: str
    data: bytes
    status: int
    error: str | None  # None: a 200 answer
    part_type: str = "image/png"  # the declared content type of the multipart part (never trusted)
    filename: str = "upload.png"
    raw_type: str | None = None  # send as a raw body with this content-type instead of multipart


def corpus() -> list[Hostile]:
    png, jpeg = image_bytes(1), image_bytes(2, fmt="JPEG")
    gif = encode(halves(), "GIF")
    return [
        Hostile("zero bytes", b"", 422, "empty"),
        Hostile("zero bytes raw", b"", 422, "empty", raw_type="image/jpeg"),
        Hostile("truncated jpeg", jpeg[: len(jpeg) // 2], 422, "corrupt"),
        Hostile("jpeg soi only", jpeg[:3], 422, "corrupt"),
        Hostile("truncated png", png[: len(png) // 2], 422, "corrupt"),
        Hostile("png signature only", png[:8], 422, "corrupt"),
        Hostile("png, wrong crc", png[:30] + bytes([png[30] ^ 0xFF]) + png[31:], 422, "corrupt"),
        # Wrong declared type or name: the bytes decide.
        Hostile("png named .txt as text/plain", png, 200, None, "text/plain", "notes.txt"),
        Hostile("png named .jpg as image/jpeg", png, 200, None, "image/jpeg", "photo.jpg"),
        Hostile("png with a traversal filename", png, 200, None, "image/png", "../../../etc/passwd"),
        Hostile("png raw as image/gif", png, 200, None, raw_type="image/gif"),
        Hostile("png raw as text/plain", png, 415, "unsupported_type", raw_type="text/plain"),
        Hostile("png raw as application/json (a JSON body)", png, 422, "invalid_json", raw_type="application/json"),
        Hostile("png raw without content-type", png, 415, "unsupported_type", raw_type=""),
        # Decompression bombs: a few bytes declaring a huge canvas.
        Hostile("png 100000^2", png_claiming(100_000, 100_000), 413, "too_many_pixels"),
        Hostile("png 7000^2 (between the limit and Pillow's 2x guard)", png_claiming(7000, 7000), 413,
                "too_many_pixels"),
        Hostile("gif 65535^2", gif_claiming(65_535, 65_535), 413, "too_many_pixels"),
        Hostile("tiff 100000^2", tiff_claiming(100_000, 100_000), 413, "too_many_pixels"),
        Hostile("tiff 8000^2", tiff_claiming(8000, 8000), 413, "too_many_pixels"),
        Hostile("webp lossless 16384^2", webp_lossless_claiming(16_384, 16_384), 413, "too_many_pixels"),
        Hostile("webp extended canvas 16384^2", webp_extended_claiming(16_384, 16_384), 413, "too_many_pixels"),
        # A few pixels whose resize for the model is huge: a short side of 1 px becomes 224.
        Hostile("png 1x60000 (resized at 224 px: 224 x 13.4 M)", encode(halves((1, 60_000)), "PNG"), 413,
                "too_many_pixels"),
        Hostile("png 3000x40 panorama (resized at 224 px: 16,800 x 224)", encode(halves((3000, 40)), "PNG"), 200,
                None),
        # Other formats posing as images (declared image/png, named .png).
        Hostile("svg with script", SVG, 415, "unsupported_type"),
        Hostile("svg raw as image/svg+xml", SVG, 415, "unsupported_type", raw_type="image/svg+xml"),
        Hostile("html", HTML, 415, "unsupported_type"),
        Hostile("pdf", PDF, 415, "unsupported_type"),
        Hostile("zip holding a png", zip_holding("image.png", png), 415, "unsupported_type"),
        Hostile("eps (Ghostscript bait)", EPS, 415, "unsupported_type"),
        Hostile("ico (Pillow reads it; not allowed)", encode(halves((32, 32)), "ICO"), 415, "unsupported_type"),
        Hostile("tga (Pillow reads it; not allowed)", encode(halves(), "TGA"), 415, "unsupported_type"),
        # Polyglots: valid images with something else inside or appended decode as the image; the rest is inert.
        Hostile("gif + zip (GIFAR)", gif + zip_holding("evil.class", b"\xca\xfe\xba\xbe"), 200, None),
        Hostile("jpeg with html in a comment", jpeg_with_comment(HTML), 200, None),
        Hostile("png + appended html", png + HTML, 200, None),
        Hostile("html then a png", HTML + png, 415, "unsupported_type"),
        Hostile("pdf then a jpeg", PDF + jpeg, 415, "unsupported_type"),
    ]


async def send(client: httpx.AsyncClient, case: Hostile, task: str = "clipart") -> httpx.Response:
    if case.raw_type is not None:
        headers = {"content-type": case.raw_type} if case.raw_type else {}
        return await client.post(f"/classify?task={task}", content=case.data, headers=headers)
    return await client.post(f"/classify?task={task}", files={"file": (case.filename, case.data, case.part_type)})


def test_hostile_corpus_gets_documented_answers_while_serving(prompts_dir):
    cases = corpus()

    async def scenario():
        async with serve(settings(prompts_dir, max_upload_bytes=LIMIT_BYTES)) as client:
            async with GoodTraffic(client, GOOD_TASKS) as good:
                started = time.perf_counter()
                responses = await asyncio.gather(*(send(client, case) for case in cases))
                elapsed = time.perf_counter() - started
                await asyncio.sleep(0.2)  # the good loop keeps going after the burst
            wrong = []
            for case, response in zip(cases, responses, strict=True):
                try:
                    if case.error is None:
                        assert response.status_code == 200 and response.json()["predictions"], response.text
                    else:
                        assert_json_error(response, case.status, case.error)
                        assert b"<script" not in response.content  # nothing of the upload is echoed back
                        if case.error == "too_many_pixels":  # the configured limit, never Pillow's own guard (2x)
                            limit = Settings.model_fields["max_image_pixels"].default
                            assert f"the limit is {limit}" in response.json()["detail"], response.text
                except AssertionError as e:
                    wrong.append(f"{case.name}: {e}")
            assert not wrong, "\n".join(wrong)
            good.assert_all_served()
            assert elapsed < 20, f"the corpus took {elapsed:.1f} s: something decoded what it should have refused"

    run(scenario())


def _png(image: Image.Image) -> bytes:
    return encode(image, "PNG")


def _composited_on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


ORIENTATION = {2: [Image.Transpose.FLIP_LEFT_RIGHT], 3: [Image.Transpose.ROTATE_180],
               4: [Image.Transpose.FLIP_TOP_BOTTOM], 5: [Image.Transpose.ROTATE_90, Image.Transpose.FLIP_TOP_BOTTOM],
               6: [Image.Transpose.ROTATE_270], 7: [Image.Transpose.ROTATE_270, Image.Transpose.FLIP_TOP_BOTTOM],
               8: [Image.Transpose.ROTATE_90]}  # EXIF 2.3, tag 0x0112, written out by hand


def _exif_jpeg(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(halves(), "JPEG", quality=95, exif=exif.tobytes())


def _manually_oriented(jpeg: bytes, orientation: int) -> Image.Image:
    image = Image.open(io.BytesIO(jpeg)).convert("RGB")  # Pillow does not apply EXIF on its own
    for op in ORIENTATION[orientation]:
        image = image.transpose(op)
    return image


@pytest.mark.parametrize("orientation", sorted(ORIENTATION))
def test_exif_orientation_preprocesses_like_the_manually_rotated_image(tiny, orientation):
    jpeg = _exif_jpeg(orientation)
    manual = _manually_oriented(jpeg, orientation)
    assert manual.size == ((40, 48) if orientation >= 5 else (48, 40))
    assert np.array_equal(np.asarray(decode_image(jpeg, 10**6)), np.asarray(manual))
    assert tiny.preprocess(decode_image(jpeg, 10**6)).equal(tiny.preprocess(manual))  # the service's _prepare


def test_odd_but_valid_images_score_as_their_plain_equivalent(prompts_dir):
    """Through the service: first frame of an animated GIF, 16-bit PNGs, CMYK JPEG, palette transparency
    and every EXIF orientation give the scores of a plain 8-bit RGB PNG holding the pixels they stand for."""
    red, blue = Image.new("RGB", (32, 24), (220, 30, 30)), Image.new("RGB", (32, 24), (30, 30, 220))
    gray16 = np.linspace(0, 65535, 40 * 30).reshape(30, 40).astype(np.uint16)
    rgb16 = (np.random.default_rng(0).integers(0, 256, (30, 40, 3)) * 257).astype(np.uint16)
    palette = Image.new("P", (30, 20), 0)
    palette.putpalette([0, 0, 0, 200, 10, 10, 10, 200, 10] + [0] * 759)
    for x in range(30):
        for y in range(20):
            palette.putpixel((x, y), (x // 10) % 3)
    cmyk = Image.new("CMYK", (30, 20), (0, 200, 200, 20))
    cmyk_jpeg = encode(cmyk, "JPEG", quality=95)
    pairs = {
        "animated gif": (encode(red, "GIF", save_all=True, append_images=[blue], duration=50, loop=0), _png(red)),
        "16-bit gray png": (_png(Image.fromarray(gray16)),
                            _png(Image.fromarray(np.round(gray16 / 257).astype(np.uint8)).convert("RGB"))),
        "16-bit rgb png": (png16_rgb(rgb16), _png(Image.fromarray((rgb16 >> 8).astype(np.uint8)))),
        "cmyk jpeg": (cmyk_jpeg, _png(Image.open(io.BytesIO(cmyk_jpeg)).convert("RGB"))),
        "palette png, transparent index": (_png_with_transparency(palette),
                                           _png(_composited_on_white(_transparent(palette)))),
        "palette gif, transparent index": (encode(palette, "GIF", transparency=0),
                                           _png(_composited_on_white(_transparent(palette)))),
        **{f"exif orientation {o}": (_exif_jpeg(o), _png(_manually_oriented(_exif_jpeg(o), o))) for o in ORIENTATION},
    }
    assert Image.open(io.BytesIO(pairs["animated gif"][0])).n_frames == 2
    assert Image.open(io.BytesIO(pairs["16-bit rgb png"][0])).info.get("dpi") is None

    async def scenario():
        async with serve(settings(prompts_dir)) as client:
            different = []
            for name, (odd, plain) in pairs.items():
                got = scores(await _raw(client, odd))
                want = scores(await _raw(client, plain))
                if max(abs(got[k] - want[k]) for k in want) > 1e-5:
                    different.append((name, got, want))
            assert not different, different
            # And the equivalence is not vacuous: the second GIF frame alone scores differently.
            assert (scores(await _raw(client, _png(blue)))
                    != pytest.approx(scores(await _raw(client, _png(red))), abs=1e-5))

    run(scenario())


def _transparent(palette: Image.Image) -> Image.Image:
    image = palette.copy()
    image.info["transparency"] = 0
    return image


def _png_with_transparency(palette: Image.Image) -> bytes:
    return encode(palette, "PNG", transparency=0)


async def _raw(client: httpx.AsyncClient, data: bytes) -> httpx.Response:
    return await client.post("/classify", params={"task": "real", "top_k": 100}, content=data,
                             headers={"content-type": "application/octet-stream"})


SOCKET_SLACK = 16 << 20  # what loopback socket buffers hold before the server's answer is seen (sent, not read)


def _stream_until_answered(base: str, headers: dict[str, str], prefix: bytes, total: int, declare: bool,
                           chunk: int = 64 << 10) -> tuple[int, int]:
    """POST a body of `total` bytes chunk by chunk over a raw socket (declaring its length, or chunked),
    stopping as soon as the server answers: (its status, the body bytes sent until then)."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    framing = f"Content-Length: {total}" if declare else "Transfer-Encoding: chunked"
    request = (f"POST /classify?task=clipart HTTP/1.1\r\nHost: {host}\r\n{framing}\r\n"
               + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode()
    sent, block = 0, prefix + bytes(chunk - len(prefix))
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, chunk)
        conn.sendall(request)
        while sent < total and not select.select([conn], [], [], 0)[0]:
            try:
                conn.sendall(block if declare else b"%x\r\n%s\r\n" % (len(block), block))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(block)
            block = bytes(chunk)
        answer = conn.recv(65536)
    return int(answer.split(b" ", 2)[1]), sent


def test_giant_and_many_part_bodies_are_refused_without_reading_them(prompts_dir):
    boundary = "reliability-boundary"
    form = {"content-type": f"multipart/form-data; boundary={boundary}"}
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    png = image_bytes(1)

    def multipart(*parts: tuple[str, bytes, bool]) -> bytes:
        body = b""
        for name, data, is_file in parts:
            disposition = f'form-data; name="{name}"' + ('; filename="x.png"' if is_file else "")
            body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
        return body + f"--{boundary}--\r\n".encode()

    async def scenario():
        async with serve(settings(prompts_dir, max_upload_bytes=LIMIT_BYTES)) as client:
            async with GoodTraffic(client, GOOD_TASKS) as good:
                # Declared too large: refused from the header; the body is not read at all.
                base = str(client.base_url).rstrip("/")
                status, sent = await asyncio.to_thread(_stream_until_answered, base, form, head, 10 << 30, True)
                assert status == 413 and sent <= SOCKET_SLACK, sent

                # Streamed without a length (chunked): refused as soon as the limit is passed.
                for headers, prefix in ((form, head), ({"content-type": "image/png"}, b"")):
                    status, sent = await asyncio.to_thread(_stream_until_answered, base, headers, prefix, 1 << 30,
                                                           False)
                    assert status == 413 and sent <= LIMIT_BYTES + MULTIPART_OVERHEAD + SOCKET_SLACK, sent

                # A file just over the limit inside a body that fits the multipart slack: still 413.
                over = png + bytes(LIMIT_BYTES + 1 - len(png))
                response = await client.post("/classify?task=clipart", content=head + over + tail, headers=form)
                assert_json_error(response, 413, "upload_too_large")

                # Many parts: a thousand small fields, two files, or an endless part header.
                fields = multipart(*((f"f{i}", b"x", False) for i in range(1000)), ("file", png, True))
                assert len(fields) < LIMIT_BYTES
                assert_json_error(await client.post("/classify?task=clipart", content=fields, headers=form),
                                  422, "corrupt")
                two_files = multipart(("file", png, True), ("file", png, True))  # /classify takes one image
                assert_json_error(await client.post("/classify?task=clipart", content=two_files, headers=form),
                                  422, "too_many_images")
                long_header = (f"--{boundary}\r\nX-Pad: ".encode() + b"a" * (LIMIT_BYTES // 2) + b"\r\n"
                               + head[len(boundary) + 4:]
                               + png + tail)
                response = await client.post("/classify?task=clipart", content=long_header, headers=form)
                assert response.status_code in (413, 422) and set(response.json()) == {"error", "detail"}, response.text

                # Malformed multipart: no boundary, wrong boundary, no closing delimiter, a field not a file.
                for body, headers in ((head + png + tail, {"content-type": "multipart/form-data"}),
                                      (head + png + tail, {"content-type": "multipart/form-data; boundary=other"}),
                                      (head + png, form),
                                      (multipart(("file", png, False)), form)):
                    response = await client.post("/classify?task=clipart", content=body, headers=headers)
                    assert (response.status_code == 422
                            and set(response.json()) == {"error", "detail"}), (headers, response.text)
                ok = await client.post("/classify?task=clipart", content=head + png + tail, headers=form)
                assert ok.status_code == 200, ok.text  # the hand-built form itself is fine
            good.assert_all_served()

    run(scenario())


def test_declared_giant_body_is_refused_over_a_real_socket(prompts_dir):
    """uvicorn on loopback: a request declaring 10 GB gets its 413 after only the headers were sent."""
    with served(settings(prompts_dir, max_upload_bytes=LIMIT_BYTES)) as base:
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            started = time.perf_counter()
            conn.sendall(b"POST /classify?task=clipart HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                         b"Content-Length: 10737418240\r\n\r\n" + bytes(4096))
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                answer += chunk
            elapsed = time.perf_counter() - started
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert b'"error":"upload_too_large"' in answer and elapsed < 5
        ok = httpx.post(f"{base}/classify?task=clipart", content=image_bytes(1), headers={"content-type": "image/png"})
        assert ok.status_code == 200, ok.text
