"""Rollouts on live traffic (docs/architecture.md, "Rollouts"): canary, shadow, pinning, evidence, promote and abort,
records in the prompt directory followed by every worker and every instance. The embedded model and its demo set,
scored on the procedural images of the task's own classes, so that the live answers mean something."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from helpers.service import OFFICE, make_set, publish, run, serve, settings
from PIL import Image

from mmap_model import EMBEDDED_PROMPTS_DIR, PromptConfig, PromptSet, load_backbone, rollouts
from service.engine.core import InferenceCore
from service.metrics import Metrics
from training import publish as publish_cli
from training import synthetic

TOKEN = "rollout-token"
ADMIN = {"authorization": f"Bearer {TOKEN}"}
DEMO = "clipart-painting-photo-product-sketch"
TASK = "clipart"


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    """40 clipart images: one of each of the task's first 40 classes."""
    classes = json.loads((EMBEDDED_PROMPTS_DIR / DEMO / "promptset.json").read_text())["tasks"][TASK]["classnames"]
    index = {name: i for i, name in enumerate(synthetic.CLASSES)}
    return [png(synthetic.image(index[name], TASK, 0, seed=11)) for name in classes]


def demo_with_twin(directory: Path) -> str:
    """The demo set and `twin`, its weights under another name (the same version), held out of clipart by a record
    written before it (so it never serves clipart). The live version."""
    shutil.copytree(EMBEDDED_PROMPTS_DIR / DEMO, directory / DEMO)
    rollouts.start(directory, TASK, "twin", "canary", 1)
    shutil.copytree(EMBEDDED_PROMPTS_DIR / DEMO, directory / "twin")
    return PromptSet.load(directory / DEMO).version


async def add_noise(c: httpx.AsyncClient, directory: Path, mode: str, share: float, **limits) -> str:
    """`noise`: the demo tasks with random prompts (MaPLe, 16 tokens: small random MmAP prompts leave the backbone's
    zero-shot answers standing), published as a candidate: its record first, then the set, loaded through the
    admin API. Its version."""
    demo = PromptSet.load(directory / DEMO)
    torch.manual_seed(0)
    noise = PromptSet.create("noise", load_backbone(), PromptConfig(method="maple", group_tokens=16, task_tokens=16,
                                                                    init_std=1.0), demo.tasks)
    rollouts.start(directory, TASK, "noise", mode, share, **limits)
    noise.publish(directory)
    response = await c.post("/admin/promptsets/noise", headers=ADMIN)
    assert response.status_code == 200, response.text
    return noise.version


def embedded_settings(directory: Path, **overrides):
    return settings(directory, model="mmap-tiny", pretrained="embedded", admin_token=TOKEN, **overrides)


async def put(c: httpx.AsyncClient, task: str, **body) -> dict:
    response = await c.put(f"/admin/rollouts/{task}", json=body, headers=ADMIN)
    assert response.status_code == 200, response.text
    return response.json()["rollouts"][0]


async def sequential(c: httpx.AsyncClient, images: list[bytes], **params) -> list[bytes]:
    bodies = []
    for data in images:
        response = await c.post("/classify", params={"task": TASK, "top_k": 40, **params},
                                files={"file": ("a.png", data, "image/png")})
        assert response.status_code == 200, response.text
        bodies.append(response.content)
    return bodies


async def figures(c: httpx.AsyncClient, compared: int, timeout_s: float = 30) -> dict:
    """The task's rollout once its shadow has compared `compared` requests."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = (await c.get(f"/tasks/{TASK}/rollout")).json()
        if (status["shadow"] or {}).get("compared", 0) >= compared or time.monotonic() > deadline:
            return status
        await asyncio.sleep(0.05)


def test_shadow_canary_pinning_and_evidence(tmp_path, images):
    live = demo_with_twin(tmp_path)
    versions = {DEMO: live}

    async def scenario():
        async with serve(embedded_settings(tmp_path)) as c:
            info = (await c.get(f"/tasks/{TASK}")).json()
            assert (info["prompt_set"], info["version"]) == (DEMO, live)  # twin is newer, yet held out by the record
            assert info["rollout"]["candidate"] == "twin" and info["rollout"]["mode"] == "canary"
            assert (await c.get("/tasks/painting")).json()["prompt_set"] == "twin"  # (no record: the newest)
            response = await c.post(f"/admin/rollouts/{TASK}/abort", headers=ADMIN)
            assert response.json()["rollouts"][0]["state"] == "aborted"
            baseline = await sequential(c, images)
            assert all(json.loads(b)["version"] == live for b in baseline)

            # Shadow at 100 %: every answer byte for byte the live one; the twin agrees on every image.
            status = await put(c, TASK, candidate="twin", mode="shadow", share=100)
            assert status["state"] == "active" and status["candidate_version"] == live
            assert await sequential(c, images) == baseline
            status = await figures(c, len(images))
            assert status["shadow"]["compared"] == len(images) and status["shadow"]["agreement"] == 1.0
            answered = {(f["prompt_set"], f["role"]): f["requests"] for f in status["answered"]}
            assert answered == {(DEMO, "live"): len(images)}

            # A random-prompt candidate: the same live answers, and it disagrees with most of them.
            assert (await c.delete("/admin/promptsets/twin", headers=ADMIN)).status_code == 200  # (else it is live)
            versions["noise"] = await add_noise(c, tmp_path, "shadow", 100)
            assert versions["noise"] != live
            assert await sequential(c, images) == baseline
            status = await figures(c, len(images))
            assert status["shadow"]["compared"] == len(images) and status["shadow"]["agreement"] < 0.5, status
            assert 0 < status["shadow"]["candidate_mean_top1_score"] <= 1
            metrics = (await c.get("/metrics")).text
            assert f'mmap_rollout_requests_total{{role="shadow",task="{TASK}",version="{versions["noise"]}"}} ' \
                   f'{len(images)}.0' in metrics

            # Canary at 10 %: of 2,000 answers, 10 +- 3 % carry the candidate's version.
            await put(c, TASK, candidate="noise", mode="canary", share=10)
            semaphore = asyncio.Semaphore(8)

            async def one(i: int, headers: dict | None = None) -> str:
                async with semaphore:
                    response = await c.post("/classify", params={"task": TASK, "top_k": 1}, headers=headers or {},
                                            files={"file": ("a.png", images[i % len(images)], "image/png")})
                    assert response.status_code == 200, response.text
                    return response.json()["version"]

            answered = Counter(await asyncio.gather(*(one(i) for i in range(2000))))
            assert set(answered) == {live, versions["noise"]}
            assert 0.07 <= answered[versions["noise"]] / 2000 <= 0.13, answered
            status = (await c.get(f"/tasks/{TASK}/rollout")).json()
            by_version = {f["version"]: f for f in status["answered"]}
            assert by_version[versions["noise"]]["requests"] == answered[versions["noise"]]
            assert by_version[versions["noise"]]["role"] == "candidate" and status["shadow"] is None

            # With a client id, each client keeps its version; at 50 % both versions have clients.
            await put(c, TASK, candidate="noise", mode="canary", share=50)
            clients = {}
            for client in range(40):
                got = await asyncio.gather(*(one(i, {"x-client-id": f"client-{client}"}) for i in range(5)))
                assert len(set(got)) == 1, got
                clients[client] = got[0]
            assert set(clients.values()) == {live, versions["noise"]}
            # ... and in a batch request, every image gets the client's (or, without an id, the request's) version
            for headers in ({"x-client-id": "client-3"}, {}):
                response = await c.post("/classify/batch", params={"task": TASK, "top_k": 1}, headers=headers,
                                        files=[("file", ("a.png", data, "image/png")) for data in images[:16]])
                got = {r["version"] for r in response.json()["results"]}
                assert len(got) == 1 and (not headers or got == {clients[3]})

            # Pinning: either served version, whatever the canary says; another is 409 naming both.
            for version in (live, versions["noise"]):
                got = await asyncio.gather(*(c.post("/classify", params={"task": TASK, "version": version},
                                                    files={"file": ("a.png", data, "image/png")})
                                             for data in images[:10]))
                assert {r.json()["version"] for r in got} == {version}
            response = await c.post("/classify", params={"task": TASK, "version": "0123456789ab"},
                                    files={"file": ("a.png", images[0], "image/png")})
            assert response.status_code == 409 and response.json()["error"] == "version_not_served"
            assert live in response.json()["detail"] and versions["noise"] in response.json()["detail"]
            metadata = (await c.get(f"/v2/models/{TASK}")).json()
            assert metadata["versions"] == [live, versions["noise"]]

            # Promote: one step, then the task serves the candidate alone.
            response = await c.post(f"/admin/rollouts/{TASK}/promote", headers=ADMIN)
            assert response.status_code == 200 and response.json()["rollouts"][0]["state"] == "none"
            info = (await c.get(f"/tasks/{TASK}")).json()
            assert (info["prompt_set"], info["version"], info["rollout"]) == ("noise", versions["noise"], None)
            assert {json.loads(b)["version"] for b in await sequential(c, images[:10])} == {versions["noise"]}
            assert not (tmp_path / "_rollouts" / f"{TASK}.json").exists()

    run(scenario())


def test_automatic_abort_and_refused_records(tmp_path, images):
    live = demo_with_twin(tmp_path)

    async def scenario():
        async with serve(embedded_settings(tmp_path, watch_interval_s=0.1, watch_debounce_s=0.2)) as c:
            await add_noise(c, tmp_path, "shadow", 100, abort_below=0.9, min_requests=20)
            await sequential(c, images[:25])
            deadline = time.monotonic() + 30
            while (status := (await c.get(f"/tasks/{TASK}/rollout")).json())["state"] != "aborted":
                assert time.monotonic() < deadline, status
                await asyncio.sleep(0.1)
            assert status["reason"].startswith("automatic: top-1 agreement") and status["candidate_version"] is None
            assert rollouts.read(tmp_path, TASK).mode == "aborted"  # in the directory: every engine follows
            assert {json.loads(b)["version"] for b in await sequential(c, images[:5])} == {live}

            # A broken record changes nothing: the task's record in effect stays, and the listing says why.
            await put(c, TASK, candidate="noise", mode="canary", share=30)
            (tmp_path / "_rollouts" / f"{TASK}.json").write_text('{"task": "clipart", "mode": "canary"')
            (tmp_path / "_rollouts" / "painting.json").write_text(json.dumps(
                {"task": "painting", "candidate": "twin", "mode": "shadow", "share": 250}))
            deadline = time.monotonic() + 30
            while True:
                listing = (await c.get("/admin/rollouts", headers=ADMIN)).json()["rollouts"]
                if len(listing) == 2 and all(r["error"] for r in listing):
                    break
                assert time.monotonic() < deadline, listing
                await asyncio.sleep(0.1)
            by_task = {r["task"]: r for r in listing}
            assert by_task[TASK]["state"] == "active" and by_task[TASK]["share"] == 30
            assert "not JSON" in by_task[TASK]["error"]
            assert by_task["painting"]["state"] == "none" and "share 250" in by_task["painting"]["error"]
            assert (await c.get("/tasks/painting")).json()["rollout"] is None

    run(scenario())


def test_two_instances_of_two_workers_follow_the_directory(tiny, tmp_path):
    """Records written by one instance's admin API, and by training.publish, reach every worker of both."""
    publish(make_set(tiny, "office", OFFICE, 1), tmp_path)
    rollouts.start(tmp_path, "clipart", "office2", "canary", 100)
    publish(make_set(tiny, "office2", OFFICE, 2), tmp_path)
    live, candidate = (PromptSet.load(tmp_path / n).version for n in ("office", "office2"))
    config = settings(tmp_path, workers=2, watch_interval_s=0.1, watch_debounce_s=0.2, admin_token=TOKEN)
    data = png(np.full((40, 48, 3), 120, np.uint8))

    async def versions(c: httpx.AsyncClient) -> dict[str, set[str]]:
        seen: dict[str, set[str]] = {}
        for _ in range(40):
            r = await c.post("/classify", params={"task": "clipart"}, files={"file": ("a.png", data, "image/png")},
                             headers={"connection": "close"})  # a connection each: the launcher spreads them
            seen.setdefault(r.headers["x-mmap-worker"], set()).add(r.json()["version"])
        return seen

    async def scenario():
        async with serve(config) as a, serve(config) as b:
            for c in (a, b):
                assert (await versions(c)).keys() == {"0", "1"}
                assert set().union(*(await versions(c)).values()) == {candidate}
            rows = await asyncio.to_thread(publish_cli.main, ["--to", str(tmp_path), "--status", "--service",
                                                              str(b.base_url)])
            (row,) = rows["rollouts"]
            assert row["record"]["candidate"] == "office2" and row["service"]["state"] == "active"
            assert {f["version"]: f["requests"] for f in row["service"]["answered"]} == {candidate: 80}  # b's own count
            await a.post("/admin/rollouts/clipart/abort", headers=ADMIN)
            deadline = time.monotonic() + 30
            while (await b.get("/tasks/clipart")).json()["rollout"]["state"] != "aborted":
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            for c in (a, b):
                assert set().union(*(await versions(c)).values()) == {live}
            rollouts.start(tmp_path, "clipart", "office2", "canary", 100)  # what training.publish --canary writes
            rollouts.promote(tmp_path, "clipart")  # ... and --promote
            for c in (a, b):
                deadline = time.monotonic() + 30
                while (info := (await c.get("/tasks/clipart")).json())["version"] != candidate or info["rollout"]:
                    assert time.monotonic() < deadline, info
                    await asyncio.sleep(0.05)
                assert set().union(*(await versions(c)).values()) == {candidate}

    run(scenario())


def test_promote_and_abort_under_load_fail_no_request(tiny, tmp_path):
    publish(make_set(tiny, "office", OFFICE, 1), tmp_path)
    publish(make_set(tiny, "office2", OFFICE, 2), tmp_path)  # the newest: live
    live = PromptSet.load(tmp_path / "office2").version
    data = png(np.full((40, 48, 3), 90, np.uint8))

    async def scenario():
        async with serve(settings(tmp_path, workers=2, admin_token=TOKEN)) as c:
            statuses: Counter = Counter()
            seen: list[str] = []
            stop = asyncio.Event()

            async def load() -> None:
                while not stop.is_set():
                    r = await c.post("/classify", params={"task": "clipart"},
                                     files={"file": ("a.png", data, "image/png")})
                    statuses[r.status_code] += 1
                    if r.status_code == 200:
                        seen.append(r.json()["version"])

            clients = [asyncio.create_task(load()) for _ in range(8)]
            try:
                for mode, end in (("shadow", "abort"), ("canary", "abort"), ("canary", "promote")):
                    await asyncio.sleep(0.5)
                    await put(c, "clipart", candidate="office", mode=mode, share=50)
                    await asyncio.sleep(0.5)
                    response = await c.post(f"/admin/rollouts/clipart/{end}", headers=ADMIN)
                    assert response.status_code == 200, response.text
                promoted = len(seen)
                await asyncio.sleep(0.5)
            finally:
                stop.set()
                await asyncio.gather(*clients)
            assert set(statuses) == {200} and statuses[200] > 100, statuses
            candidate = PromptSet.load(tmp_path / "office").version
            assert set(seen[:promoted]) == {live, candidate}
            assert set(seen[promoted + 16:]) == {candidate}  # (requests answered while the promote was on its way)
            assert (await c.get("/tasks/clipart")).json()["rollout"] is None

    run(scenario())


def test_an_automatic_abort_on_a_directory_it_cannot_write_holds_in_that_engine(tiny, tmp_path, monkeypatch):
    """A read-only prompt mount (Kubernetes): the engine that measured the disagreement stops the shadow on its own
    and says why; the record on disk is left as it was."""
    publish(make_set(tiny, "office", OFFICE, 1), tmp_path)
    rollouts.start(tmp_path, "clipart", "office2", "shadow", 100, abort_below=0.9, min_requests=3)
    publish(make_set(tiny, "office2", OFFICE, 2), tmp_path)
    core = InferenceCore(settings(tmp_path), tiny, Metrics())
    core.registry.scan()
    core.ready = True
    active = core.registry.snapshot.rollouts["clipart"]
    assert active.state == "active"
    live, candidate = core.registry.snapshot.tasks["clipart"], active.candidate
    for agrees in (True, False, False):  # 1 of 3 agree: below 0.9 after 3 requests
        core.evidence.compare(candidate, ("dog", 0.5), ("dog" if agrees else "cat", 0.4))

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(rollouts, "abort", read_only)
    core.poll_prompts()
    active = core.registry.snapshot.rollouts["clipart"]
    assert active.state == "aborted" and "below 0.9 after 3 requests" in active.record.reason
    assert core.registry.snapshot.tasks["clipart"] is live
    assert rollouts.read(tmp_path, "clipart").mode == "shadow"  # the directory was not written
