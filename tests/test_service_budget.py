"""A worker's budget of upload bytes in flight (`max_inflight_bytes`): concurrent big batches get 503 `busy`
beyond it instead of the worker's memory, and the worker's peak RSS stays under a stated bound."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import httpx
import pytest
from helpers.service import OFFICE, make_set, publish, run, served, settings, worker_pids

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from upload_budget import noise_png, peak_rss_mib  # noqa: E402  (the benchmark's own image and reading)

IMAGE_BYTES = 19_000_000
RSS_BOUND_MIB = 1024  # the bound README's limits table states for the defaults: 1 GiB a worker


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_four_concurrent_batches_of_16_x_19_mb_stay_within_the_budget(tiny, tmp_path):
    publish(make_set(tiny, "office", OFFICE, 1), tmp_path)
    image = noise_png(IMAGE_BYTES)
    assert 0.95 * IMAGE_BYTES < len(image) < 20 << 20
    files = [("file", (f"{i}.png", image, "image/png")) for i in range(16)]

    with served(settings(tmp_path)) as base:
        (worker,) = worker_pids(base)
        before = peak_rss_mib(worker)

        async def scenario() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=base, timeout=120) as client:
                return await asyncio.gather(*(client.post("/classify/batch?task=clipart", files=files)
                                              for _ in range(4)))

        responses = run(scenario())
        peak = peak_rss_mib(worker)
        statuses = sorted(r.status_code for r in responses)
        busy = [r for r in responses if r.status_code == 503]
        assert set(statuses) <= {200, 503} and statuses.count(200) >= 1 and busy, statuses
        assert all(r.json()["error"] == "busy" and r.headers["retry-after"] == "1" for r in busy)
        served_ok = next(r for r in responses if r.status_code == 200).json()["results"]
        assert [item["status"] for item in served_ok] == [200] * 16
        print(f"worker peak RSS {before:.0f} MiB before, {peak:.0f} MiB after; {statuses}")
        assert peak < RSS_BOUND_MIB, f"peak RSS {peak:.0f} MiB"
