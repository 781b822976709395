"""An HTTP server on 127.0.0.1 for the image-URL tests (this module holds no tests): the only server a URL of those
tests may name. It runs on a thread of the test process and counts the connections it accepts, so a test can show
that a refused URL was refused before any connection."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

ENDLESS_CAP = 256 << 20  # an "endless" body stops here, whatever the client does


class Origin(ThreadingHTTPServer):
    """Routes: /image (the image, with its length), /chunked (the image, chunked), /slow (waits `slow_s` before it
    answers), /endless (a chunked body that does not end), /missing (404), /gzip (a content-encoded answer),
    /redirect?to=URL (302 to URL), /hops/N (N redirects, then /image)."""

    daemon_threads = True

    def __init__(self, image: bytes, slow_s: float = 5.0):
        super().__init__(("127.0.0.1", 0), Handler)
        self.image = image
        self.slow_s = slow_s
        self.connections = 0
        self.requests: list[tuple[str, str]] = []  # (path, Host header)
        self._lock = threading.Lock()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    @property
    def port(self) -> int:
        return self.server_address[1]

    def process_request(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        with self._lock:
            self.connections += 1
        super().process_request(request, client_address)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Origin

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.server.requests.append((self.path, self.headers.get("host", "")))
        url = urlsplit(self.path)
        try:
            if url.path == "/image":
                self.answer(200, self.server.image, {"content-type": "image/png"})
            elif url.path == "/chunked":
                self.chunked([self.server.image[:100], self.server.image[100:]])
            elif url.path == "/slow":
                time.sleep(self.server.slow_s)
                self.answer(200, self.server.image)
            elif url.path == "/endless":
                self.chunked(self.endless())
            elif url.path == "/gzip":
                self.answer(200, self.server.image, {"content-encoding": "gzip"})
            elif url.path == "/redirect":
                self.answer(302, b"", {"location": parse_qs(url.query)["to"][0]})
            elif url.path.startswith("/hops/"):
                left = int(url.path.rsplit("/", 1)[1])
                self.answer(302, b"", {"location": f"/hops/{left - 1}" if left > 1 else "/image"})
            else:
                self.answer(404, b"not here")
        except (BrokenPipeError, ConnectionResetError):  # the client gave up, as the fetcher is meant to
            pass

    def answer(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def chunked(self, parts: Iterator[bytes] | list[bytes]) -> None:
        self.send_response(200)
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for part in parts:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
        self.wfile.write(b"0\r\n\r\n")

    @staticmethod
    def endless() -> Iterator[bytes]:
        chunk = b"\x89PNG" + bytes(64 << 10)
        for _ in range(ENDLESS_CAP // len(chunk)):
            yield chunk


@contextmanager
def origin(image: bytes, slow_s: float = 5.0) -> Iterator[Origin]:
    """An `Origin` serving `image`, running for the block."""
    server = Origin(image, slow_s)
    thread = threading.Thread(target=server.serve_forever, name="origin", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
