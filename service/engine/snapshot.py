"""What the engine serves at one instant: an immutable snapshot of task handles, and the banks of visual prompts
they point into (registry.py publishes them; docs/architecture.md, "Many tasks")."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmap_model.promptset import publication_key


class PromptBank:
    """The visual prompts of every loaded task of one shape [J, m, d_v]: rows of one tensor on the model's device.

    A row is written before any handle naming it is published, and handed out again only after every request
    that could read it is done (`Registry.reclaim`), so a batch never reads a torn or reused row. The tensor
    grows by doubling: a bigger copy is made and assigned in one step; a batch that took the old tensor reads
    its rows as they were."""

    def __init__(self, shape: tuple[int, ...], device: torch.device):
        self.shape = shape
        self.tensor = torch.zeros(16, *shape, device=device)
        self._used = 0
        self._free: list[int] = []

    @property
    def signature(self) -> tuple[int, int]:
        return self.shape[0], self.shape[1]

    @property
    def rows(self) -> int:
        """Rows holding prompts (in use or waiting to be reclaimed)."""
        return self._used - len(self._free)

    def add(self, prompts: Tensor) -> int:
        if self._free:
            row = self._free.pop()
        else:
            if self._used == self.tensor.shape[0]:
                grown = torch.zeros(2 * self._used, *self.shape, device=self.tensor.device)
                grown[:self._used] = self.tensor
                self.tensor = grown
            row, self._used = self._used, self._used + 1
        self.tensor[row] = prompts
        return row

    def release(self, rows: Iterable[int]) -> None:
        self._free.extend(rows)


@dataclass(frozen=True)
class PromptSlot:
    """Where a task's visual prompts sit: row `index` of a bank (bank None: the image tower unprompted)."""

    bank: PromptBank | None
    index: int


@dataclass(frozen=True)
class TaskHandle:
    """Everything needed to serve one task, computed at load time."""

    task: str
    prompt_set: str
    version: str
    method: str
    group: str | None
    classnames: tuple[str, ...]
    template: str
    text_prompts: Tensor | None  # the task's learned text prompts on the model's device (for caller labels)
    text_features: Tensor  # [C, D], normalised, fp32 on the model's device (scores are computed there)
    slot: PromptSlot  # its visual prompts
    sample_dir: Path
    samples: tuple[str, ...]  # file names in sample_dir
    card: Mapping[str, Any]  # `evaluation` and `trained`: PromptSet.card
    temperature: float = 1.0  # its scores are softmax(logit_scale * cos / temperature) (mmap_model.calibration)
    min_score: float | None = None  # its default abstention threshold

    @property
    def visual_prompts(self) -> Tensor | None:
        """[J, m, d_v] (a view of its bank row), None when the image tower is not prompted."""
        return None if self.slot.bank is None else self.slot.bank.tensor[self.slot.index]

    @property
    def signature(self) -> tuple[int, int] | None:
        """(J, m): tasks with equal signatures share one image-tower forward."""
        return None if self.slot.bank is None else self.slot.bank.signature


@dataclass(frozen=True)
class LoadedSet:
    name: str
    version: str
    method: str
    loaded_at: float  # unix time
    published_ns: int  # mtime of its promptset.json: the newest publication of a task serves it
    handles: Mapping[str, TaskHandle]  # every task it defines, served or shadowed by a newer set

    @property
    def precedence(self) -> tuple[int, str]:
        return publication_key(self.published_ns, self.name)


@dataclass(frozen=True)
class Snapshot:
    """What is served at one instant; never mutated, replaced whole."""

    sets: Mapping[str, LoadedSet] = field(default_factory=dict)
    tasks: Mapping[str, TaskHandle] = field(default_factory=dict)
    serial: int = 0  # 1, 2, 3, ... in the order published: tells two snapshots apart (an id() can be reused)
    rollouts: Mapping[str, Any] = field(default_factory=dict)  # task -> rollouts.ActiveRollout, tasks with a record
