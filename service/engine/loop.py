"""The engine process: the ONE frozen CLIP, the prompt-set registry, and the batching loop.

`python -m service` starts it (see launcher.py); it is not a command of its own. Its main thread
runs `Engine.run`: a plain ZeroMQ poll loop with no event loop, no HTTP and no Pillow decoding, so
a forward never waits for another thread's GIL (with decode=engine it decodes JPEG batches on its
device, device_decode.py). It takes the HTTP workers' `Infer` messages into one
queue, and when a batch is due (`max_batch_size` images, or `max_wait_ms` since the oldest, or no
upload on its way in any worker) it runs it: the pixels are copied from the workers' shared-memory
slots, moved to the device as uint8 and normalised there, grouped by prompt bank (tasks of equal
visual-prompt shape share one forward, their per-sample prompts gathered by index), and each row is
scored on the device against its own task's class texts. Only the top-k labels and scores go back.
With `batches_in_flight` 2 the loop launches the next batch before it reads the last one's results
back, so that on CUDA the device computes while the loop answers, receives and prepares.

Prompt-set work (start-up scan, the directory watcher, admin loads, sample files) runs on one
loader thread, so a load never stalls a batch; its results come back to the loop through a queue
and an inproc socket that wakes the poll. After every change the loop pushes what changed in the
catalog (`CatalogDelta`) to all workers (catalog.py).
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import zmq

from service.logs import configure_logging
from service.metrics import Metrics
from service.settings import Settings, settings_from_env
from service.transport import (
    ENGINE_ADDRESS_ENV,
    ENGINE_READY_FD_ENV,
    Call,
    Embedded,
    Failed,
    Hello,
    Infer,
    PixelRing,
    Reply,
    Results,
    Scored,
    Sync,
    Welcome,
    decode_to_engine,
    encode,
    engine_info_json,
)

from .backbone import load_configured_backbone
from .core import InferenceCore, LabelsNeeded, Launched, Pending
from .operations import CallRefused

log = logging.getLogger(__name__)

IDLE_POLL_MS = 100  # the loop wakes at least this often (signals, the watcher)


@dataclass
class _Worker:
    index: int
    pid: int
    ring: PixelRing


class Engine:
    """The batching loop around an InferenceCore, its sockets and its loader thread; `run` until `stop`."""

    def __init__(self, settings: Settings, core: InferenceCore, address: str):
        self.settings = settings
        self.core = core
        self.address = address
        self.queue: deque[Pending] = deque()
        self.in_flight: deque[Launched] = deque()  # launched on the device, not yet answered
        self.workers: dict[bytes, _Worker] = {}
        self._stopping = False
        self._poll_due = float("inf")
        self._polling = False
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="promptsets")
        self._results: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._context = zmq.Context()
        self._router = self._context.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a replacement worker may reuse an identity
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.bind(address)
        self._wake_rx = self._context.socket(zmq.PULL)
        self._wake_rx.bind("inproc://loader-done")
        self._wake_tx: zmq.Socket | None = None  # created and used on the loader thread only

    # ---- life cycle ----

    def start(self) -> None:
        """Scan the prompt directory (loader thread); the loop warms up and turns ready when it is done."""
        self._background(lambda: self.core.registry.scan(after_step=_keep_loaded), self._after_scan)

    def stop(self) -> None:
        self._stopping = True

    def close(self) -> None:
        while self.in_flight:  # launched: their answers are on the device (two in flight leave one after a turn)
            self._answer(self.in_flight.popleft())
        for item in self.queue:
            self._send(item.client, Failed(item.request, 503, "stopping", "the service is shutting down", 1))
        self.queue.clear()
        self._loader.shutdown(wait=False, cancel_futures=True)
        self._router.close(linger=0)
        self._wake_rx.close(linger=0)

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._wake_rx, zmq.POLLIN)
        while not self._stopping:
            events = dict(poller.poll(self._timeout_ms()))
            if self._router in events:
                self._receive()
            if self._wake_rx in events:
                self._finish_background()
            if time.monotonic() >= self._poll_due and not self._polling:
                self._polling = True
                self._background(self.core.poll_prompts, self._after_poll)
            # One batch a turn: between two batches the loop also takes the loader thread's results and pushes
            # catalogs, or a load that keeps batches due would hold them back until it ends. What arrived
            # during the forward joins the next batch (the next turn's poll does not wait while one is due).
            if self.queue and self._batch_due(time.monotonic()):
                self.in_flight.append(self._launch_batch())
                while len(self.in_flight) >= self.settings.batches_in_flight:
                    self._answer(self.in_flight.popleft())
            else:  # nothing is due: answer what is launched before the poll waits
                while self.in_flight:
                    self._answer(self.in_flight.popleft())
            if self.core.shadow_wait_s() == 0:  # a rollout's shadow rows, in a forward of their own
                self.in_flight.append(self.core.launch_shadows())
            self._publish_catalog()
            if self.core.registry.retiring:
                self.core.reclaim(itertools.chain(self.queue, *(batch.items for batch in self.in_flight)))

    def _timeout_ms(self) -> int:
        now = time.monotonic()
        if self.in_flight or (self.queue and self._batch_due(now)):  # the next turn launches or answers at once
            return 0
        timeout = min(IDLE_POLL_MS / 1000, self.core.shadow_wait_s())
        if self.queue:
            timeout = min(timeout, self.queue[0].arrived + self.settings.max_wait_ms / 1000 - now)
        if not self._polling:
            timeout = min(timeout, self._poll_due - now)
        return max(0, int(timeout * 1000))

    # ---- messages ----

    def _receive(self) -> None:
        """Every message waiting; the label sets new to the cache among them get their text features together."""
        needed: list[LabelsNeeded] = []
        while True:
            try:
                client, payload = self._router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                message = decode_to_engine(payload)
            except Exception as e:  # a bug in a worker must not stop the engine
                log.error("undecodable message from worker %r: %s", client, e)
                continue
            if isinstance(message, Infer):
                self._enqueue(client, message, needed)
            elif isinstance(message, Hello):
                self._hello(client, message)
            elif isinstance(message, Sync):
                self._send(client, self.core.feed.catch_up(message.source, message.generation))
            else:
                self._call(client, message)
        if needed:
            self._complete_labels(needed)

    def _complete_labels(self, needed: list[LabelsNeeded]) -> None:
        try:
            self.core.complete_labels(needed)
        except Exception as e:  # its requests fail, the engine goes on
            log.exception("text features of %d label sets failed", len(needed))
            for n in needed:
                self._send(n.pending.client, Failed(n.pending.request, 500, "inference_failed",
                                                    f"the labels' text features: {type(e).__name__}: {e}"))
            return
        self.queue.extend(n.pending for n in needed)

    def _send(self, client: bytes, message: Any) -> None:
        self._router.send_multipart([client, encode(message)])

    def _hello(self, client: bytes, hello: Hello) -> None:
        height, width = self.core.backbone.preprocess_cfg["size"]
        try:
            ring = PixelRing(Path(hello.ring), hello.slots, height, width, create=False)
        except (OSError, ValueError) as e:
            log.error("worker %d (pid %d): cannot map its ring %s: %s", hello.worker, hello.pid, hello.ring, e)
            return
        for identity in [c for c, w in self.workers.items() if w.index == hello.worker]:
            del self.workers[identity]  # its predecessor died; what it had queued is answered into the void
        self.workers[client] = _Worker(hello.worker, hello.pid, ring)
        log.info("worker %d (pid %d) connected", hello.worker, hello.pid)
        self._send(client, Welcome(engine_pid=os.getpid(), catalog=self.core.feed.full()))

    def _enqueue(self, client: bytes, infer: Infer, needed: list[LabelsNeeded]) -> None:
        worker = self.workers.get(client)
        if worker is None or not 0 <= infer.slot < worker.ring.slots:
            self._send(client, Failed(infer.id, 500, "protocol_error", "request from an unknown worker or slot"))
            return
        pixels = worker.ring.pixels[infer.slot] if infer.jpeg is None else infer.jpeg
        admitted = self.core.admit(infer.id, infer.task, pixels, infer.top_k, len(self.queue) + len(needed),
                                   infer.labels, infer.embed, defer_labels=True, version=infer.version, key=infer.key)
        if isinstance(admitted, Failed):
            self._send(client, admitted)
            return
        pending = admitted.pending if isinstance(admitted, LabelsNeeded) else admitted
        pending.client = client
        pending.expires = infer.expires or pending.arrived + self.settings.request_timeout_s
        if isinstance(admitted, LabelsNeeded):
            needed.append(admitted)
        else:
            self.queue.append(admitted)

    # ---- batching ----

    def _batch_due(self, now: float) -> bool:
        if len(self.queue) >= self.settings.max_batch_size:
            return True
        if now - self.queue[0].arrived >= self.settings.max_wait_ms / 1000:
            return True
        return not any(w.ring.incoming > 0 for w in self.workers.values())  # nothing on its way: don't wait

    def _launch_batch(self) -> Launched:
        now = time.monotonic()
        items: list[Pending] = []
        while self.queue and len(items) < self.settings.max_batch_size:
            item = self.queue.popleft()
            if now > item.expires:  # its worker has answered 504 already (a wait for a slot there counts too)
                self._send(item.client, Failed(item.request, 504, "timeout", "no result within the request timeout"))
                continue
            items.append(item)
            self.core.metrics.queue_wait.observe(now - item.arrived)
        return self.core.launch(items)

    def _answer(self, launched: Launched) -> None:
        replies: dict[bytes, list[Scored | Embedded | Failed]] = {}
        for item, answer in zip(launched.items, self.core.finish(launched), strict=True):
            if item.client is not None:  # (a shadow row's answer is the evidence's alone)
                replies.setdefault(item.client, []).append(answer)
        for client, answers in replies.items():
            self._send(client, Results(answers))

    # ---- prompt sets, on the loader thread ----
    def _background(self, work: Callable[[], Any], then: Callable[[Any, BaseException | None], Any]) -> None:
        """Run `work` on the loader thread; `then(result, error)` runs on the loop afterwards."""

        def job() -> None:
            try:
                result, error = work(), None
            except BaseException as e:  # handed to `then`, which decides
                result, error = None, e
            self._results.put(lambda: then(result, error))
            if self._wake_tx is None:
                self._wake_tx = self._context.socket(zmq.PUSH)
                self._wake_tx.connect("inproc://loader-done")
            self._wake_tx.send(b"")

        self._loader.submit(job)

    def _finish_background(self) -> None:
        while True:
            try:
                self._wake_rx.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
        while True:
            try:
                done = self._results.get_nowait()
            except queue.Empty:
                return
            done()

    def _after_scan(self, result: None, error: BaseException | None) -> None:
        if self.core.finish_start_up(error):
            gc.collect()
            gc.freeze()  # start-up objects never need a full collection again (each one took ~200 ms)
            self._schedule_poll()

    def _after_poll(self, due: float | None, error: BaseException | None) -> None:
        if error is not None:  # a broken directory must not end the watch; the next poll retries
            log.error("prompt-directory poll failed: %s: %s", type(error).__name__, error)
        self._polling = False
        self._poll_due = due or time.monotonic() + self.settings.watch_interval_s

    def _schedule_poll(self) -> None:
        if self.settings.watch_interval_s > 0:
            self._poll_due = time.monotonic() + self.settings.watch_interval_s

    def _call(self, client: bytes, call: Call) -> None:
        def answer(reply: Reply | None, error: BaseException | None) -> None:
            self._publish_catalog()  # before the reply, on the same socket: whoever asked sees its own change
            if isinstance(error, CallRefused):
                reply = error.reply(call.id)
            elif error is not None:
                log.error("%s failed: %s: %s", type(call.op).__name__, type(error).__name__, error)
                reply = Reply(call.id, 500, error="internal_error", detail=f"{type(error).__name__}: {error}")
            self._send(client, reply)

        self._background(lambda: self.core.operations.run(call.id, call.op), answer)

    # ---- the catalog ----

    def _publish_catalog(self) -> None:
        """Push what changed in the catalog, if anything did, to every worker."""
        change = self.core.feed.change()
        if change is None:
            return
        delta = encode(change)
        for client in self.workers:
            self._router.send_multipart([client, delta])


def _keep_loaded() -> None:
    """Between the steps of the start-up scan: what it loaded so far is served for as long as the process runs, so
    it leaves the collector's full passes, each of which would otherwise walk every set loaded so far (14 of them,
    3.3 s, in a scan of 10,000 sets on the 2-core dev box). The young generations are collected first: their
    cyclic garbage is not kept."""
    gc.collect(1)
    gc.freeze()


def engine_threads(settings: Settings) -> int:
    """Torch threads: the setting, else 1 on CUDA (it only launches kernels), else every core: on the CPU the
    forward is most of the work, and OMP_WAIT_POLICY=PASSIVE (set by the launcher) keeps idle threads off
    the cores the HTTP workers need."""
    if settings.engine_threads:
        return settings.engine_threads
    if settings.device == "cuda" or (settings.device == "auto" and torch.cuda.is_available()):
        return 1
    return os.cpu_count() or 1


def main() -> None:
    """The engine process (started by the launcher, which passes the settings and a pipe in the environment)."""
    settings = settings_from_env()
    configure_logging(settings.log_level, settings.log_format, "engine")
    torch.set_num_threads(engine_threads(settings))
    ready = os.fdopen(int(os.environ[ENGINE_READY_FD_ENV]), "wb")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher decides when the engine stops
    try:
        backbone = load_configured_backbone(settings)
        core = InferenceCore(settings, backbone, Metrics())
        engine = Engine(core.settings, core, os.environ[ENGINE_ADDRESS_ENV])
    except Exception as e:
        log.error("%s", e)
        sys.exit(1)
    signal.signal(signal.SIGTERM, lambda *_: engine.stop())
    if stop.is_set():
        sys.exit(0)
    ready.write(engine_info_json(core.info(engine.address)) + b"\n")
    ready.close()
    log.info("serving %s (%s) on %s with %d torch threads, max batch %d, CUDA graphs %s", backbone.model_name,
             backbone.device, engine.address, torch.get_num_threads(), core.settings.max_batch_size,
             "on" if core.settings.cuda_graphs else "off")
    engine.start()
    try:
        engine.run()
    finally:
        engine.close()
    logging.shutdown()
    os._exit(0)  # skip finalisation: collecting the model's objects one by one only delays the exit


if __name__ == "__main__":
    main()
