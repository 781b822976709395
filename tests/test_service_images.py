"""Safe image decoding: every supported format and mode to the right RGB pixels, EXIF orientation, bombs
refused from the header alone, garbage refused with the reason; preprocessing equal to open_clip's."""

from __future__ import annotations

import io
import struct
import time

import numpy as np
import pytest
import torch
from helpers.images import gif_claiming, png_claiming
from helpers.service import image_bytes, open_clip_preprocess
from PIL import Image

from service.engine.backends import PixelNormalizer
from service.http.images import ImageRejected, decode_image
from service.http.uploads import Preprocessor

LIMIT = 4_000_000


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _halves(size=(40, 20), left=(255, 0, 0), right=(0, 0, 255)) -> Image.Image:
    w, h = size
    array = np.zeros((h, w, 3), np.uint8)
    array[:, : w // 2] = left
    array[:, w // 2:] = right
    return Image.fromarray(array)


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "WEBP", "GIF", "JPEG"])
def test_every_format_decodes_to_its_rgb_pixels(fmt):
    source = _halves()
    options = {"lossless": True} if fmt == "WEBP" else {"quality": 95, "subsampling": 0} if fmt == "JPEG" else {}
    decoded = decode_image(_encode(source, fmt, **options), LIMIT)
    assert decoded.mode == "RGB" and decoded.size == source.size
    error = np.abs(np.asarray(decoded, np.int16) - np.asarray(source, np.int16)).max()
    assert error <= (40 if fmt == "JPEG" else 0)  # lossy JPEG blurs the edge a little


def test_gif_and_tiff_give_their_first_frame():
    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    for fmt in ("GIF", "TIFF"):
        data = _encode(red, fmt, save_all=True, append_images=[blue])
        assert Image.open(io.BytesIO(data)).n_frames == 2
        assert decode_image(data, LIMIT).getpixel((4, 4)) == (255, 0, 0), fmt


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    data = _encode(_halves(), "JPEG", quality=95, exif=exif.tobytes())
    decoded = decode_image(data, LIMIT)
    assert decoded.size == (20, 40)
    top, bottom = np.asarray(decoded)[2, 10], np.asarray(decoded)[-3, 10]
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60  # red on top after the turn


def test_modes_become_sensible_rgb():
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    palette.putpixel((0, 0), 1)
    transparent_png = _encode(palette, "PNG", transparency=0)  # index 0 (black) is transparent
    decoded = decode_image(transparent_png, LIMIT)
    assert decoded.getpixel((0, 0)) == (200, 10, 10) and decoded.getpixel((3, 3)) == (255, 255, 255)

    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((1, 1), (0, 255, 0, 255))
    decoded = decode_image(_encode(rgba, "PNG"), LIMIT)
    assert decoded.getpixel((0, 0)) == (255, 255, 255) and decoded.getpixel((1, 1)) == (0, 255, 0)

    deep = Image.fromarray(np.array([[0, 32896, 65535]], np.uint16))  # 16-bit gray
    decoded = decode_image(_encode(deep, "PNG"), LIMIT)
    assert [decoded.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]

    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in CMYK
    r, g, b = decode_image(_encode(cmyk, "JPEG", quality=100), LIMIT).getpixel((2, 2))
    assert r > 240 and g < 20 and b < 20

    for mode in ("1", "L", "LA", "I"):
        assert decode_image(_encode(Image.new(mode, (4, 4)), "TIFF" if mode == "I" else "PNG"), LIMIT).mode == "RGB"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("header", [
    png_claiming(100_000, 100_000),  # 10^10 pixels: 30 GB as RGB
    gif_claiming(65_535, 65_535),
    b"BM" + struct.pack("<IHHIIiiHHIIiiII", 0, 0, 0, 54, 40, 50_000, 50_000, 1, 24, 0, 0, 0, 0, 0, 0),
], ids=["png", "gif", "bmp"])
def test_huge_canvases_are_refused_from_the_header(header):
    start = time.perf_counter()
    with pytest.raises(ImageRejected) as refused:
        decode_image(header, LIMIT)
    assert refused.value.status == 413 and refused.value.error == "too_many_pixels"
    # Generous: reading a header takes milliseconds even on a loaded machine; decoding such a canvas would take
    # minutes or run out of memory.
    assert time.perf_counter() - start < 5


def test_pixel_limit_is_exact():
    data = image_bytes(1, size=(50, 40))
    assert decode_image(data, 2000).size == (50, 40)
    with pytest.raises(ImageRejected, match="50x40 = 2000 pixels; the limit is 1999"):
        decode_image(data, 1999)


def test_a_resize_beyond_the_limits_is_refused_but_the_models_own_size_is_not():
    """A resize may reach `max_image_pixels` or 16x the model's input area (224 x 224 here), whichever is more:
    a narrow strip's resize is refused; a small image under a limit below the model's own area is not."""
    small_limit = Preprocessor({"size": 224}, max_pixels=40_000)
    assert small_limit(image_bytes(1, size=(100, 100))).shape == (224, 224, 3)  # resized to 50,176 > 40,000
    assert small_limit(image_bytes(1, size=(190, 12))).shape == (224, 224, 3)  # 3,546 x 224: under 16x
    with pytest.raises(ImageRejected, match="its resize for the model would be 4480x224") as refused:
        small_limit(image_bytes(1, size=(200, 10)))  # 200 x 10 = 2,000 pixels, resized: 4,480 x 224 > 16 x 224^2
    assert refused.value.status == 413 and refused.value.error == "too_many_pixels"
    default = Preprocessor({"size": 224}, max_pixels=40_000_000)
    assert default(image_bytes(1, size=(600, 3))).shape == (224, 224, 3)  # 44,800 x 224 = 10 M pixels: allowed
    with pytest.raises(ImageRejected):
        default(image_bytes(1, size=(1000, 1)))  # 224,000 x 224 = 50 M pixels


@pytest.mark.parametrize(("data", "status", "error"), [
    (b"%PDF-1.7 definitely not an image", 415, "unsupported_type"),
    (bytes(range(256)) * 4, 415, "unsupported_type"),
    (image_bytes(2, fmt="JPEG")[:200], 422, "corrupt"),
    (image_bytes(2)[:-30], 422, "corrupt"),
    (png_claiming(64, 64)[:40], 422, "corrupt"),
    (b"", 422, "empty"),
], ids=["pdf", "noise", "truncated-jpeg", "truncated-png", "png-header-only", "empty"])
def test_garbage_is_refused_with_the_reason(data, status, error):
    with pytest.raises(ImageRejected) as refused:
        decode_image(data, LIMIT)
    assert (refused.value.status, refused.value.error) == (status, error)
    assert refused.value.detail


def test_preprocessing_is_open_clips_own(tiny):
    """decode + the backbone's preprocess == open_clip's eval transform on PIL's own decode (non-square, resized)."""
    data = image_bytes(3, size=(123, 77), fmt="JPEG")
    ours = tiny.preprocess(decode_image(data, LIMIT))
    theirs = open_clip_preprocess(tiny)(Image.open(io.BytesIO(data)))
    assert ours.shape == (3, tiny.image_size, tiny.image_size)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("model", ["tiny", "vitb32"])
def test_worker_pixels_normalised_on_the_engine_are_open_clips_transform_bit_for_bit(model, request):
    """The split pipeline (a worker's uint8 resize + crop, the engine's divide + normalise) against open_clip's
    own eval transform, exactly: portrait, landscape, square, smaller than the input (upscaled), odd sizes."""
    backbone = request.getfixturevalue(model)
    cfg = backbone.preprocess_cfg
    preprocess, normalize = Preprocessor(cfg, LIMIT), PixelNormalizer(torch.device("cpu"), cfg["mean"], cfg["std"])
    reference = open_clip_preprocess(backbone)
    sizes = [(123, 77), (77, 123), (300, 300), (31, 45), (225, 224), (640, 481), (9, 13)]
    images = [image_bytes(k, size=size, fmt=("JPEG", "PNG")[k % 2]) for k, size in enumerate(sizes)]
    pixels = np.stack([preprocess(data) for data in images])
    assert pixels.dtype == np.uint8 and pixels.shape == (len(images), *cfg["size"], 3)
    ours = normalize(torch.from_numpy(pixels))
    theirs = torch.stack([reference(Image.open(io.BytesIO(data))) for data in images])
    assert torch.equal(ours, theirs)


def test_the_workers_refuse_a_preprocessing_they_cannot_reproduce(tiny):
    for change in ({"resize_mode": "longest"}, {"interpolation": "random"}, {"size": [224, 192]}):
        with pytest.raises(ValueError, match="cannot preprocess"):
            Preprocessor({**tiny.preprocess_cfg, **change}, LIMIT)
