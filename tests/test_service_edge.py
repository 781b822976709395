"""The HTTP edge of a real `python -m service` (one HTTP worker, so its connection bound is exact): a client
that aborts its upload is a quiet 499, an upload whose body stalls is cut with 408 after `body_timeout_s`, and
more slow connections than `max_connections` cannot starve normal clients: the surplus gets 503 at once, the
rest are cut at the body timeout, and the worker's file descriptors come back."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers.service import (
    OFFICE,
    SERVED_ENV,
    image_bytes,
    make_set,
    metric,
    publish,
    service_process,
    worker_pids,
)

from service.http.edge import LINGER_S

pytestmark = pytest.mark.slow  # one process start (imports torch)

BODY_TIMEOUT_S = 3.0
MAX_CONNECTIONS = 24
HEAD = (b"POST /classify?task=clipart HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Content-Length: 100000\r\n\r\n")


@pytest.fixture(scope="module")
def edge(tiny, tmp_path_factory) -> Iterator[tuple[str, Path]]:
    root: Path = tmp_path_factory.mktemp("edge")
    publish(make_set(tiny, "office", OFFICE, 1), root / "prompts")
    env = {**SERVED_ENV, "MMAP_PROMPTS": str(root / "prompts"), "MMAP_WORKERS": "1",
           "MMAP_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S), "MMAP_MAX_CONNECTIONS": str(MAX_CONNECTIONS)}
    with service_process(root / "service.log", [], env) as (base, _):
        yield base, root / "service.log"


def _connect(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def _read_all(conn: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    answer = b""
    while chunk := conn.recv(65536):
        answer += chunk
    return answer


def _metrics(base: str) -> str:
    return httpx.get(f"{base}/metrics").text


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_an_aborted_upload_is_a_quiet_499(edge):
    base, log = edge
    before = metric(_metrics(base), "mmap_requests_total", task="clipart", status="499")
    with _connect(base) as conn:
        conn.sendall(HEAD + image_bytes(1)[:10])
        time.sleep(0.3)  # the handler is reading the body
    deadline = time.monotonic() + 10
    while metric(_metrics(base), "mmap_requests_total", task="clipart", status="499") == before:
        assert time.monotonic() < deadline, "the aborted upload was not counted as 499"
        time.sleep(0.05)
    text = _metrics(base)
    assert metric(text, "mmap_requests_total", task="clipart", status="500") == 0
    assert "Traceback" not in log.read_text() and "ClientDisconnect" not in log.read_text()
    assert httpx.post(f"{base}/classify?task=clipart", content=image_bytes(2),
                      headers={"content-type": "image/png"}).status_code == 200


def test_a_stalled_body_is_cut_with_408(edge):
    base, _ = edge
    with _connect(base) as conn:
        conn.sendall(HEAD + image_bytes(1)[:10])
        started = time.monotonic()
        answer = _read_all(conn)  # returns once the server has closed the connection
        waited = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"error":"body_timeout"' in answer.replace(b" ", b""), answer
    assert BODY_TIMEOUT_S <= waited < BODY_TIMEOUT_S + 3, waited


def test_more_slow_connections_than_the_bound_cannot_starve_normal_clients(edge):
    base, _ = edge
    worker = worker_pids(base)[0]
    baseline = _fds(worker)
    slow = [_connect(base) for _ in range(2 * MAX_CONNECTIONS)]
    try:
        for conn in slow:
            conn.sendall(HEAD + b"\x89PNG")
        time.sleep(LINGER_S + 0.3)
        # The surplus was answered and closed although its clients keep it open: the worker holds the bound.
        assert _fds(worker) <= baseline + MAX_CONNECTIONS + 1
        # A normal client beyond the bound gets 503 at once, not a hang.
        started = time.monotonic()
        refused = httpx.get(f"{base}/healthz", timeout=5)
        assert refused.status_code == 503 and refused.json()["error"] == "too_many_connections", refused.text
        assert time.monotonic() - started < 1.0
        # The held ones are cut at the body timeout: each gets 408 or (the surplus) 503, and is closed.
        answers = [_read_all(conn)[:12] for conn in slow]
        assert {a for a in answers} <= {b"HTTP/1.1 408", b"HTTP/1.1 503"}, set(answers)
        assert answers.count(b"HTTP/1.1 503") >= MAX_CONNECTIONS - 2  # the surplus (a slot or two: /metrics etc.)
    finally:
        for conn in slow:
            conn.close()
    response = httpx.post(f"{base}/classify?task=clipart", content=image_bytes(3),
                          headers={"content-type": "image/png"})
    assert response.status_code == 200, response.text
    deadline = time.monotonic() + 5
    while _fds(worker) > baseline + 2:
        assert time.monotonic() < deadline, f"the worker still holds {_fds(worker) - baseline} more descriptors"
        time.sleep(0.05)
    assert metric(_metrics(base), "mmap_requests_total", task="clipart", status="408") >= MAX_CONNECTIONS - 2
