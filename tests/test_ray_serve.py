"""Ray Serve (deploy/ray): a local Serve on the CPU with 2 ingress replicas (the service's own HTTP app) in
front of an engine replica answers the same HTTP API through Ray's proxy, both ingress replicas serve, the
scores are the reference's, and everything shuts down. Bounded in time."""

from __future__ import annotations

import signal
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

pytest.importorskip("ray.serve", reason="the ray extra is not installed: pip install -e '.[ray]'")
import ray  # noqa: E402
from helpers.service import OFFICE, SERVED, free_port, image_bytes, make_set, publish, reference_scores  # noqa: E402
from ray import serve  # noqa: E402

DEPLOY_RAY = Path(__file__).resolve().parents[1] / "deploy" / "ray"
BUDGET_S = 150  # hard stop: a hung Ray start fails the test instead of hanging CI


@pytest.fixture
def serve_app_module():
    sys.path.insert(0, str(DEPLOY_RAY))
    try:
        import serve_app

        yield serve_app
    finally:
        sys.path.remove(str(DEPLOY_RAY))


def _alarm(signum, frame):
    raise TimeoutError(f"Ray Serve test exceeded {BUDGET_S} s")


@pytest.mark.slow
def test_two_replicas_serve_the_http_api_through_the_ray_proxy(serve_app_module, tiny, tmp_path):
    office = make_set(tiny, "office", OFFICE, 1)
    publish(office, tmp_path)
    port = free_port()
    started = time.monotonic()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(BUDGET_S)
    try:
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, object_store_memory=100 << 20, log_to_driver=False,
                 # replicas import serve_app as a cluster would
                 runtime_env={"env_vars": {"PYTHONPATH": str(DEPLOY_RAY)}})
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = {**SERVED, "prompts": str(tmp_path), "device": "cpu", "watch_interval_s": 0, "decode_workers": 1,
                    "max_batch_size": 8, "engine_threads": 1}
        cpu = {"num_cpus": 0.5, "num_gpus": 0}
        engine = serve_app_module.MmapEngine.options(num_replicas=1, ray_actor_options=cpu).bind(settings=settings)
        ingress = serve_app_module.MmapIngress.options(num_replicas=2, ray_actor_options=cpu)
        serve.run(ingress.bind(engine, settings=settings), name="mmap", route_prefix="/")  # returns once replicas run
        status = serve.status().applications["mmap"]
        assert status.status == "RUNNING"
        assert status.deployments["mmap-ingress"].replica_states == {"RUNNING": 2}
        assert status.deployments["mmap-engine"].replica_states == {"RUNNING": 1}

        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            assert client.get("/readyz").json()["ready"] is True  # the engine replica warmed up before it ran
            assert {t["task"] for t in client.get("/tasks").json()["tasks"]} == set(OFFICE)
            data = {seed: image_bytes(seed) for seed in range(4)}

            def classify(i: int) -> httpx.Response:
                return client.post("/classify", params={"task": "clipart", "top_k": 10},
                                   files={"file": ("x.png", data[i % 4], "image/png")})

            with ThreadPoolExecutor(max_workers=8) as pool:
                responses = list(pool.map(classify, range(24)))
            replicas = set()
            for i, response in enumerate(responses):
                assert response.status_code == 200, response.text
                got = {p["label"]: p["score"] for p in response.json()["predictions"]}
                expected = reference_scores(tiny, office, "clipart", data[i % 4])
                assert max(abs(got[k] - expected[k]) for k in expected) <= 1e-4
                replicas.add(response.headers["x-mmap-replica"])
            assert len(replicas) == 2, replicas  # Ray's proxy spread the load over both replicas
            unknown = client.post("/classify", params={"task": "nope"}, content=data[0],
                                  headers={"content-type": "image/png"})
            # same errors as the service
            assert unknown.status_code == 404 and unknown.json()["error"] == "unknown_task"
    finally:
        try:
            serve.shutdown()
            ray.shutdown()
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
    assert not ray.is_initialized()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass  # the proxy is gone
    assert time.monotonic() - started < BUDGET_S
