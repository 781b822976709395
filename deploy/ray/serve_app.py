"""Ray Serve: mmap-serve's process split as two deployments, with the same HTTP API.

    serve run deploy/ray/serve.yaml                 # from the repository root (PYTHONPATH=deploy/ray)
    serve run serve_app:app                         # defaults + MMAP_* env, one replica of each

- `mmap-ingress` (CPU replicas): the service's own FastAPI app (`service.http.app.create_app`): reads,
  checks, decodes and preprocesses uploads to uint8 pixels, exactly as an HTTP worker does, and
  reaches the engine through `RayEngineClient`, the same interface (`service.http.contract`) as a
  worker's shared memory + ZeroMQ client. It gathers the images of concurrent requests into one
  handle call (`InferBatch`: the pixels as one array), as a worker's ring gathers them for the engine
  process: a call leaves when `max_batch_size` images wait, when no upload is on its way, or after
  `max_wait_ms`. Responses carry `x-mmap-replica: <replica id>`.
- `mmap-engine` (GPU replicas): the service's `InferenceCore` (the frozen CLIP, the prompt-set
  registry, batched scoring). Each batch runs on the replica's forward thread, so the catalog and
  admin calls are answered while a forward runs; images from several ingress calls waiting together
  share one forward; beyond `queue_size` waiting images a request gets 503 `overloaded`, as from the
  engine process. A replica turns healthy once its prompt sets are loaded and warmed up (the core's
  own start-up); its watcher thread follows the prompt directory, and the ingress replicas refresh
  their catalog from it every `CATALOG_REFRESH_S`.

Settings: `Settings(**overrides)` over the replicas' `MMAP_*` environment (the Serve config's
`runtime_env.env_vars`; `args.settings` overrides per application). Prompt sets come from a
directory every engine replica can read. The admin API, if enabled, acts on the ONE engine replica
that answers: publish through the shared directory instead. /metrics on an ingress replica shows
that replica's request metrics; the engine's batch metrics are in the engine replicas' processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
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
from service.http.edge import RequestEdge, bounded_protocol
from service.http.engine_client import MAX_TOP_K, CatalogView, EngineUnavailable, InferenceTimeout, failure
from service.transport import Embedded, EngineInfo, Failed, Reply, Scored, TaskInfo

log = logging.getLogger(__name__)

REPLICA_HEADER = b"x-mmap-replica"
CATALOG_REFRESH_S = 0.5
# An engine replica that does not answer a catalog call within this is taken for dead: Serve would hold the
# requests sent to it until a new replica is up (seconds to minutes), so they get 503 at once instead.
ENGINE_SILENT_S = 2.0
# Handle calls an ingress replica has on their way to the engine at once; while they are, the next images
# gather into one call (as the engine process launches a batch while the last one computes).
CALLS_IN_FLIGHT = 2


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

        settings_ = Settings(**(settings or {}))
        torch.set_num_threads(engine_threads(settings_))
        self.core = InferenceCore(settings_, load_configured_backbone(settings_), Metrics())
        self.settings = self.core.settings  # with the device's defaults filled in
        self.core.registry.scan()
        if not self.core.finish_start_up():
            raise RuntimeError(f"start-up failed: {self.core.failure}")
        self._forward = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self._waiting: list[tuple[np.ndarray | bytes, transport.Infer, asyncio.Future]] = []
        self._queued = 0  # images waiting for the forward thread or in its forward
        self._draining = False
        if self.settings.watch_interval_s > 0:
            threading.Thread(target=self._watch, name="watch-prompts", daemon=True).start()

    def _watch(self) -> None:
        due = time.monotonic() + self.settings.watch_interval_s
        while True:
            time.sleep(max(0.0, due - time.monotonic()))
            try:
                due = self.core.poll_prompts()
            except Exception:  # a broken directory must not end the watch; the next poll retries
                log.exception("prompt-directory poll failed")
                due = time.monotonic() + self.settings.watch_interval_s

    async def engine_info(self) -> bytes:
        return msgspec.json.encode(self.core.info("ray"))

    async def catalog(self, source: str, generation: int) -> bytes:
        """What changed since `generation` of this replica's catalog `source` (else the whole catalog)."""
        return transport.encode(self.core.feed.catch_up(source, generation))

    async def infer(self, payload: bytes) -> bytes:
        """An ingress replica's `InferBatch`, answered as `Results`. The queue bound is checked here, on the
        replica's event loop; the forwards run on the forward thread, each taking whatever waits by then."""
        batch = transport.decode_batch(payload)
        height, width = self.core.backbone.preprocess_cfg["size"]
        pixels = np.frombuffer(batch.pixels, np.uint8).reshape(-1, height, width, 3)
        loop = asyncio.get_running_loop()
        futures = []
        for request in batch.requests:
            future = loop.create_future()
            futures.append(future)
            image = request.jpeg if request.jpeg is not None else pixels[request.slot]
            if self._queued >= self.settings.queue_size:  # the engine process's bound and answer (core.admit)
                future.set_result(self.core.admit(request.id, request.task, image, 0, self._queued))
                continue
            self._waiting.append((image, request, future))
            self._queued += 1
        if self._waiting and not self._draining:
            self._draining = True
            loop.create_task(self._drain())
        return transport.encode(transport.Results(list(await asyncio.gather(*futures))))

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._waiting:
                items = self._waiting[:self.settings.max_batch_size]
                del self._waiting[:len(items)]
                answers = await loop.run_in_executor(self._forward, self._score, items)
                for (_, request, future), answer in zip(items, answers, strict=True):
                    answer.id = request.id
                    if not future.done():
                        future.set_result(answer)
                self._queued -= len(items)
                wait = self.core.shadow_wait_s()  # a rollout's shadow rows, after the answers: when due, or when
                if wait == 0 or (not self._waiting and wait < float("inf")):  # the queue is empty
                    await loop.run_in_executor(self._forward, self._shadows)
        finally:
            self._draining = False

    def _shadows(self) -> None:
        try:
            self.core.finish(self.core.launch_shadows())
        except Exception:  # evidence lost, nothing else
            log.exception("a rollout's shadow forward failed")

    def _score(self, items: list[tuple[np.ndarray | bytes, transport.Infer, asyncio.Future]]) -> list[Any]:
        """On the forward thread: one batch admitted (task, readiness, labels) and scored."""
        answers: list[Scored | Embedded | Failed | None] = [None] * len(items)
        admitted = []
        for i, (image, request, _) in enumerate(items):
            item = self.core.admit(i, request.task, image, request.top_k, 0, request.labels, request.embed,
                                   version=request.version, key=request.key)
            if isinstance(item, Failed):
                answers[i] = item
            else:
                admitted.append(item)
        try:
            for item, answer in zip(admitted, self.core.score(admitted), strict=True):
                answers[item.request] = answer
            self.core.reclaim([])  # one batch at a time: nothing admitted earlier is still in use
        except Exception as e:  # its requests fail, the replica goes on
            log.exception("a batch of %d images failed", len(items))
            answers = [a or Failed(0, 500, "inference_failed", f"{type(e).__name__}: {e}") for a in answers]
        return answers

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
    """An ingress replica's engine (`service.http.contract.EngineConnection`): requests gathered into one
    `InferBatch` handle call, and the engine's catalog followed by polling."""

    def __init__(self, engine: DeploymentHandle, replica: str, settings: Settings):
        self.engine = engine
        self.worker = replica
        self.settings = settings
        self.info: EngineInfo | None = None
        self.catalog = CatalogView("connecting to the engine")
        self.down = True
        self._refresh: asyncio.Task | None = None
        self._ids = itertools.count()
        self._batch: list[tuple[transport.Infer, np.ndarray | bytes, asyncio.Future]] = []
        self._flush: asyncio.TimerHandle | asyncio.Handle | None = None
        self._incoming = 0  # uploads being read or decoded here: worth waiting for, up to max_wait_ms
        self._sending: set[asyncio.Task] = set()
        self._in_flight: list[list[asyncio.Future]] = []  # the answers each handle call on its way waits for

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
                await asyncio.wait_for(self._fetch_catalog(), ENGINE_SILENT_S)
            except Exception as e:  # the engine is being replaced: refuse requests until it is back
                if not self.down:
                    log.warning("engine unreachable (%s): refusing requests until it is back", type(e).__name__)
                self._engine_lost()

    def _engine_lost(self) -> None:
        """Every request waiting for the engine fails with 503 now, and new ones until the catalog is back."""
        self.down = True
        for future in [f for _, _, f in self._batch] + [f for batch in self._in_flight for f in batch]:
            if not future.done():
                future.set_exception(EngineUnavailable())

    @contextlib.contextmanager
    def incoming(self) -> Iterator[None]:
        self._incoming += 1
        try:
            yield
        finally:
            self._incoming -= 1
            if self._batch and not self._incoming:
                self._schedule(0)

    async def infer(self, pixels: np.ndarray | bytes, task: str, top_k: int, timeout_s: float,
                    labels: list[str] | None = None, embed: bool = False, version: str | None = None,
                    key: str | None = None) -> Scored | Embedded:
        if self.down:
            raise EngineUnavailable()
        loop = asyncio.get_running_loop()
        request = transport.Infer(id=next(self._ids), slot=0, task=task, top_k=min(top_k, MAX_TOP_K), labels=labels,
                                  embed=embed, jpeg=pixels if isinstance(pixels, bytes) else None, version=version,
                                  key=key)
        answer: asyncio.Future = loop.create_future()
        self._batch.append((request, pixels, answer))
        if len(self._batch) >= self.info.max_batch_size:
            self._schedule(0)
        elif self._flush is None:  # the batch's first image: wait for more only while uploads are on their way
            self._schedule(self.settings.max_wait_ms / 1000 if self._incoming else 0)
        try:
            result = await asyncio.wait_for(asyncio.shield(answer), timeout_s)
        except TimeoutError:
            raise InferenceTimeout(timeout_s) from None
        if isinstance(result, Failed):
            raise failure(result)
        return result

    def _schedule(self, delay_s: float) -> None:
        if self._flush is not None:
            self._flush.cancel()
        loop = asyncio.get_running_loop()
        self._flush = loop.call_later(delay_s, self._send_batch) if delay_s else loop.call_soon(self._send_batch)

    def _send_batch(self) -> None:
        self._flush = None
        if len(self._in_flight) >= CALLS_IN_FLIGHT:
            return  # sent when a call on its way comes back
        batch, self._batch = self._batch, []
        if batch:
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[tuple[transport.Infer, np.ndarray | bytes, asyncio.Future]]) -> None:
        images = [pixels for _, pixels, _ in batch if not isinstance(pixels, bytes)]
        for slot, (request, _, _) in enumerate(r for r in batch if not isinstance(r[1], bytes)):
            request.slot = slot
        message = transport.InferBatch(np.stack(images).tobytes() if images else b"", [r for r, _, _ in batch])
        futures = [future for _, _, future in batch]
        self._in_flight.append(futures)
        try:
            reply = await self.engine.infer.remote(transport.encode(message))
            answers = {a.id: a for a in transport.decode_to_worker(reply).items}
        except Exception as e:  # the engine replica died or cannot be reached: 503 now, not at the timeout
            log.warning("engine call failed: %s: %s", type(e).__name__, e)
            self._engine_lost()
            return
        finally:
            self._in_flight.remove(futures)
            if self._batch and self._flush is None:
                self._schedule(0)
        for request, _, future in batch:
            if not future.done():
                future.set_result(answers[request.id])

    async def call(self, op: transport.Operation, timeout_s: float = 120.0) -> Reply:
        if self.down:
            raise EngineUnavailable()
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
    """One ingress replica: the service's HTTP app, its engine behind a DeploymentHandle. With `http_port` it
    also serves that app on its own port (SO_REUSEPORT: every replica of a node shares it), past Serve's
    proxy, whose hop costs more than the app itself on a small node (docs/benchmarks.md, "Ray Serve")."""

    def __init__(self, engine: DeploymentHandle, settings: dict[str, Any] | None = None,
                 http_port: int | None = None):
        self.engine = engine
        self.settings = Settings(**(settings or {}))
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.http_port = http_port
        self._direct: asyncio.Task | None = None

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Called by Serve once per replica, after __init__; Serve then runs the app's lifespan."""
        app = create_app(self.settings, RayEngineClient(self.engine, self.replica, self.settings).start)
        app.add_middleware(ReplicaHeader, replica=self.replica)
        if self.http_port:
            self._direct = asyncio.get_running_loop().create_task(self._serve_directly(app), name="direct-http")
        return app

    async def _serve_directly(self, app: FastAPI) -> None:
        """uvicorn on `http_port`, on this replica's loop; the app's lifespan is Serve's (already run for it)."""
        import socket

        import uvicorn

        sock = socket.socket(socket.AF_INET6 if ":" in self.settings.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((self.settings.host, self.http_port))
        config = uvicorn.Config(RequestEdge(app), http=bounded_protocol(self.settings.max_connections),
                                log_config=None, log_level=self.settings.log_level, access_log=self.settings.access_log,
                                lifespan="off")
        await uvicorn.Server(config).serve(sockets=[sock])


def build(args: dict[str, Any]) -> Application:
    """Application builder for a Serve config: `args: {settings: {...}, http_port: <port>}` (http_port: the
    ingress replicas also serve HTTP themselves, past Serve's proxy)."""
    settings = args.get("settings")
    return MmapIngress.bind(MmapEngine.bind(settings=settings), settings=settings, http_port=args.get("http_port"))


app = build({})
