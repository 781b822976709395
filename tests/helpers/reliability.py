"""Helpers shared by the reliability tests (this module holds no tests).

Builds on helpers/service.py (same served backbone, prompt sets and real service processes);
adds a loop of good requests that runs next to whatever a test throws at the service, and readers
of a process's memory.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from helpers.service import classify, image_bytes

ADMIN_TOKEN = "reliability-t0ken"
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}


@dataclass
class RawResponse:
    status_code: int
    headers: dict[str, str]
    text: str

    def json(self) -> dict:
        return json.loads(self.text)


def raw_request(base: str, method: str, path: str, headers: dict[str, bytes] | None = None,
                body: bytes = b"") -> RawResponse:
    """One HTTP/1.1 request written byte for byte, for headers an HTTP client refuses to send
    (a trailing space, non-ASCII): the server's parser sees exactly these bytes."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    lines = [f"{method} {path} HTTP/1.1".encode(), f"Host: {host}".encode(), b"Connection: close",
             f"Content-Length: {len(body)}".encode()]
    lines += [name.encode() + b": " + value for name, value in (headers or {}).items()]
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    head, _, content = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
    return RawResponse(int(status_line.split()[1]), parsed, content.decode("utf-8", "replace"))


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
