"""Calibration of a trained set's scores (docs/method.md, "Calibrated scores and abstention"), as a library.

`training.fit` fits each task's temperature on its validation split (`fit_tasks`) and records the
calibration measured on the test split; `training.evaluate` measures it again for any set (`measure`).
`reliability_figure` draws the reliability diagram: a panel per task, before and after calibration.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmap_model.calibration import (
    ECE_BINS,
    expected_calibration_error,
    fit_temperature,
    min_score_for_precision,
    nll,
    reliability_bins,
    top1,
)

from .classifiers import TaskClassifier
from .data import ImageSet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scores:
    """A task's logits [N, C] on a split and the labels [N]."""

    logits: Tensor
    labels: Tensor


@torch.no_grad()
def task_scores(classifier: TaskClassifier, sets: Mapping[str, ImageSet], batch_size: int = 256,
                autocast: Callable | None = None) -> dict[str, Scores]:
    """Every image's logits per task (float32, on the CPU), in the sets' order."""
    device = next(classifier.parameters()).device
    out = {}
    for task, images in sets.items():
        chunks = []
        with autocast() if autocast else nullcontext():
            score = classifier.scorer(task)
            for start in range(0, len(images), batch_size):
                x, _ = images.batch(range(start, min(start + batch_size, len(images))))
                chunks.append(score(x.to(device)).float().cpu())
        out[task] = Scores(torch.cat(chunks) if chunks else torch.zeros(0, len(classifier.tasks[task].classnames)),
                           images.labels.clone())
    return out


def measure(scores: Scores, temperature: float, bins: int = ECE_BINS) -> dict[str, float]:
    """Accuracy, NLL and ECE before (temperature 1) and after calibration (`temperature`)."""
    conf_before, hit = top1(scores.logits, scores.labels)
    conf_after, hit_after = top1(scores.logits, scores.labels, temperature)
    return {"accuracy": float(hit.double().mean()) if len(hit) else 0.0,
            "accuracy_calibrated": float(hit_after.double().mean()) if len(hit) else 0.0,
            "nll": nll(scores.logits, scores.labels), "nll_calibrated": nll(scores.logits, scores.labels, temperature),
            "ece": expected_calibration_error(conf_before, hit, bins),
            "ece_calibrated": expected_calibration_error(conf_after, hit_after, bins)}


def fit_tasks(val: Mapping[str, Scores], target_precision: float | None = None) -> dict[str, dict[str, Any]]:
    """Per task: the temperature fitted on its validation scores and, with `target_precision`, the smallest
    `min_score` whose validation precision over the answered images reaches it (None when none does)."""
    fitted: dict[str, dict[str, Any]] = {}
    for task, s in val.items():
        if len(s.labels) == 0:
            log.warning("task %s: no validation images; its temperature stays 1", task)
            fitted[task] = {"temperature": 1.0, "min_score": None, "val_images": 0}
            continue
        temperature = round(fit_temperature(s.logits, s.labels), 4)
        entry: dict[str, Any] = {"temperature": temperature, "min_score": None, "val_images": len(s.labels)}
        if target_precision is not None:
            conf, hit = top1(s.logits, s.labels, temperature)
            min_score = min_score_for_precision(conf, hit, target_precision)
            if min_score is None:
                log.warning("task %s: no threshold reaches precision %.3f on validation; no min_score stored",
                            task, target_precision)
            entry["min_score"] = min_score  # not rounded: a rounded-up threshold would drop the image it was cut at
        fitted[task] = entry
    return fitted


def reliability_figure(panels: Mapping[str, list[tuple[Scores, float]]], path: Path, bins: int = ECE_BINS,
                       title: str = "") -> Path:
    """A PNG with one reliability diagram per task: accuracy against mean confidence in each of `bins`
    equal-width bins, before (temperature 1) and after calibration. `panels`: {task: [(scores, temperature), ...]}
    (several entries, e.g. seeds, are pooled)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(panels)
    cols = min(4, len(tasks))
    rows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    width = 1 / bins
    centres = [(i + 0.5) * width for i in range(bins)]
    for ax, task in zip(axes.flat, tasks, strict=False):
        before = [top1(s.logits, s.labels) for s, _ in panels[task]]
        after = [top1(s.logits, s.labels, t) for s, t in panels[task]]
        cb, hb = torch.cat([c for c, _ in before]), torch.cat([h for _, h in before])
        ca, ha = torch.cat([c for c, _ in after]), torch.cat([h for _, h in after])
        for conf, hit, label, colour, shift in ((cb, hb, "before", "tab:red", -0.25),
                                                (ca, ha, "after", "tab:blue", 0.25)):
            rows_ = reliability_bins(conf, hit, bins)
            ece = expected_calibration_error(conf, hit, bins)
            xs = [c + shift * width for c, r in zip(centres, rows_, strict=True) if r["count"]]
            ys = [r["accuracy"] for r in rows_ if r["count"]]
            ax.bar(xs, ys, width=width / 2, color=colour, alpha=0.7, label=f"{label}: ECE {ece:.3f}")
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"{task} ({len(cb)} images)", fontsize=10)
        ax.set_xlabel("top-1 confidence", fontsize=8)
        ax.set_ylabel("accuracy", fontsize=8)
        ax.legend(fontsize=7, loc="upper left")
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
