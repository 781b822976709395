"""The Python client (`mmap_client`): what it accepts as an image, and the same Embedding from the binary and
the JSON answer. Through one real `python -m service` (module-scoped); argument checks need no service."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers.service import DOODLES, OFFICE, REPO, image_bytes, make_set, publish, served, settings
from PIL import Image

from mmap_client import AsyncClient, Classification, Client

pytestmark = pytest.mark.slow  # one process start (imports torch)


@pytest.fixture(scope="module")
def base(tiny, tmp_path_factory) -> Iterator[str]:
    prompts: Path = tmp_path_factory.mktemp("client") / "prompts"
    publish(make_set(tiny, "office", OFFICE, 1), prompts)
    publish(make_set(tiny, "doodles", DOODLES, 2), prompts)
    with served(settings(prompts)) as url:
        yield url


def _scores(result: Classification) -> dict[str, float]:
    return {p.label: p.score for p in result.predictions}


def _refusing() -> httpx.MockTransport:
    """A transport for checks made before anything is sent: any request fails the test."""
    def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError(f"nothing may be sent: {request.method} {request.url}")
    return httpx.MockTransport(handler)


# ---- what an image may be ----

def test_a_pil_image_is_classified_and_embedded_as_its_pixels(base, tmp_path):
    png = image_bytes(6)
    path = tmp_path / "image.png"
    path.write_bytes(png)
    picture = Image.open(io.BytesIO(png))
    with Client(base) as mmap:
        expected = _scores(mmap.classify("clipart", png, top_k=4))
        assert _scores(mmap.classify("clipart", picture, top_k=4)) == pytest.approx(expected, abs=1e-6)
        with path.open("rb") as f:
            batch = mmap.classify_batch("clipart", [picture, path, str(path), bytearray(png), memoryview(png), f],
                                        top_k=4)
        assert [_scores(r) for r in batch] == [pytest.approx(expected, abs=1e-6)] * 6
        assert mmap.embed(picture, task="clipart") == mmap.embed(png, task="clipart")
        # A mode PNG cannot hold is sent as RGB: CMYK made from the RGB image scores as the RGB image.
        cmyk = _scores(mmap.classify("clipart", picture.convert("RGB").convert("CMYK"), top_k=4))
        assert cmyk == pytest.approx(expected, abs=1e-6)
    assert picture.mode == "RGB"  # the caller's image is left as it was


def test_the_client_imports_no_pil_and_encodes_a_pil_image_as_png():
    script = textwrap.dedent("""
        import io, sys
        import httpx
        import mmap_client
        assert "PIL" not in sys.modules, "importing mmap_client imported PIL"
        sent = []
        def handler(request):
            sent.append(request.read())
            return httpx.Response(200, json={"task": "t", "version": "v", "prompt_set": "s", "method": "mmap",
                                             "predictions": [{"label": "cat", "score": 1.0}]})
        from PIL import Image
        with mmap_client.Client("http://mmap.test", transport=httpx.MockTransport(handler)) as mmap:
            assert mmap.classify("t", Image.new("RGB", (8, 6), (200, 10, 30))).label == "cat"
        png = sent[0][sent[0].index(b"\\x89PNG\\r\\n\\x1a\\n"):]
        image = Image.open(io.BytesIO(png))
        assert (image.format, image.size, image.getpixel((3, 2))) == ("PNG", (8, 6), (200, 10, 30))
    """)
    process = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert process.returncode == 0, process.stderr


@pytest.mark.parametrize("image", [42, None, np.zeros((4, 4, 3), np.uint8), ["a.png"]],
                         ids=["int", "None", "ndarray", "list"])
def test_anything_else_is_a_type_error_naming_what_is_accepted(image):
    with Client("http://mmap.test", transport=_refusing()) as mmap:
        for call in (lambda: mmap.classify("clipart", image), lambda: mmap.embed(image, task="clipart")):
            with pytest.raises(TypeError) as refused:
                call()
            message = str(refused.value)
            assert message.startswith("image: ") and type(image).__name__ in message
            assert all(kind in message for kind in ("path", "bytes", "binary file object", "PIL.Image.Image"))
        with pytest.raises(TypeError, match=r"^images\[1\]: expected a path"):
            mmap.classify_batch("clipart", [b"\x89PNG", image])


def test_a_text_file_or_one_image_for_a_batch_is_a_type_error():
    with Client("http://mmap.test", transport=_refusing()) as mmap:
        with pytest.raises(TypeError, match="binary mode"):
            mmap.classify("clipart", io.StringIO("not bytes"))
        for one in ("a.png", b"\x89PNG", Image.new("RGB", (4, 4))):
            with pytest.raises(TypeError, match="^images: expected a sequence of images"):
                mmap.classify_batch("clipart", one)


def test_the_async_client_refuses_the_same(base):
    async def scenario() -> None:
        async with AsyncClient(base) as mmap:
            with pytest.raises(TypeError, match="PIL.Image.Image"):
                await mmap.classify("sketch", 42)
            result = await mmap.classify("sketch", Image.open(io.BytesIO(image_bytes(2))))
            assert result.task == "sketch"

    asyncio.run(scenario())


# ---- embeddings ----

@pytest.mark.parametrize("task", ["clipart", "sketch", None])
def test_the_binary_and_the_json_answer_give_the_same_embedding(base, task):
    with Client(base) as mmap:
        info = mmap.task(task) if task else {"version": None, "prompt_set": None}
        binary, as_json = mmap.embed(image_bytes(3), task=task), mmap.embed(image_bytes(3), task=task, binary=False)
    assert binary == as_json
    assert (binary.task, binary.version, binary.prompt_set, len(binary.vector)) == (
        task, info["version"], info["prompt_set"], len(as_json.vector))


def test_the_async_client_gives_the_same_embedding(base):
    async def scenario() -> None:
        async with AsyncClient(base) as mmap:
            binary = await mmap.embed(image_bytes(4), task="product")
            assert binary == await mmap.embed(image_bytes(4), task="product", binary=False)
            assert binary.task == "product" and binary.version

    asyncio.run(scenario())
