"""Back-pressure and deadlines of the batcher, over HTTP: a full queue is 503 + Retry-After, a late answer 504,
a full worker ring makes requests wait for a slot."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
from helpers.service import (
    OFFICE,
    classify,
    engine_pid,
    frozen,
    image_bytes,
    make_set,
    metric,
    publish,
    run,
    serve,
    settings,
)


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


def test_a_full_ring_makes_requests_wait_for_a_slot_within_their_timeout(prompts_dir):
    """Four slots, 8 requests at once on one worker: 4 wait in line and all are answered 200. With the engine
    stalled: 4 in the slots, 4 waiting, the rest refused 503 at once; a wait past the request timeout is 504, and
    the slots come back once the engine answers late (no slot is lost), without computing what nobody waits for."""
    async def scenario():
        async with serve(settings(prompts_dir, worker_slots=4, max_batch_size=4, request_timeout_s=5)) as client:
            engine = engine_pid(client)
            with frozen(engine):
                burst = [asyncio.create_task(classify(client, "clipart", image_bytes(i % 4))) for i in range(8)]
                await asyncio.sleep(1.0)
                assert not any(t.done() for t in burst)
            assert [r.status_code for r in await asyncio.gather(*burst)] == [200] * 8
            computed = metric((await client.get("/metrics")).text, "mmap_batch_size_sum")
            with frozen(engine):
                late = await asyncio.gather(*(classify(client, "clipart", image_bytes(i % 4)) for i in range(12)))
            codes = sorted((r.status_code, r.json()["error"]) for r in late)
            assert codes == [(503, "overloaded")] * 4 + [(504, "timeout")] * 8, codes
            again = await asyncio.gather(*(classify(client, "clipart", image_bytes(i % 4)) for i in range(8)))
            assert [r.status_code for r in again] == [200] * 8
            text = (await client.get("/metrics")).text
            assert metric(text, "mmap_requests_total", task="clipart", status="503") == 4
            # the 4 sent before the stall reached the engine past their deadline: skipped, not computed
            assert metric(text, "mmap_batch_size_sum") - computed == 8

    run(scenario())


def test_requests_waiting_for_a_slot_fail_at_once_when_the_engine_dies(prompts_dir):
    async def scenario():
        async with serve(settings(prompts_dir, worker_slots=2)) as client:
            engine = engine_pid(client)
            with frozen(engine):  # 2 requests in the slots, 2 waiting for one
                waiting = [asyncio.create_task(classify(client, "clipart", image_bytes(i))) for i in range(4)]
                await asyncio.sleep(1.0)
                killed_at = time.monotonic()
                os.kill(engine, signal.SIGKILL)
            answers = await asyncio.gather(*waiting)
            assert time.monotonic() - killed_at < 2.0
            assert [(a.status_code, a.json()["error"]) for a in answers] == [(503, "engine_unavailable")] * 4

    run(scenario())
