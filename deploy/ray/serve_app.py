"""Ray Serve: mmap-serve's process split as two deployments, with the same HTTP API.

    serve run deploy/ray/serve.yaml                 # from the repository root (PYTHONPATH=deploy/ray)
    serve run serve_app:app                         # defaults + MMAP_* env, one replica of each

- `mmap-ingress` (CPU replicas): the service's own FastAPI app (`service.http.app.create_app`): reads,
  checks, decodes and preprocesses uploads to uint8 pixels, exactly as an HTTP worker does, and
  calls the engine through a DeploymentHandle instead of shared memory + ZeroMQ. Responses carry
  `x-mmap-replica: <replica id>`.
- `mmap-engine` (GPU replicas): the service's `InferenceCore` (the frozen CLIP, the prompt-set
  registry, batched scoring), with Serve's `@serve.batch` gathering images across ingress replicas
  and tasks into one forward (`max_batch_size`, `max_wait_ms` from the settings). A replica turns
  healthy once its prompt sets are loaded and warmed up; its watcher thread follows the prompt
  directory, and the ingress replicas refresh their catalog from it every `CATALOG_REFRESH_S`.

Settings: `Settings(**overrides)` over the replicas' `MMAP_*` environment (the Serve config's
`runtime_env.env_vars`; `args.settings` overrides per application). Prompt sets come from a
directory every engine replica can read. The admin API, if enabled, acts on the ONE engine replica
that answers: publish through the shared directory instead. /metrics on an ingress replica shows
that replica's request metrics; the engine's batch metrics are in the engine replicas' processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import numpy as np
from fastapi import FastAPI
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import (
    Settings,
    transport,  # its encoder and decoder by module: the deployments are pickled by value
)
from service.http.app import create_app
from service.http.engine_client import CatalogView, EngineUnavailable, InferenceTimeout, failure
from service.transport import Embedded, EngineInfo, Failed, Reply, Scored, TaskInfo

log = logging.getLogger(__name__)

REPLICA_HEADER = b"x-mmap-replica"
CATALOG_REFRESH_S = 0.5


class ReplicaHeader:
    """Pure ASGI middleware: every HTTP response says which ingress replica produced it."""

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


@serve.deployment(name="mmap-engine", max_ongoing_requests=256, health_check_period_s=10,
                  health_check_timeout_s=30, graceful_shutdown_timeout_s=30)
class MmapEngine:
    """One engine replica: an InferenceCore, ready (loaded and warmed up) when the constructor returns."""

    def __init__(self, settings: dict[str, Any] | None = None):
        import torch  # the engine side alone imports the model stack

        from service.engine.backbone import load_configured_backbone
        from service.engine.core import InferenceCore
        from service.engine.loop import engine_threads
        from service.metrics import Metrics

        self.settings = Settings(**(settings or {}))
        torch.set_num_threads(engine_threads(self.settings))
        self.core = InferenceCore(self.settings, load_configured_backbone(self.settings), Metrics())
        self.settings = self.core.settings  # with the device's defaults filled in
        self.core.registry.scan()
        self.core.warm_up()
        self.core.ready = True
        self.infer.set_max_batch_size(self.settings.max_batch_size)
        self.infer.set_batch_wait_timeout_s(self.settings.max_wait_ms / 1000)
        if self.settings.watch_interval_s > 0:
            threading.Thread(target=self._watch, name="watch-prompts", daemon=True).start()

    def _watch(self) -> None:
        while True:
            time.sleep(self.settings.watch_interval_s)
            try:
                self.core.registry.poll(time.monotonic())
            except Exception:  # a broken directory must not end the watch; the next poll retries
                log.exception("prompt-directory poll failed")

    async def engine_info(self) -> bytes:
        return msgspec.json.encode(self.core.info("ray"))

    async def catalog(self, source: str, generation: int) -> bytes:
        """What changed since `generation` of this replica's catalog `source` (else the whole catalog)."""
        self.core.feed.advance()
        return transport.encode(self.core.feed.since(source, generation))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def infer(self, requests: list[tuple[np.ndarray, str, int, list[str] | None, bool]]) -> list[bytes]:
        """One batch across ingress replicas and tasks: (pixels [H, W, 3] uint8, task, top_k, labels, embed) each."""
        answers: list[Scored | Embedded | Failed | None] = [None] * len(requests)
        admitted = []
        for i, (pixels, task, top_k, labels, embed) in enumerate(requests):
            # Serve bounds the queue (max_ongoing_requests)
            item = self.core.admit(i, task, pixels, top_k, 0, labels, embed)
            if isinstance(item, Failed):
                answers[i] = item
            else:
                admitted.append(item)
        for item, answer in zip(admitted, self.core.score(admitted), strict=True):
            answers[item.request] = answer
        self.core.reclaim([])  # one batch at a time: nothing admitted earlier is still in use
        return [transport.encode(a) for a in answers]

    async def call(self, op: bytes) -> bytes:
        from service.engine.operations import CallRefused

        try:
            operation = transport.decode_operation(op)
            return transport.encode(await asyncio.to_thread(self.core.operations.run, 0, operation))
        except CallRefused as e:
            return transport.encode(e.reply(0))

    def check_health(self) -> None:
        if self.core.failure:
            raise RuntimeError(self.core.failure)


class RayEngineClient:
    """An ingress replica's engine: the same interface as service.http.engine_client.EngineClient."""

    def __init__(self, engine: DeploymentHandle, replica: str):
        self.engine = engine
        self.worker = replica
        self.info: EngineInfo | None = None
        self.catalog = CatalogView("connecting to the engine")
        self.down = True
        self._refresh: asyncio.Task | None = None

    async def start(self) -> RayEngineClient:
        self.info = msgspec.json.decode(await self.engine.engine_info.remote(), type=EngineInfo)
        await self._fetch_catalog()
        self._refresh = asyncio.create_task(self._follow(), name="catalog")
        return self

    @property
    def tasks(self) -> dict[str, TaskInfo]:
        return self.catalog.tasks

    async def _fetch_catalog(self) -> None:
        """What changed since this copy; the whole catalog when that replica cannot say (another replica's)."""
        update = transport.decode_to_worker(await self.engine.catalog.remote(self.catalog.source,
                                                                           self.catalog.generation))
        if not self.catalog.apply(update):
            self.catalog.apply(transport.decode_to_worker(await self.engine.catalog.remote("", -1)))
        self.down = False

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(CATALOG_REFRESH_S)
            try:
                await self._fetch_catalog()
            except Exception as e:  # the engine is being replaced: refuse requests until it is back
                log.warning("engine unreachable: %s", e)
                self.down = True

    @contextlib.contextmanager
    def incoming(self) -> Iterator[None]:
        yield  # Serve's batching waits `max_wait_ms` by itself

    async def infer(self, pixels: np.ndarray, task: str, top_k: int, timeout_s: float, labels: list[str] | None = None,
                    embed: bool = False) -> Scored | Embedded:
        if self.down:
            raise EngineUnavailable()
        try:
            request = (pixels, task, top_k, labels, embed)
            answer = transport.decode_to_worker(await asyncio.wait_for(self.engine.infer.remote(request), timeout_s))
        except TimeoutError:
            raise InferenceTimeout(timeout_s) from None
        if isinstance(answer, Failed):
            raise failure(answer)
        return answer

    async def call(self, op: transport.Operation, timeout_s: float = 120.0) -> Reply:
        reply = transport.decode_to_worker(await asyncio.wait_for(self.engine.call.remote(transport.encode(op)),
                                                                  timeout_s))
        if reply.status >= 400:
            raise failure(reply)
        return reply

    async def close(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresh


@serve.deployment(name="mmap-ingress", max_ongoing_requests=256, graceful_shutdown_timeout_s=30)
@serve.ingress()
class MmapIngress:
    """One ingress replica: the service's HTTP app, its engine behind a DeploymentHandle."""

    def __init__(self, engine: DeploymentHandle, settings: dict[str, Any] | None = None):
        self.engine = engine
        self.settings = Settings(**(settings or {}))
        self.replica = serve.get_replica_context().replica_id.unique_id

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Called by Serve once per replica, after __init__; Serve then runs the app's lifespan."""
        app = create_app(self.settings, RayEngineClient(self.engine, self.replica).start)
        app.add_middleware(ReplicaHeader, replica=self.replica)
        return app


def build(args: dict[str, Any]) -> Application:
    """Application builder for a Serve config: `args: {settings: {...}}`."""
    settings = args.get("settings")
    return MmapIngress.bind(MmapEngine.bind(settings=settings), settings=settings)


app = build({})
