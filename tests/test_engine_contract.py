"""One contract, two transports: the HTTP app behind `python -m service` (shared memory + ZeroMQ to the engine
process) and behind Ray Serve (a DeploymentHandle to an engine replica) gives the same answers, errors and
status codes: byte for byte where the answer is deterministic (one image a forward, one torch thread), the
same queue bound (503 `overloaded`), and 503 `engine_unavailable` at once when the engine is gone."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers.service import (
    DOODLES,
    OFFICE,
    SERVED,
    engine_pid,
    free_port,
    image_bytes,
    make_set,
    publish,
    served,
    settings,
)

from mmap_model import PromptSet, rollouts

pytest.importorskip("ray.serve", reason="the ray extra is not installed: pip install -e '.[ray]'")
import ray  # noqa: E402
from ray import serve  # noqa: E402

DEPLOY_RAY = Path(__file__).resolve().parents[1] / "deploy" / "ray"
ADMIN = {"authorization": "Bearer contract"}
# Deterministic scores: one torch thread, one image a forward when requests come one at a time.
OPTIONS = {"engine_threads": 1, "watch_interval_s": 0, "decode_workers": 1, "queue_size": 4, "max_batch_size": 4,
           "admin_token": "contract"}
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def prompts(tiny, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("prompts")
    publish(make_set(tiny, "office", OFFICE, 1), directory)
    publish(make_set(tiny, "doodles", DOODLES, 2), directory)
    rollouts.start(directory, "clipart", "office2", "shadow", 100)  # a rollout: the same on both transports
    publish(make_set(tiny, "office2", OFFICE, 3), directory)
    return directory


@pytest.fixture(scope="module")
def process(prompts) -> Iterator[str]:
    with served(settings(prompts, **OPTIONS)) as base:
        yield base


@pytest.fixture(scope="module")
def ray_app(prompts) -> Iterator[dict[str, str]]:
    """Serve's proxy in front of the ingress replica, and the replica's own HTTP port (`http_port`)."""
    sys.path.insert(0, str(DEPLOY_RAY))
    import serve_app

    port, direct = free_port(), free_port()
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, object_store_memory=100 << 20, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(DEPLOY_RAY)}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = {**SERVED, "prompts": str(prompts), "device": "cpu", **OPTIONS}
        cpu = {"num_cpus": 0.5, "num_gpus": 0}
        engine = serve_app.MmapEngine.options(num_replicas=1, ray_actor_options=cpu).bind(settings=config)
        ingress = serve_app.MmapIngress.options(num_replicas=1, ray_actor_options=cpu)
        serve.run(ingress.bind(engine, settings=config, http_port=direct), name="mmap", route_prefix="/")
        yield {"proxy": f"http://127.0.0.1:{port}", "direct": f"http://127.0.0.1:{direct}"}
    finally:
        serve.shutdown()
        ray.shutdown()
        sys.path.remove(str(DEPLOY_RAY))


def _requests(prompts: Path) -> list[tuple[str, str, dict]]:
    png, jpeg = image_bytes(1), image_bytes(2, fmt="JPEG")
    raw = {"headers": {"content-type": "image/png"}}
    candidate = PromptSet.load(prompts / "office2").version
    return [
        ("POST", f"/classify?task=clipart&version={candidate}", {"content": png, **raw}),
        ("POST", "/classify?task=clipart&version=0123", {"content": png, **raw}),
        ("POST", "/classify?task=product&min_score=1", {"content": png, **raw}),
        ("GET", "/tasks/clipart/rollout", {}),
        ("GET", "/admin/rollouts", {"headers": ADMIN}),
        ("POST", "/classify?task=clipart&top_k=3", {"files": {"file": ("a.png", png)}}),
        ("POST", "/classify?task=sketch", {"content": jpeg, "headers": {"content-type": "image/jpeg"}}),
        ("POST", "/classify?task=clipart&labels=mug,boat,kite", {"content": png, **raw}),
        ("POST", "/classify/batch?task=real", {"files": [("file", ("a.png", png)), ("file", ("b.png", b"x"))]}),
        ("POST", "/embed?task=product", {"content": png, **raw}),
        ("POST", "/embed", {"content": png, **raw}),
        ("POST", "/classify?task=nope", {"content": png, **raw}),
        ("POST", "/classify?task=clipart&top_k=0", {"content": png, **raw}),
        ("POST", "/classify?task=clipart&bogus=1", {"content": png, **raw}),
        ("POST", "/classify?task=clipart", {"content": b"not an image", **raw}),
        ("GET", "/tasks", {}),
        ("GET", "/tasks/clipart", {}),
        ("GET", "/tasks/nope", {}),
        ("GET", "/samples/clipart/none.png", {}),
        ("GET", "/admin/promptsets", {"headers": ADMIN}),
        ("POST", "/admin/promptsets/absent", {"headers": ADMIN}),
        ("DELETE", "/admin/promptsets/absent", {"headers": ADMIN}),
        ("POST", "/admin/promptsets/office", {"headers": ADMIN}),
        ("GET", "/readyz", {}),
    ]


def _comparable(response: httpx.Response) -> tuple[int, bytes | object]:
    """Status and body; the admin listing less its load times, /readyz less the launcher's worker count."""
    if response.url.path.endswith("rollout") or response.url.path == "/admin/rollouts":  # (figures: when counted)
        body = response.json()
        return response.status_code, [(r["task"], r["state"], r["candidate_version"]) for r in body.get(
            "rollouts", [body])]
    if response.url.path.startswith("/admin") and response.status_code == 200:
        listing = response.json()
        for s in listing["prompt_sets"]:
            s.pop("loaded_at")
        return response.status_code, listing
    if response.url.path == "/readyz":
        body = response.json()
        body.pop("workers", None)
        return response.status_code, body
    return response.status_code, response.content


@pytest.fixture(scope="module")
def on_ray(ray_app) -> str:
    return ray_app["proxy"]


@pytest.fixture(scope="module")
def on_ray_directly(ray_app) -> str:
    return ray_app["direct"]


def test_both_transports_answer_byte_for_byte_alike(prompts, process, on_ray, on_ray_directly):
    answers = {}
    requests = _requests(prompts)
    for name, base in (("process", process), ("ray", on_ray), ("ray, directly", on_ray_directly)):
        with httpx.Client(base_url=base, timeout=60) as client:
            answers[name] = [_comparable(client.request(method, url, **kw)) for method, url, kw in requests]
    statuses = [status for status, _ in answers["process"]]
    assert statuses == [200, 409, 200, 200, 200, 200, 200, 200, 200, 200, 200, 404, 422, 422, 415, 200, 200, 404, 404,
                        200, 404, 404, 200, 200]
    for name in ("ray", "ray, directly"):
        for (method, url, _), one, other in zip(requests, answers["process"], answers[name], strict=True):
            assert one == other, f"{name}: {method} {url}"


async def _flood(base: str, n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        return await asyncio.gather(*(client.post("/classify?task=clipart", content=image_bytes(i % 5),
                                                  headers={"content-type": "image/png"}) for i in range(n)))


@pytest.mark.parametrize("transport", ["process", "on_ray", "on_ray_directly"])
def test_the_engines_queue_bound_holds_on_both(transport, request):
    base = request.getfixturevalue(transport)
    responses = asyncio.run(_flood(base, 64))
    refused = [r for r in responses if r.status_code != 200]
    assert refused and len(refused) < len(responses), [r.status_code for r in responses]
    for r in refused:
        assert r.status_code == 503 and r.json()["error"] == "overloaded" and int(r.headers["retry-after"]) >= 1


def _answers_within(base: str, seconds: float) -> list[tuple[float, int, str]]:
    """Requests one after another for `seconds`: (seconds each took, status, error code)."""
    seen = []
    with httpx.Client(base_url=base, timeout=30) as client:
        end = time.monotonic() + seconds
        while not seen or time.monotonic() < end:
            started = time.monotonic()
            response = client.post("/classify?task=clipart", content=image_bytes(3),
                                   headers={"content-type": "image/png"})
            error = response.json().get("error", "") if response.status_code != 200 else ""
            seen.append((time.monotonic() - started, response.status_code, error))
    return seen


def test_a_dead_engine_replica_gives_503_at_once_on_ray(on_ray):
    """Killed (its actor, as a crash would), the engine replica's requests get 503 engine_unavailable within
    seconds, not at the request timeout; Serve starts a new replica, and the ingress serves again."""
    engine = next(a for a in ray.util.list_named_actors(all_namespaces=True) if "mmap-engine" in a["name"])
    ray.kill(ray.get_actor(engine["name"], namespace=engine["namespace"]), no_restart=True)
    seen = _answers_within(on_ray, 8)
    assert max(took for took, _, _ in seen) < 5, seen
    assert {(status, error) for _, status, error in seen} <= {(200, ""), (503, "engine_unavailable")}, seen
    assert (503, "engine_unavailable") in {(status, error) for _, status, error in seen}, seen
    deadline = time.monotonic() + 90
    while httpx.post(f"{on_ray}/classify?task=clipart", content=image_bytes(3), timeout=30,
                     headers={"content-type": "image/png"}).status_code != 200:
        assert time.monotonic() < deadline, "the ingress never served again"
        time.sleep(0.5)


def test_a_dead_engine_process_gives_503_at_once(prompts):
    """The launcher layout's counterpart (the launcher then stops the service, exit 1)."""
    with served(settings(prompts, **OPTIONS)) as base:
        os.kill(engine_pid(base), signal.SIGKILL)
        started = time.monotonic()
        try:
            response = httpx.post(f"{base}/classify?task=clipart", content=image_bytes(3),
                                  headers={"content-type": "image/png"}, timeout=30)
            assert response.status_code == 503 and response.json()["error"] == "engine_unavailable", response.text
        except httpx.TransportError:
            pass  # the launcher stopped the service first
        assert time.monotonic() - started < 5
