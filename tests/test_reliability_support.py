"""Helpers shared by the reliability tests (this module holds no tests).

Builds on test_service_support.py (same served backbone, prompt sets and in-process app); adds a
real uvicorn server on a loopback port in a background thread, a loop of good requests that runs
next to whatever a test throws at the service, and readers of a process's memory.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI
from test_service_support import classify, free_port, image_bytes

ADMIN_TOKEN = "reliability-t0ken"
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}


@contextmanager
def uvicorn_thread(app: FastAPI, ready_timeout_s: float = 60) -> Iterator[str]:
    """`app` behind a real uvicorn server on 127.0.0.1 (lifespan included), run in a daemon thread;
    yields the base URL once /readyz is 200 and stops the server at the end."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            assert thread.is_alive(), "uvicorn exited during start-up"
            assert time.monotonic() < deadline, f"not ready in {ready_timeout_s} s"
            try:
                if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@dataclass
class GoodTraffic:
    """A loop of valid classify requests over some tasks; every answer is recorded."""

    client: httpx.AsyncClient
    tasks: tuple[str, ...]
    workers: int = 2
    minimum: int = 10  # on exit, keep going until this many answers came back (a short burst is not "meanwhile")
    statuses: list[int] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task] = field(default_factory=list)

    async def __aenter__(self) -> GoodTraffic:
        self._tasks = [asyncio.create_task(self._loop(w)) for w in range(self.workers)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        deadline = time.monotonic() + 30
        while len(self.statuses) + len(self.failures) < self.minimum and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _loop(self, worker: int) -> None:
        i = 0
        while not self._stop.is_set():
            task = self.tasks[(worker + i) % len(self.tasks)]
            try:
                response = await classify(self.client, task, image_bytes(i % 5), top_k=1)
                self.statuses.append(response.status_code)
                if response.status_code != 200:
                    self.failures.append(f"{task}: {response.status_code} {response.text[:200]}")
            except httpx.HTTPError as e:  # a transport failure is a failed request too
                self.failures.append(f"{task}: {type(e).__name__}: {e}")
            i += 1
            await asyncio.sleep(0)

    def assert_all_served(self) -> None:
        assert not self.failures, self.failures[:5]
        assert len(self.statuses) >= self.minimum, f"only {len(self.statuses)} good requests ran alongside"


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of a process (Linux /proc)."""
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmRSS"))
    return int(line.split()[1]) * 1024


def assert_json_error(response: httpx.Response, status: int, error: str | None = None) -> None:
    """The documented error shape: the status, JSON `{"error", "detail"}`, and the code when given."""
    assert response.status_code == status, (status, response.status_code, response.text[:300])
    assert response.headers["content-type"] == "application/json", response.headers
    body = response.json()
    assert set(body) == {"error", "detail"} and body["detail"], body
    if error is not None:
        assert body["error"] == error, body
