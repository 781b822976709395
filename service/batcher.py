"""Dynamic micro-batching across tasks, in front of ONE dedicated inference thread.

Requests put decoded images on a bounded asyncio queue (full: 503 with Retry-After). A collector
task on the event loop takes up to `max_batch_size` items, waiting at most `max_wait_s` for more,
and only while more are on their way (being read or decoded, see `incoming`): a lone request at
low load goes to the model at once instead of paying the wait. The batch runs on the inference
thread (never the event loop): items are grouped by prompt bank, i.e. by visual-prompt signature
(J, m) within one registry snapshot, and each group is ONE image-tower forward whose per-sample
prompts are gathered by index from the bank. Each row is then scored against its own task's class
texts (softmax over that task's classes). While a batch runs, the next one queues up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from .backends import ImageTower
from .errors import ServiceError
from .metrics import Metrics
from .registry import PromptSlot, Snapshot, TaskHandle

log = logging.getLogger(__name__)


class Overloaded(ServiceError):
    def __init__(self, retry_after_s: int):
        super().__init__(503, "overloaded", f"the request queue is full; retry in {retry_after_s} s",
                         {"Retry-After": str(retry_after_s)})


class InferenceTimeout(ServiceError):
    def __init__(self, timeout_s: float):
        super().__init__(504, "timeout", f"no result within the request timeout of {timeout_s:g} s")


class Stopping(ServiceError):
    def __init__(self) -> None:
        super().__init__(503, "stopping", "the service is shutting down", {"Retry-After": "1"})


@dataclass
class _Item:
    image: Tensor  # [3, H, W], preprocessed
    handle: TaskHandle
    slot: PromptSlot
    future: asyncio.Future[Tensor]
    enqueued: float


class Batcher:
    """Owns the request queue, the collector task and the inference thread."""

    def __init__(self, tower: ImageTower, logit_scale: float, metrics: Metrics, max_batch_size: int,
                 max_wait_s: float, queue_size: int, timeout_s: float):
        self.tower = tower
        self.logit_scale = logit_scale
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.timeout_s = timeout_s
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=queue_size)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._incoming = 0
        self._last_forward_s = 0.0
        self._collector: asyncio.Task | None = None

    def start(self) -> None:
        self._collector = asyncio.get_running_loop().create_task(self._run(), name="batch-collector")

    async def stop(self) -> None:
        """Stop collecting, fail what is still queued (503), and let the running forward finish."""
        if self._collector is not None:
            self._collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._collector
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if not item.future.done():
                item.future.set_exception(Stopping())
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    @contextlib.contextmanager
    def incoming(self) -> Iterator[None]:
        """Mark a request that will enqueue soon (its image is being read or decoded)."""
        self._incoming += 1
        try:
            yield
        finally:
            self._incoming -= 1

    async def classify(self, image: Tensor, handle: TaskHandle, slot: PromptSlot) -> Tensor:
        """Class probabilities [C] of one preprocessed image for one task."""
        future: asyncio.Future[Tensor] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Item(image, handle, slot, future, time.perf_counter()))
        except asyncio.QueueFull:
            raise Overloaded(self.retry_after_s()) from None
        try:
            return await asyncio.wait_for(future, self.timeout_s)  # cancels the future: the collector skips it
        except TimeoutError:
            raise InferenceTimeout(self.timeout_s) from None

    def retry_after_s(self) -> int:
        """Whole seconds until the queue has room again, estimated from the last forward."""
        batches = self._queue.qsize() / self.max_batch_size
        return max(1, math.ceil(batches * self._last_forward_s))

    async def warm_up(self, snapshot: Snapshot, image_size: int) -> None:
        """One forward per prompt bank (and one unprompted), off the metrics: first-call costs go here."""
        banks = {id(s.bank): s.bank for s in snapshot.slots.values()} | {id(None): None}
        images = torch.zeros(1, 3, image_size, image_size)
        loop = asyncio.get_running_loop()
        for bank in banks.values():
            await loop.run_in_executor(self._executor, self.tower, images, None if bank is None else bank[:1])

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [item for item in await self._collect() if not item.future.done()]  # done = timed out
            if not items:
                continue
            now = time.perf_counter()
            for item in items:
                self.metrics.queue_wait.observe(now - item.enqueued)
            results: list[Tensor | ServiceError]
            try:
                results = await loop.run_in_executor(self._executor, self._infer, items)
            except Exception as e:  # a failing forward fails its own requests, not the service
                log.exception("inference failed for a batch of %d", len(items))
                results = [ServiceError(500, "inference_failed", f"{type(e).__name__}: {e}")] * len(items)
            for item, result in zip(items, results, strict=True):
                if item.future.done():
                    continue
                if isinstance(result, Exception):
                    item.future.set_exception(result)
                else:
                    item.future.set_result(result)

    async def _collect(self) -> list[_Item]:
        items = [await self._queue.get()]
        deadline = time.perf_counter() + self.max_wait_s
        while len(items) < self.max_batch_size:
            if not self._queue.empty():
                items.append(self._queue.get_nowait())
                continue
            remaining = deadline - time.perf_counter()
            if remaining <= 0 or self._incoming == 0:  # nothing else on its way: waiting only adds latency
                break
            try:
                items.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return items

    def _infer(self, items: list[_Item]) -> list[Tensor]:
        """Inference thread: one forward per prompt bank, then per-row scores over the row's own task."""
        groups: dict[int, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(id(item.slot.bank), []).append(i)
        results: list[Tensor] = [None] * len(items)  # type: ignore[list-item]
        with torch.inference_mode():
            for rows in groups.values():
                start = time.perf_counter()
                bank = items[rows[0]].slot.bank
                images = torch.stack([items[i].image for i in rows])
                prompts = None if bank is None else bank[torch.tensor([items[i].slot.index for i in rows],
                                                                      device=bank.device)]
                features = self.tower(images, prompts)
                for row, i in enumerate(rows):
                    logits = self.logit_scale * (features[row] @ items[i].handle.text_features.T)
                    results[i] = logits.softmax(dim=-1)
                elapsed = time.perf_counter() - start
                self._last_forward_s = elapsed
                self.metrics.batch_size.observe(len(rows))
                self.metrics.inference_duration.observe(elapsed)
        return results
