"""Connection-level protection of an HTTP worker, below the app: what uvicorn does not bound by itself.

- `bounded_protocol(limit)`: uvicorn's httptools protocol, holding at most `limit` open connections
  per worker. A connection beyond it is answered 503 `too_many_connections` at once and closed, so
  slow or idle clients cannot exhaust the worker's file descriptors. A new connection must also send
  its first bytes within uvicorn's keep-alive timeout (uvicorn arms that timer only after a
  response), so a connection that never speaks does not hold its slot.
- `DrainDeadline`: a request cut at the drain deadline (uvicorn cancels what is still running
  `drain_timeout_s` after SIGTERM) is answered 503 `shutting_down`, not 500 with a traceback.
- `RequestId`: every request carries an id: the client's `X-Request-ID` if it is 1-128 of
  `[A-Za-z0-9._:-]`, else a new one. It is echoed on the response and in every log line of the
  request (logs.REQUEST_ID).
The slow-body bound (408) is read_upload's, where the body is read.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .logs import REQUEST_ID

REQUEST_ID_HEADER = b"x-request-id"
VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
LINGER_S = 1.0  # a refused connection is half-closed, then closed after this: its request is not answered with a reset


def _error_response(status: str, error: str, detail: str) -> bytes:
    body = json.dumps({"error": error, "detail": detail}).encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "retry-after: 1\r\nconnection: close\r\n\r\n").encode() + body


def bounded_protocol(limit: int) -> type[HttpToolsProtocol]:
    """The httptools protocol class of a worker that holds at most `limit` connections (uvicorn's `http=`)."""
    refusal = _error_response("503 Service Unavailable", "too_many_connections",
                              f"this worker holds its limit of {limit} open connections; retry")

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        refused = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > limit:
                self.refused = True
                transport.write(refusal)
                if transport.can_write_eof():
                    transport.write_eof()
                self.loop.call_later(LINGER_S, transport.close)
                return
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

        def data_received(self, data: bytes) -> None:
            if not self.refused:
                super().data_received(data)

    return BoundedHttpToolsProtocol


class _HttpMiddleware:
    """An ASGI middleware that acts on HTTP requests (`http`) and passes everything else through."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.http(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError


class RequestId(_HttpMiddleware):
    """ASGI middleware: the request's id in the log context and on the response (`X-Request-ID`)."""

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        given = next((value for name, value in scope["headers"] if name == REQUEST_ID_HEADER), b"").decode("latin-1")
        request_id = given if VALID_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        header = (REQUEST_ID_HEADER, request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        token = REQUEST_ID.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)


class DrainDeadline(_HttpMiddleware):
    """ASGI middleware: a request cancelled before its response started gets 503 `shutting_down`.

    uvicorn cancels a request only when the drain deadline passes (a client that goes away is not
    cancelled; the app sees a disconnect), so a cancellation here means the service is stopping.
    The cancellation is answered, not propagated: uvicorn would log it as an application error."""

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except asyncio.CancelledError:
            if started:
                raise
            await _send_json(send, 503, {"error": "shutting_down",
                                         "detail": "the service stopped before this request finished; retry"})


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"retry-after", b"1"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": data})
