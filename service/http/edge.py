"""Connection-level protection of an HTTP worker, below the app: what uvicorn does not bound by itself.

- `bounded_protocol(limit)`: uvicorn's httptools protocol, holding at most `limit` open connections
  per worker. A connection beyond it is answered 503 `too_many_connections` at once and closed, so
  slow or idle clients cannot exhaust the worker's file descriptors. A new connection must also send
  its first bytes within uvicorn's keep-alive timeout (uvicorn arms that timer only after a
  response), so a connection that never speaks does not hold its slot.
- `RequestEdge`: every request carries an id: the client's `X-Request-ID` if it is 1-128 of
  `[A-Za-z0-9._:-]`, else a new one; it is echoed on the response and in every log line of the
  request (logs.REQUEST_ID). A request cut at the drain deadline (uvicorn cancels what is still
  running `drain_timeout_s` after SIGTERM) is answered 503 `shutting_down`, not 500 with a traceback.
The slow-body bound (408) is read_upload's, where the body is read.
"""

from __future__ import annotations

import asyncio
import os
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.logs import REQUEST_ID
from service.schema import ErrorBody, ErrorCode, encode

REQUEST_ID_HEADER = b"x-request-id"
VALID_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
LINGER_S = 1.0  # a refused connection is half-closed, then closed after this: its request is not answered with a reset


def _error_response(status: str, error: ErrorCode, detail: str) -> bytes:
    body = encode(ErrorBody(error, detail))
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
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                self.timeout_keep_alive_handler)

        def data_received(self, data: bytes) -> None:
            if not self.refused:
                super().data_received(data)

    return BoundedHttpToolsProtocol


class RequestEdge:
    """ASGI middleware around every HTTP request (one layer: each costs every request):

    - its id (`X-Request-ID`: the client's if valid, else a new one) in the log context and on the response;
    - a request cancelled before its response started gets 503 `shutting_down`. uvicorn cancels a request
      only when the drain deadline passes (a client that goes away is not cancelled; the app sees a
      disconnect), so a cancellation here means the service is stopping. It is answered, not propagated:
      uvicorn would log it as an application error."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((value for name, value in scope["headers"] if name == REQUEST_ID_HEADER), b"")
        request_id = given.decode("latin-1") if VALID_REQUEST_ID.fullmatch(given) else os.urandom(8).hex()
        header = (REQUEST_ID_HEADER, request_id.encode())
        started = False

        async def edge_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = message.get("headers")
                if isinstance(headers, list):  # Starlette's, made for this response: appended to in place
                    headers.append(header)
                else:
                    message = {**message, "headers": [*(headers or ()), header]}
            await send(message)

        token = REQUEST_ID.set(request_id)
        try:
            await self.app(scope, receive, edge_send)
        except asyncio.CancelledError:
            if started:
                raise
            await _send_error(edge_send, 503, ErrorBody("shutting_down", "the service stopped before this request "
                                                                         "finished; retry"))
        finally:
            REQUEST_ID.reset(token)


async def _send_error(send: Send, status: int, body: ErrorBody) -> None:
    data = encode(body)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"retry-after", b"1"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": data})
