"""A batch on its way through the engine: the requests waiting for it (`Pending`), its forwards queued on the
device (`Forward`) and the launched batch (`Launched`) that `InferenceCore.finish` answers."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from service.transport import Embedded, Failed, Scored

from .snapshot import PromptSlot, TaskHandle


@dataclass
class ShadowPair:
    """A request scored by both versions of a task in a shadow rollout (rollouts.py): the candidate, and the live
    top-1 once the live answer is made."""

    candidate: TaskHandle
    live: tuple[str, float] | None = None


@dataclass
class Pending:
    """One image waiting for its batch."""

    request: int  # the id its answer carries
    # [H, W, 3] uint8: a view of a worker's slot (copied when the batch is built), or (decode=engine) the JPEG
    # upload itself, replaced by its decoded pixels on the device when the batch is built
    pixels: np.ndarray | bytes | Tensor
    handle: TaskHandle | None  # of the snapshot the request arrived in: a swap never breaks it (None: no task)
    slot: PromptSlot
    top_k: int
    classes: tuple[str, ...] = ()  # what it is scored against: the task's classes or the caller's labels
    text: Tensor | None = None  # their text features [C, D]; None: answer the embedding instead
    arrived: float = 0.0  # time.monotonic()
    expires: float = 0.0  # time.monotonic() past which nobody waits for the answer; 0 = request_timeout_s after arrival
    client: Any = None  # who to answer (the engine loop's business)
    serial: int = 0  # of the snapshot it arrived in: the bank rows it reads stay its own until it is answered
    role: str | None = None  # a task with a rollout: "live", "canary" or "shadow" (rollouts.py); else None
    pair: ShadowPair | None = None  # a live request the candidate also scores, or that scoring (role "shadow")


@dataclass
class LabelsNeeded:
    """A request admitted but for the text features of its caller's label set, which are not cached:
    `complete_labels` computes them (together with the other sets that arrived with it) and sets `pending.text`."""

    key: tuple[str, str, str, tuple[str, ...]]  # (prompt set, version, task, class names)
    pending: Pending


def index(rows: list[int], device: torch.device) -> Tensor:
    """Row numbers as an index tensor on `device`, without waiting for the device (`torch.tensor(rows,
    device=cuda)` would copy synchronously: it waits for every batch already queued)."""
    return torch.tensor(rows).to(device, non_blocking=True)


def to_host(tensor: Tensor) -> Tensor:
    """A device tensor's copy on the host, on its way without blocking (pinned memory) on CUDA."""
    if tensor.device.type != "cuda":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


@dataclass
class Forward:
    """One prompt bank's forward, queued: its results' host copies, complete once `copied` has happened."""

    items: list[Pending]
    scored: list[tuple[list[int], Tensor, Tensor]] = dataclasses.field(default_factory=list)  # rows, top-k, labels
    embedded: list[tuple[list[int], Tensor]] = dataclasses.field(default_factory=list)  # rows, embeddings
    copied: torch.cuda.Event | None = None  # on CUDA

    def answers(self) -> list[Scored | Embedded]:
        if self.copied is not None:
            self.copied.synchronize()
        answers: list[Scored | Embedded] = [None] * len(self.items)  # type: ignore[list-item]
        for rows, scores, labels in self.scored:
            for row, row_scores, row_labels in zip(rows, scores.tolist(), labels.tolist(), strict=True):
                item = self.items[row]
                n = min(item.top_k, len(item.classes))
                h = item.handle
                answers[row] = Scored(item.request, h.task, h.version, h.prompt_set, h.method,
                                      [item.classes[i] for i in row_labels[:n]], row_scores[:n])
        for rows, vectors in self.embedded:
            for row, vector in zip(rows, vectors.numpy().astype("<f4"), strict=True):
                h = self.items[row].handle
                answers[row] = Embedded(self.items[row].request, h.task if h else "", h.version if h else "",
                                        h.prompt_set if h else "", vector.tobytes())
        return answers


@dataclass
class Launched:
    """A batch whose work is queued on the device (`InferenceCore.launch`); `InferenceCore.finish` answers it."""

    items: list[Pending]
    answers: list[Scored | Embedded | Failed | None]  # decoding failures already in
    # per prompt bank: its rows, its queued forward (or why it failed), the seconds its launch took
    groups: list[tuple[list[int], Forward | Exception, float]] = dataclasses.field(default_factory=list)
