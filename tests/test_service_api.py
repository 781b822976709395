"""The HTTP surface of `python -m service`: answers, scores, errors, limits, metrics, readiness, admin.

Tests that run with the default settings share one service (`shared`, each start costs seconds); they
send requests one after another, so a test's metrics are the difference of its own two snapshots."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.images import png_chunk
from helpers.service import (
    DOODLES,
    OFFICE,
    classify,
    client,
    engine_pid,
    frozen,
    image_bytes,
    make_set,
    metric,
    metrics_added,
    publish,
    reference_scores,
    run,
    scores,
    serve,
    served,
    settings,
    worker_pids,
)

from mmap_model import PromptConfig, PromptSet, TaskSpec

SCENES = {"indoor": TaskSpec(["kitchen", "office", "garage"], "a photo of a {}.", "places"),
          "outdoor": TaskSpec(["beach", "forest"], "a photo of a {}.", "places")}


@pytest.fixture(scope="module")
def sets(tiny) -> dict[str, PromptSet]:
    """Three methods and three visual-prompt signatures: (4, 4) for grouped mmap and maple tasks,
    (4, 2) for the ungrouped 'real', none for coop. The mmap set has coupling rank 2 (same signature)."""
    return {"office": make_set(tiny, "office", OFFICE, 1, PromptConfig(rank=2)),
            "scenes": make_set(tiny, "scenes", SCENES, 2, PromptConfig(method="maple")),
            "doodles": make_set(tiny, "doodles", DOODLES, 3, PromptConfig(method="coop"))}


@pytest.fixture(scope="module")
def prompts_dir(sets, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("prompts")
    for ps in sets.values():
        publish(ps, directory)
    return directory


@pytest.fixture(scope="module")
def shared(prompts_dir) -> Iterator[str]:
    """The base URL of one service with the default settings over `prompts_dir`."""
    with served(settings(prompts_dir)) as base:
        yield base


def _task_set(sets: dict[str, PromptSet]) -> dict[str, PromptSet]:
    return {task: ps for ps in sets.values() for task in ps.tasks}


def test_classify_answers_well_formed_json(shared, sets):
    async def scenario():
        async with client(shared) as c:
            data = image_bytes(1)
            full = await classify(c, "clipart", data)
            assert full.status_code == 200 and full.headers["content-type"] == "application/json"
            body = full.json()
            assert body["task"] == "clipart" and body["prompt_set"] == "office" and body["method"] == "mmap"
            assert body["version"] == sets["office"].version
            got = [p["score"] for p in body["predictions"]]
            assert got == sorted(got, reverse=True)
            assert {p["label"] for p in body["predictions"]} == set(OFFICE["clipart"].classnames)
            assert sum(got) == pytest.approx(1.0, abs=1e-5)  # a softmax over all the task's classes
            top2 = await classify(c, "clipart", data, top_k=2)
            assert top2.json()["predictions"] == body["predictions"][:2]
            raw = await c.post("/classify", params={"task": "clipart", "top_k": 100}, content=data,
                                    headers={"content-type": "image/png"})
            assert scores(raw) == pytest.approx(scores(full), abs=1e-6)
            huge = await c.post("/classify", params={"task": "clipart", "top_k": "9" * 30}, content=data,
                                headers={"content-type": "image/png"})  # more than any task's classes: all of them
            assert huge.status_code == 200 and len(huge.json()["predictions"]) == len(OFFICE["clipart"].classnames)
            default_k = await c.post("/classify?task=real", files={"file": ("a.png", data)})
            assert len(default_k.json()["predictions"]) == 5

    run(scenario())


def test_scores_equal_mmap_model_directly(shared, sets, tiny):
    """Every method and signature, a non-square JPEG (resize + crop): service == mmap_model + open_clip preprocess."""
    async def scenario():
        async with client(shared) as c:
            for i, (task, ps) in enumerate(sorted(_task_set(sets).items())):
                data = image_bytes(10 + i, size=(61, 37), fmt="JPEG")
                expected = reference_scores(tiny, ps, task, data)
                got = scores(await classify(c, task, data))
                assert got.keys() == expected.keys()
                for label in expected:
                    assert abs(got[label] - expected[label]) <= 1e-5, (task, label)

    run(scenario())


def test_mixed_task_batch_equals_single_requests(prompts_dir, sets):
    tasks = ["clipart", "product", "indoor", "outdoor", "real", "sketch"]  # two sets share the (4, 4) bank
    requests = [(task, image_bytes(100 * k + j)) for k, task in enumerate(tasks) for j in range(2)]

    async def scenario():
        async with serve(settings(prompts_dir, max_wait_ms=1000, max_batch_size=64)) as client:
            before = (await client.get("/metrics")).text
            # The engine frozen while the worker reads and forwards them: it then finds them all waiting (on a
            # busy machine, unfrozen, they could arrive one forward apart).
            with frozen(engine_pid(client)):
                sent = asyncio.ensure_future(asyncio.gather(*(classify(client, t, d) for t, d in requests)))
                await asyncio.sleep(2)
            batched = await sent
            after = (await client.get("/metrics")).text
            single = [await classify(client, t, d) for t, d in requests]
        forwards = metric(after, "mmap_batch_size_count") - metric(before, "mmap_batch_size_count")
        big = forwards - (metric(after, "mmap_batch_size_bucket", le="2.0")
                          - metric(before, "mmap_batch_size_bucket", le="2.0"))
        # Each task has 2 requests, so a forward of more than 2 images mixed tasks.
        assert forwards < len(requests) and big >= 1, (forwards, big)
        for (task, _), b, s in zip(requests, batched, single, strict=True):
            got, want = scores(b), scores(s)
            assert max(abs(got[k] - want[k]) for k in want) <= 1e-4, task

    run(scenario())


def test_unknown_task_and_bad_parameters(shared):
    async def scenario():
        async with client(shared) as c:
            data = image_bytes(2)
            unknown = await classify(c, "nope", data)
            assert unknown.status_code == 404 and unknown.json()["error"] == "unknown_task"
            for task in ("clipart", "sketch", "indoor"):
                assert task in unknown.json()["detail"]
            for bad in ("0", "-3", "two"):
                response = await c.post(f"/classify?task=clipart&top_k={bad}", files={"file": ("a.png", data)})
                assert response.status_code == 422 and "top_k" in response.json()["detail"], bad
            missing = await c.post("/classify", files={"file": ("a.png", data)})
            assert missing.status_code == 422 and "task" in missing.json()["detail"]
            assert (await c.get("/tasks/nope")).status_code == 404

    run(scenario())


def _bomb_png(width: int, height: int) -> bytes:
    """A real decompression bomb: a grayscale PNG whose zlib stream inflates to width*height bytes."""
    compressor = zlib.compressobj(1)
    rows = bytes((width + 1) * 100)  # 100 rows of a filter byte + black pixels
    idat = b"".join(compressor.compress(rows) for _ in range(height // 100)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def _status_bytes(pid: int, field: str) -> int:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith(field))
    return int(line.split()[1]) * 1024


# the service silences it; pytest resets filters
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_size_limits_and_decompression_bomb(prompts_dir):
    bomb = _bomb_png(12_000, 12_000)  # 144 M pixels from a ~0.6 MB file; decoded: 144 MB gray, 432 MB RGB
    assert len(bomb) < 1 << 20

    async def scenario():
        config = settings(prompts_dir, max_upload_bytes=4000, max_image_pixels=100 * 100)
        async with serve(config) as client:
            big = image_bytes(3, size=(200, 200))
            assert len(big) > 4000
            declared = await client.post("/classify?task=clipart", content=big, headers={"content-type": "image/png"})
            assert declared.status_code == 413 and declared.json()["error"] == "upload_too_large"
            form = await classify(client, "clipart", big)  # under the multipart slack, over the file limit
            assert form.status_code == 413 and "4000 bytes" in form.json()["detail"]

            async def chunks():
                for i in range(0, len(big), 1000):
                    yield big[i:i + 1000]
            streamed = await client.post("/classify?task=clipart", content=chunks(),
                                         headers={"content-type": "image/png"})
            assert streamed.status_code == 413  # no content-length: refused while reading

            many_pixels = image_bytes(4, size=(150, 120))
            assert len(many_pixels) <= 4000 or pytest.fail("test image should compress under the byte limit")
            pixels = await classify(client, "clipart", many_pixels)
            assert pixels.status_code == 413 and "150x120" in pixels.json()["detail"]
        async with serve(settings(prompts_dir, max_image_pixels=10_000_000)) as client:
            # The HTTP workers decode: their peak resident size (VmHWM, reset first) must not grow by the
            # 144-432 MB a decoded canvas takes. No wall-clock bound: it would only measure the machine's load.
            workers = worker_pids(client)
            assert workers
            for pid in workers:
                Path(f"/proc/{pid}/clear_refs").write_text("5")
            resident = {pid: _status_bytes(pid, "VmRSS") for pid in workers}
            refused = await classify(client, "clipart", bomb)
            assert refused.status_code == 413 and refused.json()["error"] == "too_many_pixels", refused.text
            for pid in workers:
                assert _status_bytes(pid, "VmHWM") - resident[pid] < 50 << 20  # the canvas was never allocated
            assert (await classify(client, "clipart", image_bytes(5))).status_code == 200

    run(scenario())


def test_garbage_is_refused_with_the_reason(shared):
    png = image_bytes(6)
    cases = {
        "text": (b"hello, I am not an image", 415, "unsupported_type"),
        "truncated": (png[: len(png) // 2], 422, "corrupt"),
        "broken header": (png[:20], 422, "corrupt"),
        "empty": (b"", 422, "empty"),
    }

    async def scenario():
        async with client(shared) as c:
            for name, (data, status, error) in cases.items():
                response = await classify(c, "clipart", data)
                assert response.status_code == status, (name, response.text)
                assert response.json()["error"] == error and response.json()["detail"], name
            wrong_type = await c.post("/classify?task=clipart", content=png,
                                           headers={"content-type": "text/plain"})
            assert wrong_type.status_code == 415 and "multipart" in wrong_type.json()["detail"]
            no_file = await c.post("/classify?task=clipart", files={"image": ("a.png", png)})
            assert no_file.status_code == 422 and "'file'" in no_file.json()["detail"]
            assert (await classify(c, "clipart", png)).status_code == 200  # still serving

    run(scenario())


def test_metrics_match_the_traffic(shared, sets):
    async def scenario():
        async with client(shared) as c:
            before = (await c.get("/metrics")).text
            for i in range(3):
                assert (await classify(c, "clipart", image_bytes(20 + i))).status_code == 200
            for i in range(2):
                assert (await classify(c, "sketch", image_bytes(30 + i))).status_code == 200
            assert (await classify(c, "nope", image_bytes(40))).status_code == 404
            assert (await classify(c, "real", b"garbage")).status_code == 415
            bad_top_k = await c.post("/classify?task=sketch&top_k=0", content=image_bytes(41),
                                     headers={"content-type": "image/png"})
            assert bad_top_k.status_code == 422
            assert (await c.post("/classify?top_k=x", content=b"")).status_code == 422  # no task at all
            after = (await c.get("/metrics")).text
        added = metrics_added(before, after)

        assert added("mmap_requests_total", task="clipart", status="200") == 3
        assert added("mmap_requests_total", task="sketch", status="200") == 2
        assert added("mmap_requests_total", task="_unknown", status="404") == 1
        assert added("mmap_requests_total", task="real", status="415") == 1
        assert added("mmap_requests_total", task="sketch", status="422") == 1
        assert added("mmap_requests_total", task="_unknown", status="422") == 1
        assert added("mmap_request_duration_seconds_count", task="clipart") == 3
        assert added("mmap_images_rejected_total", reason="unsupported_type") == 1
        # Sequential requests: five forwards of one image each.
        assert added("mmap_batch_size_count") == 5 and added("mmap_batch_size_sum") == 5
        assert added("mmap_inference_duration_seconds_count") == 5
        assert added("mmap_queue_wait_seconds_count") == 5
        assert metric(after, "mmap_tasks_loaded") == sum(len(ps.tasks) for ps in sets.values())
        assert metric(after, "mmap_prompt_set_loads_total", result="success") == len(sets)
        assert metric(after, "mmap_prompt_set_loads_total", result="failure") == 0

    run(scenario())


def test_metrics_count_every_route_and_refusal(shared):
    """/classify/batch counts each image, or once when refused whole; /embed counts its rejected images; odd
    parameters are refused with 422/404 (never a 500), and each is counted."""
    async def scenario():
        async with client(shared) as c:
            before = (await c.get("/metrics")).text
            good, garbage = image_bytes(50), b"garbage"
            batch = await c.post("/classify/batch?task=sketch", files=[("file", ("a.png", good)),
                                                                       ("file", ("b.png", garbage))])
            assert [r["status"] for r in batch.json()["results"]] == [200, 415]
            refused = await c.post("/classify/batch?task=nope", files=[("file", ("a.png", good))] * 2)
            assert refused.status_code == 404 and refused.json()["error"] == "unknown_task"
            embedded = await c.post("/embed", content=garbage, headers={"content-type": "image/png"})
            assert embedded.status_code == 415
            for top_k in ("²", "0" * 30, "1_0"):  # isdigit() but not int(); zero however long; int()'s "10"
                response = await c.post("/classify", params={"task": "sketch", "top_k": top_k}, content=good,
                                        headers={"content-type": "image/png"})
                assert response.status_code == 422 and "top_k" in response.json()["detail"], top_k
            empty_task = await c.post("/classify?task=", content=good, headers={"content-type": "image/png"})
            assert empty_task.status_code == 404 and empty_task.json()["error"] == "unknown_task"
            after = (await c.get("/metrics")).text
        added = metrics_added(before, after)

        assert added("mmap_requests_total", task="sketch", status="200") == 1
        assert added("mmap_requests_total", task="sketch", status="415") == 1
        assert added("mmap_requests_total", task="_unknown", status="404") == 2
        assert added("mmap_requests_total", task="_unprompted", status="415") == 1
        assert added("mmap_requests_total", task="sketch", status="422") == 3
        assert added("mmap_images_rejected_total", reason="unsupported_type") == 2

    run(scenario())


def test_readyz_only_after_prompt_sets_and_warm_up(prompts_dir, tiny, tmp_path):
    # The three sets and 2,000 copies of one (hard links): loading takes seconds, so /readyz is seen loading.
    loading = tmp_path / "loading"
    shutil.copytree(prompts_dir, loading, copy_function=os.link)
    first = sorted(p for p in prompts_dir.iterdir() if p.is_dir())[0]
    for i in range(2000):
        shutil.copytree(first, loading / f"copy{i:04d}", copy_function=os.link)

    async def scenario():
        async with serve(settings(loading), ready=False) as client:
            assert (await client.get("/healthz")).json() == {"status": "alive", "engine": "up"}
            seen, deadline = [], time.monotonic() + 120
            while (response := await client.get("/readyz")).status_code != 200:
                assert time.monotonic() < deadline, response.text
                seen.append(response.json()["reason"])
                answer = await classify(client, "clipart", image_bytes(7))
                if answer.status_code == 200:  # only if it turned ready since
                    assert (await client.get("/readyz")).status_code == 200
                else:
                    assert answer.status_code in (404, 503), answer.text  # tasks unknown yet, or not warmed up
                await asyncio.sleep(0.005)
            assert response.json() == {"ready": True, "reason": None, "tasks": 7,
                                       "workers": {"serving": 1, "configured": 1}}
            assert seen, "/readyz was never seen loading"
            assert all(re.fullmatch(r"loading prompt sets( and warming up|: [\d,]+ of 2,003)", r) for r in seen), seen
            assert (await classify(client, "clipart", image_bytes(7))).status_code == 200

    run(scenario())


def test_readyz_not_ready_while_no_task_is_served(tiny, tmp_path):
    async def scenario():
        # Warmed up but serving no task is not ready either; loading a set makes it ready.
        empty = tmp_path / "empty"
        empty.mkdir()
        async with serve(settings(empty, admin_token="t"), ready=False) as client:
            deadline = time.monotonic() + 60
            while "warming up" in (reason := (await client.get("/readyz")).json()["reason"]):
                assert time.monotonic() < deadline, reason
                await asyncio.sleep(0.01)
            assert "no prompt set loaded" in reason
            make_set(tiny, "office", OFFICE, 1).save(empty / "office")
            loaded = await client.post("/admin/promptsets/office", headers={"authorization": "Bearer t"})
            assert loaded.status_code == 200, loaded.text
            deadline = time.monotonic() + 5  # the catalog reaches the worker right after the load's answer
            while (await client.get("/readyz")).status_code != 200:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)

    run(scenario())


def test_admin_api_is_off_without_a_token_and_guarded_with_one(prompts_dir, shared):
    async def scenario():
        async with client(shared) as c:
            assert (await c.get("/admin/promptsets")).status_code == 404
            assert (await c.delete("/admin/promptsets/office")).status_code == 404
        async with serve(settings(prompts_dir, admin_token="s3cret")) as guarded:
            missing = await guarded.get("/admin/promptsets")
            assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
            wrong = await guarded.get("/admin/promptsets", headers={"authorization": "Bearer guess"})
            assert wrong.status_code == 403 and wrong.json()["error"] == "forbidden"
            assert (await guarded.delete("/admin/promptsets/office",
                                        headers={"authorization": "Bearer guess"})).status_code == 403
            ok = await guarded.get("/admin/promptsets", headers={"authorization": "Bearer s3cret"})
            assert ok.status_code == 200
            assert {s["name"]: s["state"] for s in ok.json()["prompt_sets"]} == {
                "office": "loaded", "scenes": "loaded", "doodles": "loaded"}

    run(scenario())


def test_tasks_samples_page_and_docs(prompts_dir, sets, tmp_path, tiny):
    directory = tmp_path / "prompts"
    target = publish(sets["office"], directory)
    (target / "samples" / "clipart").mkdir(parents=True)
    sample = image_bytes(8)
    (target / "samples" / "clipart" / "dog.png").write_bytes(sample)
    (target / "samples" / "clipart" / "notes.txt").write_text("not an image")

    async def scenario():
        async with serve(settings(directory)) as client:
            listing = (await client.get("/tasks")).json()["tasks"]
            assert [t["task"] for t in listing] == ["clipart", "product", "real"]
            clipart = (await client.get("/tasks/clipart")).json()
            assert clipart == {"task": "clipart", "prompt_set": "office", "version": sets["office"].version,
                               "method": "mmap", "group": "office", "classes": ["dog", "cat", "car", "tree"],
                               "samples": ["/samples/clipart/dog.png"], "template": "a clipart of a {}.",
                               "evaluation": {}, "trained": {}, "metered": True, "rollout": None,
                               "temperature": 1.0, "min_score": None}
            served = await client.get("/samples/clipart/dog.png")
            assert served.status_code == 200 and served.content == sample
            assert (await client.get("/samples/clipart/notes.txt")).status_code == 404
            assert (await client.get("/samples/clipart/..%2F..%2Fpromptset.json")).status_code == 404
            page = await client.get("/", headers={"origin": "https://elsewhere.example"})
            assert page.status_code == 200 and "<title>" in page.text
            assert "access-control-allow-origin" not in page.headers  # CORS is off unless origins are configured
            for page, asset in (("/docs", "/docs-assets/swagger-ui-bundle.js"),
                                ("/redoc", "/docs-assets/redoc.standalone.js")):
                html = (await client.get(page)).text
                assert asset in html and "cdn" not in html.lower(), page  # works on an air-gapped host
                served = await client.get(asset)
                assert served.status_code == 200 and len(served.content) > 100_000, asset
            spec = (await client.get("/openapi.json")).json()
            assert "multipart/form-data" in spec["paths"]["/classify"]["post"]["requestBody"]["content"]

    run(scenario())
