"""The process layout itself: launcher + 2 HTTP workers + the engine, on loopback, with real processes.

Scores through the layout equal the reference, the workers share the load, /metrics adds up over
processes, a worker killed with -9 is replaced while the other serves, and the engine killed with
-9 fails what is in flight at once and stops the service (non-zero) so that it is restarted.
Stopping each service also checks that no process, shared-memory file or runtime directory is left
(helpers.service.service_process).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter

import httpx
import pytest
import test_service_api
from helpers.service import (
    classify,
    engine_pid,
    frozen,
    image_bytes,
    launcher,
    metric,
    reference_scores,
    run,
    scores,
    serve,
    settings,
    wait_ready,
    worker_pids,
)

from service.http.classify import WORKER_HEADER
from service.transport import SHM_DIR, SHM_PREFIX

pytestmark = pytest.mark.slow  # each test starts a service of three processes

sets, prompts_dir = test_service_api.sets, test_service_api.prompts_dir  # three methods, three prompt banks
FRESH = httpx.Limits(max_keepalive_connections=0)  # a new connection per request: the kernel picks the worker


def test_two_workers_score_like_the_reference_share_the_load_and_add_up_their_metrics(prompts_dir, sets, tiny):
    by_task = {task: ps for ps in sets.values() for task in ps.tasks}
    requests = [(task, image_bytes(50 + 7 * k + j, size=(61, 37), fmt="JPEG"))
                for k, task in enumerate(sorted(by_task)) for j in range(6)]

    async def scenario():
        async with serve(settings(prompts_dir, workers=2, max_wait_ms=200, max_batch_size=64)) as client:
            # This service's rings only (other tests may run services alongside), and eventually: a worker that
            # started late may not have been mapped yet when the first worker answered /readyz.
            own = f"{SHM_PREFIX}.{launcher(client).pid}.*"
            deadline = time.monotonic() + 10
            while list(SHM_DIR.glob(own)) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert not list(SHM_DIR.glob(own)), "rings are unlinked once the engine has mapped them"
            async with httpx.AsyncClient(base_url=client.base_url, timeout=60, limits=FRESH) as fresh:
                answers = await asyncio.gather(*(classify(fresh, t, d) for t, d in requests))
                refused = [await classify(fresh, "nope", image_bytes(1)), await classify(fresh, "real", b"garbage")]
                texts = [(await fresh.get("/metrics")).text for _ in range(6)]  # whichever worker answers
        for (task, data), answer in zip(requests, answers, strict=True):
            got, want = scores(answer), reference_scores(tiny, by_task[task], task, data)
            assert got.keys() == want.keys() and max(abs(got[k] - want[k]) for k in want) <= 1e-5, task
            assert answer.json()["version"] == by_task[task].version
        served_by = Counter(a.headers[WORKER_HEADER] for a in answers)
        assert set(served_by) == {"0", "1"}, served_by
        assert [r.status_code for r in refused] == [404, 415]
        text = texts[-1]
        assert len({metric(t, "mmap_requests_total", task="clipart", status="200") for t in texts}) == 1
        for task in by_task:
            assert metric(text, "mmap_requests_total", task=task, status="200") == 6, task
        assert metric(text, "mmap_requests_total", task="_unknown", status="404") == 1
        assert metric(text, "mmap_requests_total", task="real", status="415") == 1
        assert metric(text, "mmap_batch_size_sum") == len(requests)
        forwards = metric(text, "mmap_batch_size_count")
        assert forwards < len(requests) - 6, f"{forwards} forwards for {len(requests)} images: no cross-task batch"
        assert metric(text, "mmap_forward_seconds_per_image_count") == forwards
        assert metric(text, "mmap_tasks_loaded") == len(by_task)

    run(scenario())


async def _traffic(base: str, stop: asyncio.Event, outcomes: list[tuple[float, str]]) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=30, limits=FRESH) as client:
        i = 0
        while not stop.is_set():
            started = time.monotonic()
            try:
                response = await classify(client, ("clipart", "sketch")[i % 2], image_bytes(i % 5), top_k=1)
                outcomes.append((started, str(response.status_code)))
            except httpx.TransportError as e:
                outcomes.append((started, type(e).__name__))
            i += 1


def test_a_worker_killed_with_9_is_replaced_while_the_other_serves(prompts_dir):
    async def scenario():
        async with serve(settings(prompts_dir, workers=2)) as client:
            base = str(client.base_url)
            old = worker_pids(client)
            assert len(old) == 2
            stop, outcomes = asyncio.Event(), []
            loops = [asyncio.create_task(_traffic(base, stop, outcomes)) for _ in range(4)]
            await asyncio.sleep(1.0)
            killed_at = time.monotonic()
            os.kill(old[0], signal.SIGKILL)
            deadline = killed_at + 20
            while not (len(new := worker_pids(client)) == 2 and old[0] not in new):
                assert time.monotonic() < deadline, f"no replacement worker: {new}"
                await asyncio.sleep(0.05)
            await wait_ready(client, 20)  # the replacement takes connections too
            await asyncio.sleep(1.0)
            stop.set()
            await asyncio.gather(*loops)
            served_by = Counter()
            async with httpx.AsyncClient(base_url=base, timeout=30, limits=FRESH) as fresh:
                for i in range(40):
                    served_by[(await classify(fresh, "clipart", image_bytes(i % 3))).headers[WORKER_HEADER]] += 1
            text = (await client.get("/metrics")).text
        kinds = Counter(o for _, o in outcomes)
        after_kill = Counter(o for t, o in outcomes if t > killed_at + 0.5)
        # Only what was in flight on the killed worker can fail (a connection reset), at most one per loop.
        assert sum(n for o, n in kinds.items() if o != "200") <= 4, kinds
        assert after_kill["200"] >= 10 and set(after_kill) == {"200"}, after_kill
        assert set(served_by) == {"0", "1"}, served_by  # the replacement serves too
        # Every 200 a client saw was counted, by the killed worker too (its counts outlive it); at most the requests
        # cut in flight (one a loop) were counted and not seen.
        counted = sum(metric(text, "mmap_requests_total", task=t, status="200") for t in ("clipart", "sketch"))
        assert kinds["200"] + 40 <= counted <= kinds["200"] + 40 + 4, (counted, kinds)

    run(scenario())


def test_a_killed_engine_fails_requests_at_once_and_stops_the_service_non_zero(prompts_dir):
    async def scenario():
        async with serve(settings(prompts_dir, workers=2)) as client:
            base = str(client.base_url)
            process = launcher(client)
            engine = engine_pid(client)
            async with httpx.AsyncClient(base_url=base, timeout=30, limits=FRESH) as fresh:
                with frozen(engine):  # requests queue up in the workers, waiting for the engine
                    waiting = [asyncio.create_task(classify(fresh, "clipart", image_bytes(i))) for i in range(8)]
                    await asyncio.sleep(1.0)
                    assert not any(w.done() for w in waiting)
                    killed_at = time.monotonic()
                    os.kill(engine, signal.SIGKILL)
                answers = await asyncio.gather(*waiting)
                answered_in = time.monotonic() - killed_at
                assert [a.status_code for a in answers] == [503] * 8, [a.text for a in answers]
                assert {a.json()["error"] for a in answers} == {"engine_unavailable"}
                assert answered_in < 2.0, answered_in
                try:  # the launcher is stopping the workers: an answer, if any, is a clear 503
                    late = await classify(fresh, "clipart", image_bytes(1))
                    assert late.status_code == 503, late.text
                except httpx.TransportError:
                    pass
            code = await asyncio.to_thread(process.wait, 15)
            exited_in = time.monotonic() - killed_at
            assert code != 0 and exited_in < 10, (code, exited_in)

    run(scenario())
