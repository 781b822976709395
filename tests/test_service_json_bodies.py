"""JSON bodies of POST /classify, /classify/batch and /embed: base64 images (data URIs too) are answered as the same
files uploaded as multipart, under the same limits counted on the decoded bytes; image URLs are fetched only with
fetch_urls, and here only from servers this test starts on 127.0.0.1 (helpers/origin.py)."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.origin import Origin, origin
from helpers.service import OFFICE, classify, client, image_bytes, make_set, publish, run, scores, served, settings

MAX_BYTES = 200_000
PNG, OTHER = image_bytes(1), image_bytes(2, (64, 30))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def prompts_dir(tiny, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("prompts")
    publish(make_set(tiny, "office", OFFICE, 1), directory)
    return directory


@pytest.fixture(scope="module")
def plain(prompts_dir) -> Iterator[str]:
    """A service with the default settings (image URLs off) but a smaller upload limit."""
    with served(settings(prompts_dir, max_upload_bytes=MAX_BYTES)) as base:
        yield base


@pytest.fixture(scope="module")
def origins() -> Iterator[tuple[Origin, Origin]]:
    """Two image servers on 127.0.0.1: the first on the fetching service's allow-list, the second not."""
    with origin(PNG, slow_s=5) as allowed, origin(PNG) as other:
        yield allowed, other


@pytest.fixture(scope="module")
def fetching(prompts_dir, origins) -> Iterator[str]:
    """A service that fetches image URLs from the first origin (loopback, over http: both allowed explicitly)."""
    config = settings(prompts_dir, max_upload_bytes=MAX_BYTES, fetch_urls=True,
                      fetch_allow=f"127.0.0.1:{origins[0].port}", fetch_allow_private=True, fetch_allow_http=True,
                      fetch_timeout_s=1.0)
    with served(config) as base:
        yield base


def close(a: dict[str, float], b: dict[str, float]) -> bool:
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-5 for k in a)


def test_json_bodies_are_answered_as_the_same_images_uploaded_as_multipart(plain):
    async def scenario():
        async with client(plain) as c:
            multipart = scores(await classify(c, "clipart", PNG))
            for image in (b64(PNG), f"data:image/png;base64,{b64(PNG)}", base64.encodebytes(PNG).decode()):
                answer = await c.post("/classify", params={"task": "clipart", "top_k": 100}, json={"image": image})
                assert answer.headers["content-type"] == "application/json" and "x-mmap-worker" in answer.headers
                assert close(scores(answer), multipart)
            labelled = await c.post("/classify", params={"task": "clipart"}, json={"image": b64(PNG),
                                                                                   "labels": ["cat", "lynx"]})
            by_form = await c.post("/classify", params={"task": "clipart"}, files={"file": ("a.png", PNG)},
                                   data={"labels": '["cat", "lynx"]'})
            assert close(scores(labelled), scores(by_form)) and set(scores(labelled)) == {"cat", "lynx"}

            batch = await c.post("/classify/batch", params={"task": "product"}, json={"images": [b64(PNG),
                                                                                                  b64(OTHER)]})
            by_parts = await c.post("/classify/batch", params={"task": "product"},
                                    files=[("file", ("a.png", PNG)), ("file", ("b.png", OTHER))])
            assert batch.status_code == by_parts.status_code == 200
            for mine, theirs in zip(batch.json()["results"], by_parts.json()["results"], strict=True):
                assert mine["status"] == theirs["status"] == 200 and mine["version"] == theirs["version"]
                assert close({p["label"]: p["score"] for p in mine["predictions"]},
                             {p["label"]: p["score"] for p in theirs["predictions"]})

            for params in ({"task": "clipart"}, {}):
                embedded = await c.post("/embed", params=params, json={"image": b64(PNG)})
                uploaded = await c.post("/embed", params=params, files={"file": ("a.png", PNG)})
                assert embedded.status_code == uploaded.status_code == 200
                mine, theirs = embedded.json(), uploaded.json()
                assert mine["task"] == theirs["task"] and mine["dim"] == theirs["dim"]
                assert max(abs(a - b) for a, b in zip(mine["embedding"], theirs["embedding"], strict=True)) <= 1e-5

    run(scenario())


def test_malformed_base64_a_wrong_field_and_an_over_limit_image_each_get_a_clear_4xx(plain):
    big = os.urandom(MAX_BYTES + 1)
    cases = [
        ({"image": "not base64!"}, 422, "invalid_base64", "base64"),
        ({"image": "data:image/png," + b64(PNG)}, 422, "invalid_base64", "data URI"),
        ({"imag": b64(PNG)}, 422, "invalid_body", "imag"),
        ({"image": 5}, 422, "invalid_body", "$.image"),
        ({"images": [b64(PNG)]}, 422, "invalid_body", "/classify/batch"),
        ({"image": b64(PNG), "url": "https://127.0.0.1:9/a.png"}, 422, "invalid_body", "one of them"),
        ({"image": b64(PNG), "labels": "cat,dog"}, 422, "invalid_body", "labels"),
        ({"image": b64(PNG), "labels": ["cat", "cat"]}, 422, "invalid_labels", "distinct"),
        ({}, 422, "missing_file", "image"),
        ({"image": b64(big)}, 413, "upload_too_large", str(MAX_BYTES)),
        ({"image": b64(b"plain text, not an image")}, 415, "unsupported_type", "supported image"),
        ({"url": "https://127.0.0.1:9/a.png"}, 403, "fetch_disabled", "fetch_urls"),
    ]

    async def scenario():
        async with client(plain) as c:
            for body, status, error, words in cases:
                answer = await c.post("/classify", params={"task": "clipart"}, json=body)
                assert (answer.status_code, answer.json()["error"]) == (status, error), (body, answer.text)
                assert words in answer.json()["detail"], answer.text
            answer = await c.post("/classify", params={"task": "clipart"}, content=b"{not json",
                                  headers={"content-type": "application/json"})
            assert (answer.status_code, answer.json()["error"]) == (422, "invalid_json")
            answer = await c.post("/classify", params={"task": "clipart"}, content=b"{" + b" " * 1_000_000 + b"}",
                                  headers={"content-type": "application/json"})
            assert (answer.status_code, answer.json()["error"]) == (413, "upload_too_large")
            answer = await c.post("/embed", json={"image": b64(PNG), "labels": ["cat"]})
            assert (answer.status_code, answer.json()["error"]) == (422, "invalid_body")

            # A batch: each image its own answer, as a corrupt file of a multipart batch gets.
            answer = await c.post("/classify/batch", params={"task": "clipart"},
                                  json={"images": [b64(PNG), "%%%", b64(big)]})
            assert answer.status_code == 200
            assert [(r["status"], r.get("error")) for r in answer.json()["results"]] == [
                (200, None), (422, "invalid_base64"), (413, "upload_too_large")]
            answer = await c.post("/classify/batch", params={"task": "clipart"}, json={"images": [b64(PNG)] * 17})
            assert (answer.status_code, answer.json()["error"]) == (413, "too_many_images")
            answer = await c.post("/classify/batch", params={"task": "clipart"}, json={"image": b64(PNG)})
            assert (answer.status_code, answer.json()["error"]) == (422, "invalid_body")

    run(scenario())


def test_an_image_url_on_the_allow_list_is_fetched_and_answered_as_its_upload(fetching, origins):
    allowed, _ = origins

    async def scenario():
        async with client(fetching) as c:
            multipart = scores(await classify(c, "clipart", PNG))
            answer = await c.post("/classify", params={"task": "clipart", "top_k": 100},
                                  json={"url": f"{allowed.base}/image"})
            assert close(scores(answer), multipart)
            embedded = await c.post("/embed", params={"task": "clipart"}, json={"url": f"{allowed.base}/chunked"})
            uploaded = await c.post("/embed", params={"task": "clipart"}, files={"file": ("a.png", PNG)})
            assert max(abs(a - b) for a, b in zip(embedded.json()["embedding"], uploaded.json()["embedding"],
                                                  strict=True)) <= 1e-5

    run(scenario())


def test_each_refused_or_failed_fetch_gets_its_own_status_and_code(fetching, origins):
    allowed, other = origins
    seen = other.connections

    async def scenario():
        async with client(fetching) as c:
            urls = [f"{allowed.base}/image", f"{allowed.base}/missing", f"{other.base}/image", f"{allowed.base}/slow",
                    f"{allowed.base}/endless", f"{allowed.base}/redirect?to={other.base}/image",
                    f"http://localhost:{allowed.port}/image", "gopher://127.0.0.1/x"]
            answer = await c.post("/classify/batch", params={"task": "clipart"}, json={"urls": urls})
            assert answer.status_code == 200
            assert [(r["status"], r.get("error")) for r in answer.json()["results"]] == [
                (200, None), (502, "fetch_failed"), (403, "url_not_allowed"), (504, "fetch_timeout"),
                (413, "upload_too_large"), (403, "url_not_allowed"), (403, "url_not_allowed"), (422, "invalid_url")]
            # one image: the refusal is the request's answer
            answer = await c.post("/classify", params={"task": "clipart"}, json={"url": f"{other.base}/image"})
            assert (answer.status_code, answer.json()["error"]) == (403, "url_not_allowed")
            answer = await c.post("/classify", params={"task": "clipart"}, json={"url": f"{allowed.base}/slow"})
            assert (answer.status_code, answer.json()["error"]) == (504, "fetch_timeout")

    run(scenario())
    assert other.connections == seen  # the host not on the allow-list was never connected to, redirect included
