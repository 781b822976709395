"""Back-pressure and deadlines of the batcher, over HTTP: a full queue is 503 + Retry-After, a late answer 504."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from helpers.service import OFFICE, classify, image_bytes, make_set, metric, publish, run, serve, settings


@pytest.fixture(scope="module")
def prompts_dir(tiny, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("prompts")
    publish(make_set(tiny, "office", OFFICE, 1), directory)
    return directory


def test_full_queue_answers_503_with_retry_after(prompts_dir):
    """One image per forward and room for one waiting: a burst of 48 must overflow, and nothing else may fail."""
    async def scenario():
        async with serve(settings(prompts_dir, queue_size=1, max_batch_size=1)) as client:
            responses = await asyncio.gather(*(classify(client, "clipart", image_bytes(i)) for i in range(48)))
            codes = [r.status_code for r in responses]
            assert set(codes) == {200, 503}, codes
            overloaded = [r for r in responses if r.status_code == 503]
            for r in overloaded:
                assert r.json()["error"] == "overloaded" and int(r.headers["retry-after"]) >= 1
            text = (await client.get("/metrics")).text
            assert metric(text, "mmap_requests_total", task="clipart", status="503") == len(overloaded)
            assert metric(text, "mmap_requests_total", task="clipart", status="200") == codes.count(200)
            assert (await classify(client, "clipart", image_bytes(0))).status_code == 200  # recovers

    run(scenario())


def test_request_past_its_timeout_answers_504(prompts_dir):
    async def scenario():
        async with serve(settings(prompts_dir, request_timeout_s=1e-6)) as client:
            late = await classify(client, "clipart", image_bytes(1))
            assert late.status_code == 504 and late.json()["error"] == "timeout"
            assert "timeout" in late.json()["detail"]
            text = (await client.get("/metrics")).text
            assert metric(text, "mmap_requests_total", task="clipart", status="504") == 1

    run(scenario())
