"""The engine process: the ONE frozen CLIP, the prompt-set registry, and the batching loop.

`python -m service` starts it (see launcher.py); it is not a command of its own. Its main thread
runs `Engine.run`: a plain ZeroMQ poll loop with no event loop, no HTTP and no decoding, so a
forward never waits for another thread's GIL. It takes the HTTP workers' `Infer` messages into one
queue, and when a batch is due (`max_batch_size` images, or `max_wait_ms` since the oldest, or no
upload on its way in any worker) it runs it: the pixels are copied from the workers' shared-memory
slots, moved to the device as uint8 and normalised there, grouped by prompt bank (tasks of equal
visual-prompt shape share one forward, their per-sample prompts gathered by index), and each row is
scored on the device against its own task's class texts. Only the top-k labels and scores go back.

Prompt-set work (start-up scan, the directory watcher, admin loads, sample files) runs on one
loader thread, so a load never stalls a batch; its results come back to the loop through a queue
and an inproc socket that wakes the poll. After every change the loop pushes the new `Catalog` to
all workers.
"""

from __future__ import annotations

import dataclasses
import gc
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

import numpy as np
import torch
import zmq

from mmap_model import Backbone, PromptedCLIP, PromptSetError
from mmap_model.prompts import check_name
from mmap_model.promptset import read_file_within

from .backbone import load_configured_backbone
from .backends import PixelNormalizer, make_image_tower
from .metrics import Metrics
from .registry import MAX_SAMPLE_BYTES, SAMPLE_TYPES, PromptSlot, Registry, TaskHandle
from .settings import Settings, settings_from_env
from .transport import (
    ENGINE_ADDRESS_ENV,
    ENGINE_READY_FD_ENV,
    Call,
    Catalog,
    EngineInfo,
    Failed,
    Hello,
    Infer,
    PixelRing,
    Reply,
    Results,
    Scored,
    TaskInfo,
    Welcome,
    decode_to_engine,
    encode,
    engine_info_json,
)

log = logging.getLogger(__name__)

IDLE_POLL_MS = 100  # the loop wakes at least this often (signals, the watcher)


@dataclass
class _Item:
    client: bytes  # the worker's socket identity
    request: int
    pixels: np.ndarray  # [H, W, 3] uint8, a view of the worker's slot (copied when the batch is built)
    handle: TaskHandle  # of the snapshot the request arrived in: a swap never breaks it
    slot: PromptSlot
    top_k: int
    arrived: float


@dataclass
class _Worker:
    index: int
    pid: int
    ring: PixelRing


def overloaded(request: int, retry_after_s: int) -> Failed:
    return Failed(request, 503, "overloaded", f"the request queue is full; retry in {retry_after_s} s", retry_after_s)


class Engine:
    """Owns the model, the registry, the queue and the sockets; `run` until `stop`."""

    def __init__(self, settings: Settings, backbone: Backbone, metrics: Metrics, address: str):
        self.settings = settings
        self.backbone = backbone
        self.metrics = metrics
        self.address = address
        self.registry = Registry(backbone, settings.prompts, metrics, settings.watch_debounce_s)
        self.tower = make_image_tower(settings.backend, backbone, settings)
        self.normalize = PixelNormalizer(backbone.device, backbone.preprocess_cfg["mean"],
                                         backbone.preprocess_cfg["std"])
        self.logit_scale = float(PromptedCLIP(backbone.model).logit_scale)
        self.queue: deque[_Item] = deque()
        self.workers: dict[bytes, _Worker] = {}
        self.ready = False
        self.failure: str | None = None
        self.generation = 0
        self._published: tuple[int, bool, str | None] | None = None  # (snapshot id, ready, failure) last pushed
        self._last_forward_s = 0.0
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

    def info(self) -> EngineInfo:
        cfg = self.backbone.preprocess_cfg
        return EngineInfo(address=self.address, pid=os.getpid(), image_size=tuple(cfg["size"]), preprocess=cfg,
                          model=self.backbone.model_name, pretrained=self.backbone.pretrained,
                          fingerprint=self.backbone.fingerprint, device=str(self.backbone.device),
                          precision=self.settings.precision, backend=self.settings.backend)

    def start(self) -> None:
        """Scan the prompt directory (loader thread); the loop warms up and turns ready when it is done."""
        self._background(self.registry.scan, self._after_scan)

    def stop(self) -> None:
        self._stopping = True

    def close(self) -> None:
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
            now = time.monotonic()
            if now >= self._poll_due and not self._polling:
                self._polling = True
                self._background(lambda: self.registry.poll(time.monotonic()), self._after_poll)
            while self.queue and self._batch_due(time.monotonic()):
                self._run_batch()
                self._receive()  # what arrived during the forward joins the next batch
            self._publish_catalog()

    def _timeout_ms(self) -> int:
        timeout = IDLE_POLL_MS / 1000
        if self.queue:
            timeout = min(timeout, self.queue[0].arrived + self.settings.max_wait_ms / 1000 - time.monotonic())
        if not self._polling:
            timeout = min(timeout, self._poll_due - time.monotonic())
        return max(0, int(timeout * 1000))

    # ---- messages ----

    def _receive(self) -> None:
        while True:
            try:
                client, payload = self._router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                message = decode_to_engine(payload)
            except Exception as e:  # a bug in a worker must not stop the engine
                log.error("undecodable message from worker %r: %s", client, e)
                continue
            if isinstance(message, Infer):
                self._enqueue(client, message)
            elif isinstance(message, Hello):
                self._hello(client, message)
            else:
                self._call(client, message)

    def _send(self, client: bytes, message: Any) -> None:
        self._router.send_multipart([client, encode(message)])

    def _hello(self, client: bytes, hello: Hello) -> None:
        height, width = self.info().image_size
        try:
            ring = PixelRing(Path(hello.ring), hello.slots, height, width, create=False)
        except (OSError, ValueError) as e:
            log.error("worker %d (pid %d): cannot map its ring %s: %s", hello.worker, hello.pid, hello.ring, e)
            return
        for identity in [c for c, w in self.workers.items() if w.index == hello.worker]:
            del self.workers[identity]  # its predecessor died; what it had queued is answered into the void
        self.workers[client] = _Worker(hello.worker, hello.pid, ring)
        log.info("worker %d (pid %d) connected", hello.worker, hello.pid)
        self._send(client, Welcome(engine_pid=os.getpid(), catalog=self._catalog()))

    def _enqueue(self, client: bytes, infer: Infer) -> None:
        worker = self.workers.get(client)
        snapshot = self.registry.snapshot
        handle = snapshot.tasks.get(infer.task)
        if worker is None or not 0 <= infer.slot < worker.ring.slots:
            self._send(client, Failed(infer.id, 500, "protocol_error", "request from an unknown worker or slot"))
        elif handle is None:
            loaded = ", ".join(sorted(snapshot.tasks)) or "none"
            self._send(client, Failed(infer.id, 404, "unknown_task", f"unknown task {infer.task!r}; loaded tasks: {loaded}"))
        elif not self.ready:
            self._send(client, Failed(infer.id, 503, "not_ready", self.not_ready_reason() or "", 1))
        elif len(self.queue) >= self.settings.queue_size:
            self._send(client, overloaded(infer.id, self.retry_after_s()))
        else:
            self.queue.append(_Item(client, infer.id, worker.ring.pixels[infer.slot], handle,
                                    snapshot.slots[infer.task], infer.top_k, time.monotonic()))

    def retry_after_s(self) -> int:
        """Whole seconds until the queue has room again, estimated from the last forward."""
        return max(1, int(np.ceil(len(self.queue) / self.settings.max_batch_size * self._last_forward_s)))

    # ---- batching ----

    def _batch_due(self, now: float) -> bool:
        if len(self.queue) >= self.settings.max_batch_size:
            return True
        if now - self.queue[0].arrived >= self.settings.max_wait_ms / 1000:
            return True
        return not any(w.ring.incoming > 0 for w in self.workers.values())  # nothing on its way: don't wait

    def _run_batch(self) -> None:
        now = time.monotonic()
        items: list[_Item] = []
        while self.queue and len(items) < self.settings.max_batch_size:
            item = self.queue.popleft()
            if now - item.arrived > self.settings.request_timeout_s:  # its worker has answered 504 already
                self._send(item.client, Failed(item.request, 504, "timeout", "no result within the request timeout"))
                continue
            items.append(item)
            self.metrics.queue_wait.observe(now - item.arrived)
        groups: dict[int, list[_Item]] = {}
        for item in items:
            groups.setdefault(id(item.slot.bank), []).append(item)
        replies: dict[bytes, list[Scored | Failed]] = {}
        for group in groups.values():
            start = time.perf_counter()
            try:
                answers = self._infer(group)
            except Exception as e:  # a failing forward fails its own requests, not the service
                log.exception("inference failed for a batch of %d", len(group))
                answers = [Failed(i.request, 500, "inference_failed", f"{type(e).__name__}: {e}") for i in group]
            elapsed = time.perf_counter() - start
            for item, answer in zip(group, answers, strict=True):
                replies.setdefault(item.client, []).append(answer)
            self._last_forward_s = elapsed
            self.metrics.batch_size.observe(len(group))
            self.metrics.inference_duration.observe(elapsed)
            self.metrics.forward_per_image.observe(elapsed / len(group))
        for client, answers in replies.items():
            self._send(client, Results(answers))

    def _infer(self, items: list[_Item]) -> list[Scored]:
        """One forward for items of one prompt bank, then each row scored over its own task's classes."""
        bank = items[0].slot.bank
        with torch.inference_mode():
            pixels = torch.from_numpy(np.stack([item.pixels for item in items]))  # copies out of the slots
            prompts = None if bank is None else bank[torch.tensor([i.slot.index for i in items], device=bank.device)]
            features = self.tower(self.normalize(pixels), prompts).to(self.backbone.device)
            rows_of: dict[int, list[int]] = {}
            for row, item in enumerate(items):
                rows_of.setdefault(id(item.handle), []).append(row)
            answers: list[Scored] = [None] * len(items)  # type: ignore[list-item]
            for rows in rows_of.values():
                handle = items[rows[0]].handle
                index = torch.tensor(rows, device=features.device)
                probs = (self.logit_scale * features[index] @ handle.text_features.T).softmax(dim=-1)
                k = min(max(items[r].top_k for r in rows), len(handle.classnames))
                scores, labels = (t.tolist() for t in probs.topk(k))
                for row, row_scores, row_labels in zip(rows, scores, labels, strict=True):
                    n = min(items[row].top_k, k)
                    answers[row] = Scored(items[row].request, handle.task, handle.version, handle.prompt_set,
                                          handle.method, [handle.classnames[i] for i in row_labels[:n]], row_scores[:n])
        return answers

    def warm_up(self) -> None:
        """One forward per prompt bank (and one unprompted), off the metrics: first-call costs go here."""
        height, width = self.info().image_size
        pixels = torch.zeros(1, height, width, 3, dtype=torch.uint8)
        banks = {id(s.bank): s.bank for s in self.registry.snapshot.slots.values()} | {id(None): None}
        with torch.inference_mode():
            for bank in banks.values():
                self.tower(self.normalize(pixels), None if bank is None else bank[:1])

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
        try:
            if error is not None:
                raise error
            self.warm_up()
        except Exception as e:  # surfaced by /readyz; the process stays up for inspection
            log.exception("start-up failed")
            self.failure = f"{type(e).__name__}: {e}"
            return
        self.ready = True
        snapshot = self.registry.snapshot
        log.info("ready: %d tasks from %d prompt sets", len(snapshot.tasks), len(snapshot.sets))
        gc.collect()
        gc.freeze()  # start-up objects never need a full collection again (each one took ~200 ms)
        self._schedule_poll()

    def _after_poll(self, result: None, error: BaseException | None) -> None:
        if error is not None:  # a broken directory must not end the watch; the next poll retries
            log.error("prompt-directory poll failed: %s: %s", type(error).__name__, error)
        self._polling = False
        self._schedule_poll()

    def _schedule_poll(self) -> None:
        if self.settings.watch_interval_s > 0:
            self._poll_due = time.monotonic() + self.settings.watch_interval_s

    def _call(self, client: bytes, call: Call) -> None:
        name = call.args.get("name", "")

        def answer(result: Any, error: BaseException | None) -> None:
            if error is None:
                self._send(client, Reply(call.id, 200, result))
            elif isinstance(error, CallRefused):
                self._send(client, Reply(call.id, error.status, None, error.error, str(error)))
            else:
                log.error("%s failed: %s: %s", call.op, type(error).__name__, error)
                self._send(client, Reply(call.id, 500, None, "internal_error", f"{type(error).__name__}: {error}"))

        operations: dict[str, Callable[[], Any]] = {
            "admin.list": self._listing,
            "admin.load": lambda: self._load(name),
            "admin.unload": lambda: self._unload(name),
            "sample": lambda: self._sample(call.args.get("task", ""), call.args.get("filename", "")),
        }
        if call.op not in operations:
            answer(None, CallRefused(400, "unknown_operation", f"unknown operation {call.op!r}"))
            return
        self._background(operations[call.op], answer)

    def _listing(self) -> dict[str, Any]:
        return {"directory": str(self.registry.directory), "directory_error": self.registry.directory_error,
                "prompt_sets": [dataclasses.asdict(s) for s in self.registry.status()]}

    def _load(self, name: str) -> dict[str, Any]:
        try:
            check_name(name)
        except ValueError as e:
            raise CallRefused(422, "invalid_name", str(e)) from e
        if not (self.registry.directory / name).is_dir():
            raise CallRefused(404, "not_found", f"no prompt-set directory {name!r} in {self.registry.directory}")
        try:
            self.registry.load(name)
        except PromptSetError as e:
            serving = self.registry.snapshot.sets.get(name)
            keeps = f"; version {serving.version} keeps serving" if serving else ""
            raise CallRefused(422, "load_failed", f"{e}{keeps}") from e
        return self._listing()

    def _unload(self, name: str) -> dict[str, Any]:
        if not self.registry.unload(name):
            raise CallRefused(404, "not_loaded", f"prompt set {name!r} is not loaded")
        return self._listing()

    def _sample(self, task: str, filename: str) -> dict[str, Any]:
        handle = self.registry.snapshot.tasks.get(task)
        if handle is None:
            raise CallRefused(404, "unknown_task", f"unknown task {task!r}")
        missing = CallRefused(404, "unknown_sample", f"task {task!r} has no sample {filename!r}")
        if filename not in handle.samples:  # only listed names: no path ever comes from the client
            raise missing
        # Read now, judged on the opened file: it may have been removed since the load, or replaced by a
        # symlink out of the prompt directory (even for just the moment of the open).
        try:
            data = read_file_within(handle.sample_dir / filename, MAX_SAMPLE_BYTES, self.registry.directory.resolve())
        except PromptSetError:
            raise missing from None
        return {"data": data, "media_type": SAMPLE_TYPES[Path(filename).suffix.lower()]}

    # ---- the catalog ----

    def not_ready_reason(self) -> str | None:
        """None when ready: prompt sets loaded, warm-up done, at least one task served."""
        if self.failure:
            return f"start-up failed: {self.failure}"
        if not self.ready:
            return "loading prompt sets and warming up"
        if not self.registry.snapshot.tasks:
            failed = [s.name for s in self.registry.status() if s.state == "failed"]
            return f"no prompt set loaded from {self.settings.prompts}" + (
                f"; failed: {', '.join(failed)} (see the log or /admin/promptsets)" if failed else "")
        return None

    def _catalog(self) -> Catalog:
        snapshot = self.registry.snapshot
        reason = self.not_ready_reason()
        tasks = [TaskInfo(h.task, h.prompt_set, h.version, h.method, h.group, list(h.classnames), list(h.samples))
                 for h in (snapshot.tasks[t] for t in sorted(snapshot.tasks))]
        return Catalog(self.generation, reason is None, reason, tasks)

    def _publish_catalog(self) -> None:
        state = (id(self.registry.snapshot), self.ready, self.failure)
        if state == self._published:
            return
        self._published = state
        self.generation += 1
        catalog = encode(self._catalog())
        for client in self.workers:
            self._router.send_multipart([client, catalog])


class CallRefused(Exception):
    """An admin or sample call refused with an HTTP status (the worker answers it as is)."""

    def __init__(self, status: int, error: str, detail: str):
        super().__init__(detail)
        self.status = status
        self.error = error


def engine_threads(settings: Settings) -> int:
    """Torch threads: the setting, else 1 on CUDA, else the cores the HTTP workers leave (at least 1)."""
    if settings.engine_threads:
        return settings.engine_threads
    if settings.device == "cuda" or (settings.device == "auto" and torch.cuda.is_available()):
        return 1
    return max(1, (os.cpu_count() or 1) - settings.workers)


def main() -> None:
    """The engine process (started by the launcher, which passes the settings and a pipe in the environment)."""
    settings = settings_from_env()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s engine: %(message)s")
    torch.set_num_threads(engine_threads(settings))
    ready = os.fdopen(int(os.environ[ENGINE_READY_FD_ENV]), "wb")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher decides when the engine stops
    try:
        backbone = load_configured_backbone(settings)
        engine = Engine(settings, backbone, Metrics(), os.environ[ENGINE_ADDRESS_ENV])
    except Exception as e:
        log.error("%s", e)
        sys.exit(1)
    signal.signal(signal.SIGTERM, lambda *_: engine.stop())
    if stop.is_set():
        sys.exit(0)
    ready.write(engine_info_json(engine.info()) + b"\n")
    ready.close()
    log.info("serving %s (%s) on %s with %d torch threads", backbone.model_name, backbone.device,
             engine.address, torch.get_num_threads())
    engine.start()
    try:
        engine.run()
    finally:
        engine.close()
    logging.shutdown()
    os._exit(0)  # skip finalisation: collecting the model's objects one by one only delays the exit


if __name__ == "__main__":
    main()
