"""Multi-task classifiers over a CLIP backbone, and the one loss and one accuracy they all share.

Every method of the benchmark is a `TaskClassifier`: `scorer(task)` returns a function from a
batch of images of that task to logits over THAT task's classes. Prompt methods and the zero-shot
baseline are `PromptClassifier` (zero-shot = no prompts); the non-prompt baselines live in
`training.baselines`. `MultiTaskObjective` turns any of them into the training loss (the module
DDP wraps), and `accuracy` scores any of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmap_model import Backbone, MultiTaskPrompts, PromptedCLIP, count_parameters, prompt_texts

from .data import ImageSet
from .dist import DistInfo, all_reduce_sum

Scorer = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class TaskText:
    """What a task's classifier is built from: its class names and its hand-written template."""

    classnames: list[str]
    template: str


class TaskClassifier(nn.Module):
    """Base: `scorer(task)(images) -> logits [B, C_task]`."""

    tasks: dict[str, TaskText]

    def scorer(self, task: str) -> Scorer:  # pragma: no cover - interface
        raise NotImplementedError

    def trainable_parameters(self) -> int:
        return count_parameters(self, trainable_only=True)


class PromptClassifier(TaskClassifier):
    """logit_scale · cos(image, class text) with a task's prompts (none = zero-shot CLIP).

    The text of class c is "X … X <template filled with c>" whose X slots take the task's text
    prompts; the image carries the task's visual prompts. Where a modality has no prompts its
    side runs without autograd (and text features are computed once), which is what makes
    CoOp cheap on the image side and VPT cheap on the text side.
    """

    def __init__(self, backbone: Backbone, tasks: Mapping[str, TaskText], prompts: MultiTaskPrompts | None = None):
        super().__init__()
        self.tasks = dict(tasks)
        self.clip = PromptedCLIP(backbone.model)
        self.prompts = prompts
        m = {t: (prompts(t).text_tokens if prompts is not None else 0) for t in self.tasks}
        # Token ids are fixed per task: tokenise once, not every step.
        self._tokens = {t: backbone.tokenizer(prompt_texts(s.classnames, s.template, m[t]))
                        for t, s in self.tasks.items()}
        self._frozen_text: dict[str, Tensor] = {}

    def _text(self, task: str, text_prompts: Tensor | None) -> Tensor:
        device = self.clip.logit_scale.device
        if text_prompts is not None:
            return self.clip.encode_text(self._tokens[task].to(device), text_prompts, normalize=True)
        cached = self._frozen_text.get(task)
        if cached is None or cached.device != device:
            with torch.no_grad():
                cached = self._frozen_text[task] = self.clip.encode_text(self._tokens[task].to(device), normalize=True)
        return cached

    def scorer(self, task: str) -> Scorer:
        p = self.prompts(task) if self.prompts is not None else None
        text = self._text(task, p.text if p is not None else None)
        visual = p.visual if p is not None else None
        scale = self.clip.logit_scale

        def score(images: Tensor) -> Tensor:
            with nullcontext() if visual is not None else torch.no_grad():
                image = self.clip.encode_image(images, visual, normalize=True)
            return scale * image @ text.to(image.dtype).T

        return score


class MultiTaskObjective(nn.Module):
    """Sum over tasks of the cross-entropy of a task's images over that task's classes.

    forward({task: (images, labels)}) -> (loss, per-task mean loss [T], per-task correct [T]),
    tasks in the order given. One forward per step covers every task, so DDP sees one forward
    per backward.
    """

    def __init__(self, classifier: TaskClassifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, batch: Mapping[str, tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
        losses, correct = [], []
        for task, (images, labels) in batch.items():
            logits = self.classifier.scorer(task)(images).float()
            losses.append(F.cross_entropy(logits, labels))
            correct.append((logits.argmax(-1) == labels).sum())
        losses_t = torch.stack(losses)
        return losses_t.sum(), losses_t.detach(), torch.stack(correct).detach()


@torch.no_grad()
def task_metrics(classifier: TaskClassifier, sets: Mapping[str, ImageSet], batch_size: int = 256,
                 dist: DistInfo | None = None, autocast: Callable | None = None) -> dict[str, tuple[float, float]]:
    """(top-1 accuracy, mean cross-entropy) per task; under DDP each rank scores a shard and sums are summed."""
    rank, world = (dist.rank, dist.world) if dist else (0, 1)
    device = next(classifier.parameters()).device
    sums = torch.zeros(len(sets), 3, dtype=torch.float64)  # correct, summed loss, images
    for i, (task, images) in enumerate(sets.items()):
        with autocast() if autocast else nullcontext():
            score = classifier.scorer(task)
            mine = torch.arange(rank, len(images), world)
            for start in range(0, len(mine), batch_size):
                x, y = images.batch(mine[start:start + batch_size])
                logits = score(x.to(device)).float().cpu()
                sums[i, 0] += (logits.argmax(-1) == y).sum()
                sums[i, 1] += F.cross_entropy(logits, y, reduction="sum")
                sums[i, 2] += len(y)
    if world > 1:
        sums = all_reduce_sum(sums, dist)
    return {task: (c / max(n, 1), loss / max(n, 1)) for task, (c, loss, n) in zip(sets, sums.tolist(), strict=True)}


def accuracy(classifier: TaskClassifier, sets: Mapping[str, ImageSet], batch_size: int = 256,
             dist: DistInfo | None = None, autocast: Callable | None = None) -> dict[str, float]:
    """Top-1 accuracy per task (see `task_metrics`)."""
    return {task: acc for task, (acc, _) in task_metrics(classifier, sets, batch_size, dist, autocast).items()}
