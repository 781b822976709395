"""The engine's model side: the ONE frozen CLIP, the prompt-set registry, batched scoring, and the
operations off the hot path (operations.py). Transport-free: the engine process's loop
(engine.py) drives it, and so does the Ray Serve engine deployment (deploy/ray).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from mmap_model import Backbone, PromptedCLIP, class_text_features
from service.errors import LISTED_TASKS, unknown_task_detail
from service.metrics import Metrics
from service.settings import Settings
from service.transport import Embedded, EngineInfo, Failed, Scored

from .backends import PixelNormalizer, make_image_tower
from .batch import Forward, LabelsNeeded, Launched, Pending, index, to_host
from .catalog import CatalogFeed
from .device_decode import DeviceDecoder, UndecodableJpeg
from .operations import Operations
from .registry import Registry
from .rollouts import Evidence, Route, Router, VersionNotServed
from .snapshot import PromptSlot, TaskHandle

log = logging.getLogger(__name__)


UNPROMPTED = PromptSlot(None, 0)  # an embedding asked for without a task: the bare image tower


class InferenceCore:
    """The model, the registry and what is done with them; not thread-safe but for `call` (loader thread)."""

    def __init__(self, settings: Settings, backbone: Backbone, metrics: Metrics):
        settings = self.settings = settings.resolved(backbone.device.type)  # the engine reads these, not its own
        self.backbone = backbone
        self.metrics = metrics
        self.registry = Registry(backbone, settings.prompts, metrics, settings.watch_debounce_s)
        self.tower = make_image_tower(settings.backend, backbone, settings)
        cfg = backbone.preprocess_cfg
        self.normalize = PixelNormalizer(backbone.device, cfg["mean"], cfg["std"])
        self.decoder = DeviceDecoder(cfg, backbone.device) if settings.decode == "engine" else None
        self.prompted = PromptedCLIP(backbone.model)
        self.logit_scale = float(self.prompted.logit_scale)
        self.label_cache: OrderedDict[tuple[str, str, str, tuple[str, ...]], Tensor] = OrderedDict()
        self.ready = False
        self.failure: str | None = None
        self.feed = CatalogFeed(self.registry, self.not_ready_reason, lambda: (self.ready, self.failure,
                                self.registry.progress, self.registry.directory_error), settings.metrics_max_tasks)
        self.last_forward_s = 0.0
        self.evidence = Evidence(metrics)
        self.router = Router(self.evidence, settings.max_batch_size)
        self.operations = Operations(self.registry, self.evidence)

    def info(self, address: str) -> EngineInfo:
        cfg = self.backbone.preprocess_cfg
        return EngineInfo(address=address, pid=os.getpid(), image_size=tuple(cfg["size"]), preprocess=cfg,
                          model=self.backbone.model_name,
                          pretrained=self.backbone.pretrained or self.settings.pretrained,
                          fingerprint=self.backbone.fingerprint, device=str(self.backbone.device),
                          precision=self.settings.precision, backend=self.settings.backend,
                          max_batch_size=self.settings.max_batch_size)

    def admit(self, request: int, task: str, pixels: np.ndarray | bytes, top_k: int, queued: int,
              labels: list[str] | None = None, embed: bool = False, defer_labels: bool = False,
              version: str | None = None, key: str | None = None) -> Pending | Failed | LabelsNeeded:
        """A request for the queue, or its refusal: unknown task, not ready, queue full (`queued` waiting).

        `pixels`: uint8 [H, W, 3], or with decode=engine the JPEG file (decoded with its batch).
        `labels`: score against these class names (the worker checked them) with the task's prompts and
        template; their text features are kept in an LRU cache. On a miss they are computed here, or with
        `defer_labels` the request comes back as `LabelsNeeded`, for `complete_labels` to compute with others.
        `embed`: answer the image embedding; with task "" the unprompted tower's. `version` pins the task's version
        (its live one or its rollout's candidate; else 409), `key` picks a rollout's version (rollouts.py)."""
        snapshot = self.registry.snapshot
        handle = snapshot.tasks.get(task)
        if handle is None and not (embed and task == ""):
            return Failed(request, 404, "unknown_task", unknown_task_detail(
                task, heapq.nsmallest(LISTED_TASKS, snapshot.tasks), len(snapshot.tasks)))
        if not self.ready:
            return Failed(request, 503, "not_ready", self.not_ready_reason() or "", 1)
        if isinstance(pixels, bytes) and self.decoder is None:
            return Failed(request, 500, "protocol_error", "a JPEG file sent to an engine that does not decode")
        if queued >= self.settings.queue_size:
            retry = max(1, int(np.ceil(queued / self.settings.max_batch_size * self.last_forward_s)))
            return Failed(request, 503, "overloaded", f"the request queue is full; retry in {retry} s", retry)
        now, serial = time.monotonic(), snapshot.serial
        if handle is None:
            return Pending(request, pixels, None, UNPROMPTED, 0, arrived=now, serial=serial)
        route = Route(handle)
        if version is not None or snapshot.rollouts:
            try:
                route = self.router.route(handle, snapshot.rollouts.get(task), version, key,
                                          scored=labels is None and not embed)
            except VersionNotServed as e:
                return Failed(request, 409, "version_not_served", str(e))
            handle = route.handle
        slot = handle.slot
        if embed:
            return Pending(request, pixels, handle, slot, 0, arrived=now, serial=serial)
        if labels is None:
            return Pending(request, pixels, handle, slot, top_k, handle.classnames, handle.text_features, now,
                           serial=serial, role=route.role, pair=route.pair)
        classes = tuple(labels)
        cached = (handle.prompt_set, handle.version, handle.task, classes)
        pending = Pending(request, pixels, handle, slot, top_k, classes, self.label_cache.get(cached), now,
                          serial=serial, role=route.role)
        self.metrics.label_cache.labels("hit" if pending.text is not None else "miss").inc()
        if pending.text is not None:
            self.label_cache.move_to_end(cached)
            return pending
        needed = LabelsNeeded(cached, pending)
        if defer_labels:
            return needed
        self.complete_labels([needed])
        return pending

    def complete_labels(self, needed: list[LabelsNeeded]) -> None:
        """The text features of the label sets these requests brought, cached, and each request's `text` set.

        One text-tower forward per task and version for all its sets (they share its template and text
        prompts; every name is its own row of the forward), so a burst of new label sets costs about one
        forward, not one each."""
        sets: dict[int, tuple[TaskHandle, dict[tuple, tuple[str, ...]]]] = {}
        for n in needed:
            sets.setdefault(id(n.pending.handle), (n.pending.handle, {}))[1][n.key] = n.pending.classes
        features: dict[tuple, Tensor] = {}
        for handle, of_task in sets.values():
            names = [name for classes in of_task.values() for name in classes]
            with torch.inference_mode():
                text = class_text_features(self.prompted, self.backbone.tokenizer, names, handle.template,
                                           handle.text_prompts).float()
            for key, rows in zip(of_task, text.split([len(c) for c in of_task.values()]), strict=True):
                features[key] = rows.clone()  # its own storage: the cache drops sets one by one
                self.label_cache[key] = features[key]
                if len(self.label_cache) > self.settings.label_cache_size:
                    self.label_cache.popitem(last=False)
        for n in needed:
            n.pending.text = features[n.key]

    def score(self, items: list[Pending]) -> list[Scored | Embedded | Failed]:
        """Answers in the order of `items`: one forward per prompt bank, each row scored over its own task."""
        return self.finish(self.launch(items))

    def launch(self, items: list[Pending]) -> Launched:
        """Queue a batch's work on the device (decoding, one forward per prompt bank, scoring) and start copying
        its results back; `finish` reads them. On a CPU the work is done when this returns; on CUDA the next
        batch can be prepared and launched while the device still computes this one."""
        answers: list[Scored | Embedded | Failed | None] = [None] * len(items)
        self._decode(items, answers)
        groups: dict[int, list[int]] = {}
        for i, item in enumerate(items):
            if answers[i] is None:  # not failed by its decoding
                groups.setdefault(id(item.slot.bank), []).append(i)
                if item.pair is not None and item.role == "live":
                    self.router.shadow(item)
        launched = Launched(items, answers)
        for rows in groups.values():
            start = time.perf_counter()
            try:
                work: Forward | Exception = self._forward([items[i] for i in rows])
            except Exception as e:  # a failing forward fails its own requests, not the service
                work = e
            launched.groups.append((rows, work, time.perf_counter() - start))
        return launched

    def finish(self, launched: Launched) -> list[Scored | Embedded | Failed]:
        """A launched batch's answers, in the order of its items (waits for the device)."""
        answers = launched.answers
        for rows, work, launch_s in launched.groups:
            start = time.perf_counter()
            group = [launched.items[i] for i in rows]
            try:
                if isinstance(work, Exception):
                    raise work
                results: list[Scored | Embedded | Failed] = list(work.answers())
            except Exception as e:
                log.exception("inference failed for a batch of %d", len(group))
                results = [Failed(i.request, 500, "inference_failed", f"{type(e).__name__}: {e}") for i in group]
            # launching + waiting for the device: not the time between, when the loop launched the next batch
            elapsed = launch_s + time.perf_counter() - start
            for i, result in zip(rows, results, strict=True):
                answers[i] = result
            self.last_forward_s = elapsed
            self.metrics.batch_size.observe(len(group))
            self.metrics.inference_duration.observe(elapsed)
            self.metrics.forward_per_image.observe(elapsed / len(group))
        for item, answer in zip(launched.items, answers, strict=True):
            if item.role is not None and isinstance(answer, Scored) and answer.labels:
                self._count(item, (answer.labels[0], answer.scores[0]))
        return answers  # type: ignore[return-value]

    def _count(self, item: Pending, top1: tuple[str, float]) -> None:
        """A task with a rollout: the evidence of one answer (or of one shadow scoring, against its live answer)."""
        if item.role != "shadow":
            self.evidence.answer(item.handle, item.role, top1[1])
            if item.pair is not None:
                item.pair.live = top1
        elif item.pair.live is not None:  # (the live answer failed: nothing to compare)
            self.evidence.compare(item.handle, item.pair.live, top1)

    def shadow_wait_s(self) -> float:
        """Seconds until waiting shadow rows (rollouts.py) should run (0: now, inf: none wait)."""
        return self.router.wait_s(time.monotonic())

    def launch_shadows(self) -> Launched:
        """A forward of waiting shadow rows (their answers go to the evidence, nobody else)."""
        return self.launch(self.router.take())

    def _decode(self, items: list[Pending], answers: list[Scored | Failed]) -> None:
        """decode=engine: the batch's JPEG files -> pixels on the device, in one decoder call; a file that
        cannot be decoded gets its own 422 in `answers`."""
        rows = [i for i, item in enumerate(items) if isinstance(item.pixels, bytes)]
        if not rows:
            return
        start = time.perf_counter()
        try:
            images = self.decoder([items[i].pixels for i in rows])
        except Exception as e:  # the decoder itself broke (not a bad file): its images fail, the rest go on
            log.exception("decoding %d JPEG files failed", len(rows))
            images = [e] * len(rows)
        for i, image in zip(rows, images, strict=True):
            if isinstance(image, UndecodableJpeg):
                answers[i] = Failed(items[i].request, 422, "corrupt",
                                    f"cannot decode this JPEG image (truncated or corrupt): {image}")
            elif isinstance(image, Exception):
                answers[i] = Failed(items[i].request, 500, "inference_failed",
                                    f"decoding: {type(image).__name__}: {image}")
            else:
                items[i].pixels = image
        self.metrics.decode_per_image.observe((time.perf_counter() - start) / len(rows))

    def _forward(self, items: list[Pending]) -> Forward:
        """One forward for items of one prompt bank, then each row scored over its own class texts (a task's,
        or a caller's label set), or its embedding; the results start on their way to the host."""
        bank = items[0].slot.bank
        with torch.inference_mode():
            if all(isinstance(item.pixels, np.ndarray) for item in items):
                pixels = self.normalize.stack([item.pixels for item in items])  # copies out of the slots
            else:  # some were decoded on the device: the others cross to it in one copy
                pixels = torch.empty(len(items), *items[0].pixels.shape, dtype=torch.uint8, device=self.backbone.device)
                host = [row for row, item in enumerate(items) if isinstance(item.pixels, np.ndarray)]
                if host:
                    pixels[index(host, pixels.device)] = self.normalize.stack([items[row].pixels for row in host])
                for row, item in enumerate(items):
                    if isinstance(item.pixels, Tensor):
                        pixels[row] = item.pixels
            prompts = None if bank is None else bank.tensor[index([i.slot.index for i in items], bank.tensor.device)]
            features = self.tower(self.normalize(pixels), prompts).to(self.backbone.device)
            forward = Forward(items)
            embedded = [row for row, item in enumerate(items) if item.text is None]
            if embedded:
                forward.embedded.append((embedded, to_host(features[index(embedded, features.device)].float())))
            scored = [row for row, item in enumerate(items) if item.text is not None]
            if scored:
                scores, labels = self._top(features[index(scored, features.device)], [items[r] for r in scored])
                forward.scored.append((scored, to_host(scores), to_host(labels)))
            if features.device.type == "cuda":
                forward.copied = torch.cuda.Event()
                forward.copied.record()
        return forward

    def _top(self, features: Tensor, items: list[Pending]) -> tuple[Tensor, Tensor]:
        """Each row's top-k probabilities and class indices over its own class texts (its task's, or its caller's
        labels): one product when every row has the same texts, else one batched product over the texts padded
        to the most classes, whatever the number of tasks in the batch (the padding scores -inf: it comes last
        and takes no probability)."""
        texts = {id(item.text): item.text for item in items}
        k = max(min(item.top_k, len(item.classes)) for item in items)
        # calibrated: logit_scale * cos / the task's temperature (mmap_model.calibration), for caller labels too
        temperatures = {item.handle.temperature for item in items}
        if len(temperatures) == 1:
            scale: float | Tensor = self.logit_scale / temperatures.pop()
        else:
            scale = torch.tensor([self.logit_scale / item.handle.temperature for item in items]).to(
                features.device, non_blocking=True).unsqueeze(-1)
        if len(texts) == 1:
            logits = scale * features @ items[0].text.T  # (as before temperatures: the same bits at 1)
        else:
            group = {key: g for g, key in enumerate(texts)}
            padded = pad_sequence(list(texts.values()), batch_first=True)  # [G, C_max, D]
            sizes = index([len(t) for t in texts.values()], features.device)
            which = index([group[id(item.text)] for item in items], features.device)
            logits = scale * torch.bmm(padded[which], features.unsqueeze(-1)).squeeze(-1)
            padding = torch.arange(padded.shape[1], device=features.device) >= sizes[which].unsqueeze(-1)
            logits = logits.masked_fill(padding, float("-inf"))
        labels = logits.topk(k).indices
        return logits.softmax(dim=-1).gather(1, labels), labels

    def warm_up(self) -> None:
        """One forward per prompt bank (and one unprompted), off the metrics: first-call costs go here."""
        height, width = self.backbone.preprocess_cfg["size"]
        pixels = torch.zeros(1, height, width, 3, dtype=torch.uint8)
        with torch.inference_mode():
            for bank in [None, *self.registry.banks]:
                self.tower(self.normalize(pixels), None if bank is None else bank.tensor[:1])

    def reclaim(self, in_use: Iterable[Pending]) -> None:
        """Let the registry reuse the bank rows that no request in `in_use` (all that are queued or on the device)
        can read any more."""
        oldest = min((item.serial for item in itertools.chain(in_use, self.router.shadows)),
                     default=self.registry.snapshot.serial)
        self.registry.reclaim(oldest)

    # ---- start-up and the watcher: the same for the engine process and the Ray engine deployment ----

    def finish_start_up(self, error: BaseException | None = None) -> bool:
        """After the start-up scan (`registry.scan`, which raised `error` if it failed): warm up and turn ready,
        True; or record why not (/readyz says it; the process stays up for inspection), False."""
        try:
            if error is not None:
                raise error
            self.warm_up()
        except Exception as e:
            log.exception("start-up failed")
            self.failure = f"{type(e).__name__}: {e}"
            return False
        self.ready = True
        snapshot = self.registry.snapshot
        log.info("ready: %d tasks from %d prompt sets", len(snapshot.tasks), len(snapshot.sets))
        return True

    def poll_prompts(self) -> float:
        """Abort the shadows that disagree too much, apply what settled in the prompt directory; when
        (time.monotonic()) the next poll is due."""
        self.operations.check_rollouts()
        now = time.monotonic()
        return min(now + self.settings.watch_interval_s, self.registry.poll(now) or float("inf"))

    # ---- what is served ----

    def not_ready_reason(self) -> str | None:
        """None when ready: prompt sets loaded, warm-up done, at least one task served."""
        if self.failure:
            return f"start-up failed: {self.failure}"
        if not self.ready:
            progress = self.registry.progress
            if progress is not None:
                return f"loading prompt sets: {progress[0]:,} of {progress[1]:,}"
            return "loading prompt sets and warming up"
        if not self.registry.snapshot.tasks:
            failed = [s.name for s in self.registry.status() if s.state == "failed"]
            return f"no prompt set loaded from {self.settings.prompts}" + (
                f"; failed: {', '.join(failed)} (see the log or /admin/promptsets)" if failed else "")
        return None
