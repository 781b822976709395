"""decode=engine: JPEG uploads decoded in batches by the engine (nvjpeg on CUDA; libjpeg-turbo here).

The pixels are within the stated tolerance of the workers' Pillow path (on the CPU: at most 2 levels,
0.05 on average), a file that cannot be decoded fails alone (its batch goes on), and files the
engine's decoder would treat differently (CMYK, EXIF-rotated, not JPEG) still decode in the workers,
exactly as before."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
import torch
from helpers.service import (
    OFFICE,
    image_bytes,
    jpeg,
    make_set,
    metric,
    publish,
    reference_scores,
    run,
    scores,
    serve,
    truncated,
)
from helpers.service import settings as service_settings
from PIL import Image, ImageOps

from service.engine.core import InferenceCore
from service.engine.device_decode import DeviceDecoder, UndecodableJpeg, ends_whole
from service.http.images import open_image, plain_jpeg
from service.http.uploads import Preprocessor
from service.metrics import Metrics

CPU_MAX, CPU_MEAN = 2, 0.05  # 8-bit levels between the engine's CPU decode + tensor resize and Pillow's


def upright(data: bytes) -> bytes:
    """The image as it is meant to be seen (EXIF orientation applied), as PNG: open_clip's transform does not rotate."""
    buffer = io.BytesIO()
    ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB").save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("cfg", [{"size": [48, 48]}, {"size": [32, 48], "resize_mode": "squash"}])
def test_engine_decoding_matches_the_workers_pillow_path_within_the_tolerance(tiny, cfg):
    cfg = {**tiny.preprocess_cfg, **cfg}
    pillow, engine = Preprocessor(cfg, 10**8), DeviceDecoder(cfg, torch.device("cpu"))
    files = [jpeg(1, (48, 40)), jpeg(2, (20, 30)), jpeg(3, (300, 200), progressive=True), jpeg(4, (64, 64), "L"),
             jpeg(5, (1024, 768)), jpeg(6, (48, 48))]
    decoded = engine(files)
    for data, pixels in zip(files, decoded, strict=True):
        expected = pillow(data)
        assert pixels.dtype == torch.uint8 and tuple(pixels.shape) == expected.shape
        error = np.abs(pixels.numpy().astype(int) - expected)
        assert error.max() <= CPU_MAX and error.mean() <= CPU_MEAN


def test_a_file_that_cannot_be_decoded_fails_alone(tiny):
    engine = DeviceDecoder(tiny.preprocess_cfg, torch.device("cpu"))
    good = [jpeg(1), jpeg(2)]
    cut = truncated(jpeg(3, (300, 200)))
    broken = bytearray(jpeg(4, (300, 200)))
    broken[600:700] = bytes(100)  # the scan's start zeroed, its end-of-image marker kept: the batched call fails
    assert not ends_whole(cut) and ends_whole(bytes(broken)) and ends_whole(good[0] + bytes(3))
    decoded = engine([good[0], cut, good[1], bytes(broken)])
    assert isinstance(decoded[1], UndecodableJpeg) and "truncated" in str(decoded[1]).lower()
    assert isinstance(decoded[3], UndecodableJpeg)
    for data, pixels in zip(good, (decoded[0], decoded[2]), strict=True):
        assert torch.equal(pixels, engine([data])[0])


def test_one_batch_mixes_engine_decoded_jpegs_with_worker_pixels_and_a_bad_file(tiny, tmp_path):
    office = make_set(tiny, "office", OFFICE, 1)
    publish(office, tmp_path)
    core = InferenceCore(service_settings(tmp_path, decode="engine"), tiny, Metrics())
    core.registry.scan()
    core.warm_up()
    core.ready = True
    png, photo, grey = image_bytes(1), jpeg(2, (300, 200)), jpeg(3, mode="L")
    pixels = Preprocessor(tiny.preprocess_cfg, 10**8)(png)  # what a worker puts in its slot
    # clipart's rows share one forward: slot pixels and device-decoded pixels in one batch
    sent = [(pixels, png, "clipart"), (photo, photo, "clipart"), (truncated(photo), None, "clipart"),
            (grey, grey, "real")]
    items = [core.admit(i, task, data, 100, 0) for i, (data, _, task) in enumerate(sent)]
    answers = core.score(items)
    assert [type(a).__name__ for a in answers] == ["Scored", "Scored", "Failed", "Scored"]
    assert answers[2].status == 422 and answers[2].error == "corrupt"
    for answer, (_, original, task) in zip(answers, sent, strict=True):
        if original is not None:
            expected = reference_scores(tiny, office, task, original)
            assert max(abs(s - expected[label]) for label, s in zip(answer.labels, answer.scores, strict=True)) <= 5e-5


def test_only_plain_jpegs_are_left_to_the_engine():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to view
    assert plain_jpeg(open_image(jpeg(1), 10**8))
    assert plain_jpeg(open_image(jpeg(1, mode="L"), 10**8))
    assert not plain_jpeg(open_image(jpeg(1, mode="CMYK"), 10**8))
    assert not plain_jpeg(open_image(jpeg(1, exif=exif.tobytes()), 10**8))
    assert not plain_jpeg(open_image(image_bytes(1), 10**8))  # PNG


def test_the_service_decoding_on_the_engine_scores_like_open_clip_and_fails_only_the_bad_image(tiny, tmp_path):
    office = make_set(tiny, "office", OFFICE, 1)
    publish(office, tmp_path)
    exif = Image.Exif()
    exif[0x0112] = 6
    uploads = {"jpeg": jpeg(1, (300, 200)), "grey": jpeg(2, mode="L"), "cmyk": jpeg(3, mode="CMYK"),
               "rotated": jpeg(4, (60, 40), exif=exif.tobytes()), "png": image_bytes(5)}

    async def scenario():
        async with serve(service_settings(tmp_path, decode="engine", workers=1)) as client:
            for name, data in uploads.items():
                got = scores(await client.post("/classify", params={"task": "clipart", "top_k": 100},
                                               content=data, headers={"content-type": "image/jpeg"}))
                expected = reference_scores(tiny, office, "clipart", upright(data))
                assert max(abs(got[k] - expected[k]) for k in expected) <= 5e-5, name
            bad = truncated(jpeg(6, (300, 200)))
            response = await client.post("/classify", params={"task": "clipart"}, content=bad,
                                         headers={"content-type": "image/jpeg"})
            assert response.status_code == 422 and response.json()["error"] == "corrupt", response.text
            files = [("file", (name, data)) for name, data in [("a.jpg", uploads["jpeg"]), ("b.jpg", bad),
                                                                ("c.jpg", uploads["grey"])]]
            results = (await client.post("/classify/batch", params={"task": "real"}, files=files)).json()["results"]
            assert [r["status"] for r in results] == [200, 422, 200]
            for r, data in zip((results[0], results[2]), (uploads["jpeg"], uploads["grey"]), strict=True):
                expected = reference_scores(tiny, office, "real", data)
                assert max(abs(p["score"] - expected[p["label"]]) for p in r["predictions"]) <= 5e-5
            text = (await client.get("/metrics")).text
            assert metric(text, "mmap_images_rejected_total", reason="corrupt") == 2
            # the JPEGs reached the engine (the two plain ones, twice, and both bad ones); the others did not
            assert metric(text, "mmap_engine_decode_seconds_per_image_count") >= 3
            assert (await client.get("/readyz")).status_code == 200

    run(scenario())


def test_decode_engine_keeps_every_upload_check_of_the_workers(tiny, tmp_path):
    publish(make_set(tiny, "office", OFFICE, 1), tmp_path)

    async def scenario():
        async with serve(service_settings(tmp_path, decode="engine", workers=1, max_image_pixels=10_000)) as client:
            async def post(data: bytes) -> httpx.Response:
                return await client.post("/classify", params={"task": "clipart"}, content=data,
                                         headers={"content-type": "image/jpeg"})

            assert (await post(jpeg(1, (200, 100)))).status_code == 413  # refused from the header, in the worker
            assert (await post(b"\xff\xd8\xff" + bytes(100))).status_code == 422
            assert (await post(b"not an image")).status_code == 415
            assert (await post(jpeg(1))).status_code == 200

    run(scenario())
