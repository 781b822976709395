"""The non-prompt baselines of docs/method.md, kept apart from the prompt trainer.

- Linear probe: a logistic-regression head per task on frozen, L2-normalised image features
  (CLIP's protocol: no augmentation, full-batch L-BFGS, the L2 strength picked on the
  validation split from a grid, then refitted on the training split).
- Multi-task full fine-tuning: the whole image tower trains (a private copy; the shared
  backbone stays frozen), the classifier of each task is its frozen zero-shot text embeddings
  ("a photo of a {}." or the task's template) scaled by CLIP's logit scale. It trains with the
  same `Trainer`, loss and data as the prompt methods.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmap_model import Backbone, PromptedCLIP, class_text_features

from .classifiers import Scorer, TaskClassifier, TaskText
from .data import ImageSet

DEFAULT_WEIGHT_DECAYS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


class FineTuneClassifier(TaskClassifier):
    """A trainable copy of the image tower against each task's frozen class-text embeddings."""

    def __init__(self, backbone: Backbone, tasks: Mapping[str, TaskText]):
        super().__init__()
        self.tasks = dict(tasks)
        clip = PromptedCLIP(backbone.model)
        self.visual = copy.deepcopy(backbone.model.visual).requires_grad_(True)
        self.register_buffer("logit_scale", clip.logit_scale.detach().clone())
        with torch.no_grad():
            for t, spec in self.tasks.items():
                self.register_buffer(f"text_{t}",
                                     class_text_features(clip, backbone.tokenizer, spec.classnames, spec.template))

    def scorer(self, task: str) -> Scorer:
        text = getattr(self, f"text_{task}")

        def score(images: Tensor) -> Tensor:
            image = F.normalize(self.visual(images), dim=-1)
            return self.logit_scale * image @ text.to(image.dtype).T

        return score


class LinearProbeClassifier(TaskClassifier):
    """Frozen image features -> a linear head per task."""

    def __init__(self, backbone: Backbone, tasks: Mapping[str, TaskText]):
        super().__init__()
        self.tasks = dict(tasks)
        self.clip = PromptedCLIP(backbone.model)
        dim = backbone.widths.embed_dim
        self.heads = nn.ModuleDict({t: nn.Linear(dim, len(s.classnames)) for t, s in self.tasks.items()})
        for head in self.heads.values():
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        return self.clip.encode_image(images, normalize=True)

    def scorer(self, task: str) -> Scorer:
        return lambda images: self.heads[task](self.features(images).to(self.heads[task].weight.dtype))


@torch.no_grad()
def _features(clf: LinearProbeClassifier, images: ImageSet, batch_size: int,
              device: torch.device) -> tuple[Tensor, Tensor]:
    feats = [clf.features(images.batch(range(s, min(s + batch_size, len(images))))[0].to(device))
             for s in range(0, len(images), batch_size)]
    return torch.cat(feats).float(), images.labels.to(device)


def _fit_head(head: nn.Linear, x: Tensor, y: Tensor, weight_decay: float, max_iter: int) -> None:
    """Full-batch L-BFGS on mean cross-entropy + weight_decay/2 · ||W||² (bias not decayed)."""
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(head(x), y) + 0.5 * weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)


def fit_linear_probe(backbone: Backbone, tasks: Mapping[str, TaskText], train_sets: Mapping[str, ImageSet],
                     val_sets: Mapping[str, ImageSet], weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
                     max_iter: int = 300, batch_size: int = 256) -> tuple[LinearProbeClassifier, dict]:
    """Train the per-task heads; returns the classifier and {task: chosen weight decay, val acc, seconds}."""
    start = time.perf_counter()
    clf = LinearProbeClassifier(backbone, tasks).to(backbone.device)
    info: dict = {"tasks": {}}
    for task in tasks:
        x, y = _features(clf, train_sets[task], batch_size, backbone.device)
        head = clf.heads[task]
        best = (-1.0, weight_decays[len(weight_decays) // 2])
        if len(val_sets.get(task, [])):
            xv, yv = _features(clf, val_sets[task], batch_size, backbone.device)
            for wd in weight_decays:
                _fit_head(head, x, y, wd, max_iter)
                with torch.no_grad():
                    acc = float((head(xv).argmax(-1) == yv).float().mean())
                # ">=" prefers the stronger regulariser on ties (the grid ascends).
                if acc >= best[0]:
                    best = (acc, wd)
        _fit_head(head, x, y, best[1], max_iter)
        info["tasks"][task] = {"weight_decay": best[1], "val_acc": best[0]}
    info["seconds"] = time.perf_counter() - start
    return clf, info
