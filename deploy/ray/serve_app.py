"""Ray Serve: mmap-serve's engine in N replicas behind Ray's HTTP proxy, with the same HTTP API.

    serve run deploy/ray/serve.yaml                 # from the repository root (PYTHONPATH=deploy/ray)
    serve run serve_app:app                         # defaults + MMAP_* env, one replica

Each replica runs the service's own FastAPI app (`service.create_app`) as its ingress: its own
prompt-set registry, cross-task batcher and backend (torch or onnx), nothing re-implemented.
Ray's proxy spreads requests over the replicas; each replica batches what it receives. Per replica:

- settings: `Settings(**overrides)` over the replica's `MMAP_*` environment (set them in the Serve
  config's `runtime_env.env_vars`; `args.settings` of the config overrides per application);
- a replica starts serving only once its prompt sets are loaded and the warm-up forward ran (the
  app's lifespan waits for it), and a start-up failure fails the replica, which Serve restarts;
  `check_health` reports a replica whose start-up failed;
- responses carry `x-mmap-replica: <replica id>`, so a client (and the test) sees who served it;
- `max_ongoing_requests` must be at least `max_batch_size`: Serve caps the requests a replica
  holds at once, so a lower cap would cap the batch.

Prompt sets come from a directory every replica can read (a shared volume); each replica's
watcher picks up what is published there. The admin API, if enabled, acts on the ONE replica that
answers: publish through the shared directory instead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve import Application
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import Settings, create_app

REPLICA_HEADER = b"x-mmap-replica"
DEFAULT_READY_TIMEOUT_S = 900.0  # weights may download, and onnx graphs export, before a replica is ready


class ReplicaHeader:
    """Pure ASGI middleware: every HTTP response says which replica produced it."""

    def __init__(self, app: ASGIApp, replica: str):
        self.app = app
        self.replica = replica.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (REPLICA_HEADER, self.replica)]
            await send(message)

        await self.app(scope, receive, tagged)


async def wait_until_warm(app: FastAPI, timeout_s: float) -> None:
    """Return once the service has loaded its prompt sets and warmed up; raise if start-up failed."""
    deadline = time.monotonic() + timeout_s
    while True:
        service = app.state.service
        if service is not None and service.failure:
            raise RuntimeError(f"mmap-serve replica failed to start: {service.failure}")
        if service is not None and service.warmed_up:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"mmap-serve replica not warm after {timeout_s:g} s")
        await asyncio.sleep(0.05)


@serve.deployment(
    name="mmap-serve",
    max_ongoing_requests=128,  # >= max_batch_size, or Serve caps the batch
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=30,
)
@serve.ingress()
class MmapServe:
    """One replica: the service's FastAPI app with its own registry, batcher and backend."""

    def __init__(self, settings: dict[str, Any] | None = None, ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S):
        self.settings = Settings(**(settings or {}))
        self.ready_timeout_s = ready_timeout_s
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.service_app: FastAPI | None = None  # not `app`: the ingress wrapper owns that name

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Called by Serve once per replica, after __init__; Serve then runs the app's lifespan."""
        app = create_app(self.settings)
        service_lifespan = app.router.lifespan_context
        timeout_s = self.ready_timeout_s

        @asynccontextmanager
        async def lifespan(app_: FastAPI) -> AsyncIterator[None]:
            async with service_lifespan(app_):
                await wait_until_warm(app_, timeout_s)  # Serve routes to a replica once its start-up returns
                yield

        app.router.lifespan_context = lifespan
        app.add_middleware(ReplicaHeader, replica=self.replica)
        self.service_app = app
        return app

    async def check_health(self) -> None:
        """Serve's health check: a replica whose start-up failed is unhealthy (and replaced)."""
        service = None if self.service_app is None else self.service_app.state.service
        if service is not None and service.failure:
            raise RuntimeError(service.failure)


def build(args: dict[str, Any]) -> Application:
    """Application builder for a Serve config: `args: {settings: {...}, ready_timeout_s: ...}`."""
    return MmapServe.bind(settings=args.get("settings"),
                          ready_timeout_s=float(args.get("ready_timeout_s", DEFAULT_READY_TIMEOUT_S)))


app = MmapServe.bind()
