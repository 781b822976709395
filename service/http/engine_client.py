"""An HTTP worker's side of the transport: its pixel ring and its ZeroMQ socket to the engine.

Runs on the worker's event loop. `infer` puts one preprocessed image in a free slot, sends an
`Infer` and awaits the answer; a reader task resolves answers by id and keeps the catalog current.
When every slot is taken, requests wait for one in arrival order, within their request timeout: the
listening socket is shared, so one worker can hold more connections than its slots while others
sit idle (wrk's 256 connections over 12 workers did), and its excess must not be refused for that.
As many may wait as there are slots; beyond that the worker answers 503 `overloaded` at once.
A monitor on the socket sees the engine's connection drop (the engine died): every waiting
request fails at once with 503 and new ones are refused, instead of hanging until their timeout.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Iterator

import numpy as np
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from service.errors import LISTED_TASKS, ServiceError, unknown_task_detail
from service.transport import (
    SHM_DIR,
    Call,
    Catalog,
    CatalogDelta,
    Embedded,
    EngineInfo,
    Failed,
    Hello,
    Infer,
    Operation,
    PixelRing,
    Reply,
    Results,
    Scored,
    Sync,
    TaskInfo,
    Welcome,
    decode_to_worker,
    encode,
    ring_prefix,
)

from .images import ImageRejected

log = logging.getLogger(__name__)

MAX_TOP_K = 1 << 30  # "all classes" for any task; keeps the field within the message's integer range


class EngineUnavailable(ServiceError):
    def __init__(self) -> None:
        super().__init__(503, "engine_unavailable", "the inference engine is not running; retry shortly",
                         {"Retry-After": "1"})


class InferenceTimeout(ServiceError):
    def __init__(self, timeout_s: float):
        super().__init__(504, "timeout", f"no result within the request timeout of {timeout_s:g} s")


def failure(message: Failed | Reply) -> ServiceError:
    retry = getattr(message, "retry_after_s", None)
    if message.error == "corrupt":  # an upload the engine could not decode (decode=engine): counted as rejected
        return ImageRejected(message.status, message.error, message.detail or "")
    return ServiceError(message.status, message.error or "error", message.detail or "",
                        {"Retry-After": str(retry)} if retry else None)


class CatalogView:
    """A worker's copy of the engine's catalog: whole copies and deltas applied (catalog.py on the engine)."""

    def __init__(self, reason: str):
        self.source = ""
        self.generation = -1
        self.ready = False
        self.reason: str | None = reason
        self.tasks: dict[str, TaskInfo] = {}
        self.names: list[str] = []  # the tasks' names, sorted (paging, the unknown-task answer)

    def apply(self, message: Catalog | CatalogDelta) -> bool:
        """Take in a whole catalog or a delta; False when a delta does not follow this copy (a `Sync` is due)."""
        if isinstance(message, Catalog):
            if message.source == self.source and message.generation < self.generation:
                return True  # older than what is here already
            self.tasks = {t.task: t for t in message.tasks}
            self.names = sorted(self.tasks)
        elif message.source != self.source or message.base != self.generation:
            return message.source == self.source and message.generation <= self.generation  # stale: nothing to do
        else:
            for name in message.removed:
                if self.tasks.pop(name, None) is not None:
                    del self.names[bisect.bisect_left(self.names, name)]
            for info in message.tasks:
                if info.task not in self.tasks:
                    bisect.insort(self.names, info.task)
                self.tasks[info.task] = info
        self.source, self.generation, self.ready, self.reason = (message.source, message.generation, message.ready,
                                                                  message.reason)
        return True

    def page(self, limit: int, after: str = "", prefix: str = "") -> tuple[list[TaskInfo], str | None]:
        """Up to `limit` tasks in name order, after `after`, whose names start with `prefix`; and the name to
        continue after (None: no more)."""
        start = max(bisect.bisect_right(self.names, after) if after else 0, bisect.bisect_left(self.names, prefix))
        names = []
        for name in itertools.islice(self.names, start, None):
            if not name.startswith(prefix) or len(names) == limit:
                break
            names.append(name)
        more = start + len(names) < len(self.names) and self.names[start + len(names)].startswith(prefix)
        return [self.tasks[n] for n in names], names[-1] if more and names else None

    def unknown(self, task: str) -> ServiceError:
        return ServiceError(404, "unknown_task", unknown_task_detail(task, self.names[:LISTED_TASKS], len(self.names)))


class EngineClient:
    """One worker's connection to the engine; `start` before use, `close` at the end."""

    def __init__(self, info: EngineInfo, worker: int, slots: int, launcher_pid: int):
        self.info = info
        self.worker = worker
        self.slots = slots
        height, width = info.image_size
        path = SHM_DIR / f"{ring_prefix(launcher_pid)}w{worker}.{os.getpid()}"
        self.ring = PixelRing(path, slots, height, width, create=True)
        self.catalog = CatalogView("connecting to the engine")
        self._sync_sent: tuple[str, int] | None = None
        self.down = True  # until the engine has welcomed this worker; again once its connection drops
        self._free = list(range(slots - 1, -1, -1))
        self._slot_waiters: deque[asyncio.Future] = deque()  # requests waiting for a free slot, oldest first
        self._ids = itertools.count()
        self._pending: dict[int, tuple[asyncio.Future | None, int | None]] = {}  # id -> (answer, slot or None)
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._monitor = self._socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._tasks: list[asyncio.Task] = []

    async def start(self, timeout_s: float) -> None:
        """Connect, hand the engine the ring and wait for its Welcome (raises TimeoutError)."""
        self._socket.connect(self.info.address)
        welcome: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending[-1] = (welcome, None)
        await self._socket.send(encode(Hello(worker=self.worker, pid=os.getpid(), ring=str(self.ring.path),
                                             slots=self.slots)))
        self._tasks = [asyncio.create_task(self._read(), name="engine-reader"),
                       asyncio.create_task(self._watch(), name="engine-monitor")]
        try:
            await asyncio.wait_for(welcome, timeout_s)
        finally:
            self.ring.unlink()  # the engine has mapped it (or is gone): nothing may be left in /dev/shm

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._fail_all(EngineUnavailable())
        self._monitor.close(linger=0)
        self._socket.close(linger=0)
        self._context.term()
        self.ring.unlink()

    @contextlib.contextmanager
    def incoming(self) -> Iterator[None]:
        """Mark an upload being read or decoded: the engine may wait for it to fill a batch."""
        self.ring.add_incoming(1)
        try:
            yield
        finally:
            self.ring.add_incoming(-1)

    async def infer(self, pixels: np.ndarray | bytes, task: str, top_k: int, timeout_s: float,
                    labels: list[str] | None = None, embed: bool = False, version: str | None = None,
                    key: str | None = None) -> Scored | Embedded:
        """Scores of one image [H, W, 3] uint8 (or a JPEG file the engine decodes) for one task (over `labels`
        if given), or with `embed` its embedding; ServiceError with the engine's refusal."""
        if self.down:
            raise EngineUnavailable()
        deadline = time.monotonic() + timeout_s
        slot = await self._take_slot(timeout_s)
        request = next(self._ids)
        jpeg = pixels if isinstance(pixels, bytes) else None
        try:
            if self.down:  # the engine went away while this request waited for its slot
                raise EngineUnavailable()
            message = encode(Infer(id=request, slot=slot, task=task, top_k=min(top_k, MAX_TOP_K), labels=labels,
                                   embed=embed, jpeg=jpeg, expires=deadline, version=version, key=key))
        except BaseException:
            self._release(slot)
            raise
        if jpeg is None:
            self.ring.pixels[slot] = pixels
        answer: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending[request] = (answer, slot)  # the slot is released when the engine answers, even late
        await self._send(message)
        try:
            return await asyncio.wait_for(asyncio.shield(answer), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            if request in self._pending:
                self._pending[request] = (None, slot)  # a late answer only frees the slot
            raise InferenceTimeout(timeout_s) from None

    async def _take_slot(self, timeout_s: float) -> int:
        """A free slot of the ring; when none is, wait in line for one (InferenceTimeout past `timeout_s`,
        EngineUnavailable when the engine goes away meanwhile). As many requests as there are slots may wait;
        beyond them the worker is overloaded: 503, at once."""
        if self._free and not self._slot_waiters:
            return self._free.pop()
        if len(self._slot_waiters) >= self.slots:
            raise ServiceError(503, "overloaded", "too many requests in flight on this worker; retry in 1 s",
                               {"Retry-After": "1"})
        waiter: asyncio.Future = asyncio.get_running_loop().create_future()
        self._slot_waiters.append(waiter)
        try:
            return await asyncio.wait_for(waiter, timeout_s)
        except BaseException as error:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release(waiter.result())  # handed a slot just as the wait was given up: pass it on
            with contextlib.suppress(ValueError):
                self._slot_waiters.remove(waiter)  # (a line of given-up waits must not grow while the engine stalls)
            if isinstance(error, TimeoutError):
                raise InferenceTimeout(timeout_s) from None
            raise

    def _release(self, slot: int) -> None:
        """A slot is free again: to the longest-waiting request, else back to the free list."""
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(slot)
                return
        self._free.append(slot)

    async def call(self, op: Operation, timeout_s: float = 120.0) -> Reply:
        """An operation off the hot path (admin, samples); the engine's refusals come back as ServiceError."""
        if self.down:
            raise EngineUnavailable()
        request = next(self._ids)
        answer: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending[request] = (answer, None)
        await self._send(encode(Call(id=request, op=op)))
        try:
            reply: Reply = await asyncio.wait_for(asyncio.shield(answer), timeout_s)
        except TimeoutError:
            self._pending.pop(request, None)
            raise InferenceTimeout(timeout_s) from None
        if reply.status >= 400:
            raise failure(reply)
        return reply

    async def _send(self, payload: bytes) -> None:
        await self._socket.send(payload)

    async def _read(self) -> None:
        while True:
            self._dispatch(decode_to_worker(await self._socket.recv()))
            with contextlib.suppress(zmq.Again):
                while True:
                    self._dispatch(decode_to_worker(await self._socket.recv(zmq.NOBLOCK)))

    def _dispatch(self, message: object) -> None:
        if isinstance(message, Results):
            for item in message.items:
                self._dispatch(item)
            return
        if isinstance(message, Catalog | CatalogDelta):
            if not self.catalog.apply(message):  # a delta was missed: ask (once) for what changed since this copy
                wanted = (self.catalog.source, self.catalog.generation)
                if self._sync_sent != wanted:
                    self._sync_sent = wanted
                    asyncio.get_running_loop().create_task(self._send(encode(Sync(*wanted))))
            return
        if isinstance(message, Welcome):
            self.catalog.apply(message.catalog)
            self.down = False
            key = -1
        else:
            key = message.id  # type: ignore[attr-defined]
        answer, slot = self._pending.pop(key, (None, None))
        if slot is not None:
            self._release(slot)
        if answer is None or answer.done():
            return
        if isinstance(message, Failed):
            answer.set_exception(failure(message))
        else:
            answer.set_result(message)

    @property
    def tasks(self) -> dict[str, TaskInfo]:
        return self.catalog.tasks

    async def _watch(self) -> None:
        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())
            if event["event"] == zmq.EVENT_DISCONNECTED and not self.down:
                log.error("lost the connection to the engine: failing %d waiting requests", len(self._pending))
                self.down = True
                self.catalog.ready, self.catalog.reason = False, "the engine is not running"
                self._fail_all(EngineUnavailable())

    def _fail_all(self, error: ServiceError) -> None:
        pending, self._pending = self._pending, {}
        waiters, self._slot_waiters = self._slot_waiters, deque()
        for answer, slot in pending.values():
            if slot is not None:
                self._free.append(slot)
            if answer is not None and not answer.done():
                answer.set_exception(error)
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(error)

