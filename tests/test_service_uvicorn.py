"""`python -m service` as a real uvicorn process on loopback: flags over env, classify, metrics, admin, clean stop."""

from __future__ import annotations

import asyncio
import signal

import httpx
import pytest
from helpers.service import OFFICE, SERVED_ENV, image_bytes, make_set, metric, publish, run, service_process


@pytest.mark.slow  # a real process start (imports torch): seconds to tens of seconds
def test_python_m_service_on_loopback(tiny, tmp_path):
    prompts = tmp_path / "prompts"
    office = make_set(tiny, "office", OFFICE, 1)
    publish(office, prompts)
    log = tmp_path / "service.log"
    env = {**SERVED_ENV, "MMAP_PORT": "1", "MMAP_PROMPTS": str(prompts), "MMAP_ADMIN_TOKEN": "t0ken"}
    with service_process(log, ["--max-batch-size", "8"], env) as (base, process):  # --port overrides MMAP_PORT

        async def scenario():
            async with httpx.AsyncClient(base_url=base, timeout=30) as client:
                data = image_bytes(1)
                form = await client.post("/classify?task=clipart&top_k=2", files={"file": ("a.png", data, "image/png")})
                assert form.status_code == 200, form.text
                body = form.json()
                assert body["version"] == office.version and len(body["predictions"]) == 2
                raw = await client.post("/classify?task=clipart&top_k=2", content=data,
                                        headers={"content-type": "image/png"})
                assert raw.json()["predictions"] == body["predictions"]
                burst = await asyncio.gather(*(client.post(f"/classify?task={t}", content=image_bytes(i),
                                                           headers={"content-type": "image/png"})
                                               for i, t in enumerate(["clipart", "product", "real"] * 4)))
                assert [r.status_code for r in burst] == [200] * 12
                text = (await client.get("/metrics")).text
                assert metric(text, "mmap_requests_total", task="clipart", status="200") == 6
                assert metric(text, "mmap_batch_size_sum") == 14
                admin = await client.get("/admin/promptsets", headers={"authorization": "Bearer t0ken"})
                assert admin.status_code == 200 and admin.json()["prompt_sets"][0]["version"] == office.version

        run(scenario())
        process.send_signal(signal.SIGTERM)
        # The launcher drains its workers and the engine, and exits 0 on SIGTERM (a stop it was asked for).
        assert process.wait(timeout=30) == 0
    assert "Application shutdown complete" in log.read_text()
