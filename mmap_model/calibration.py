"""Calibrated scores: temperature scaling, its fit, and the measures of calibration (docs/method.md, "Calibrated
scores and abstention").

A task's calibrated probabilities are softmax(logit_scale · cos / T) with the task's temperature T (one scalar,
fitted on the task's validation split by minimising the negative log-likelihood). Dividing every logit by the
same T > 0 keeps their order, so the top-1 class, and with it the accuracy, never changes; only the confidences
move. The service and training both score through `calibrated_logits`.

Measures: NLL (mean cross-entropy), ECE (expected calibration error: 15 equal-width bins over the top-1
confidence, |accuracy - mean confidence| of each bin weighted by its share of the images) and the reliability
bins behind the diagram. `min_score_for_precision` picks an abstention threshold for a target precision.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

ECE_BINS = 15
# Fitted temperatures are searched in this range (log-spaced); beyond it a task's scores carry no usable signal
# (T -> infinity: uniform) or are all but one-hot (T -> 0).
TEMPERATURE_RANGE = (0.01, 100.0)


def check_temperature(value: object) -> float:
    """`value` as a temperature (a finite number > 0); ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {value!r}")
    return float(value)


def check_min_score(value: object) -> float | None:
    """`value` as an abstention threshold (None, or a number in [0, 1]); ValueError otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"min_score must be null or a number in [0, 1], got {value!r}")
    return float(value)


def calibrated_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """`logits` / `temperature` (the same tensor when the temperature is 1: sets without one score as before)."""
    return logits if temperature == 1.0 else logits / temperature


def calibrated_probabilities(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """softmax(logits / temperature) over the last dimension."""
    return torch.softmax(calibrated_logits(logits.float(), temperature), dim=-1)


def nll(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits / temperature)."""
    return float(F.cross_entropy(calibrated_logits(logits.double(), temperature), labels))


def fit_temperature(logits: Tensor, labels: Tensor, tol: float = 1e-6) -> float:
    """The temperature minimising the NLL of `labels` under softmax(logits / T), in TEMPERATURE_RANGE.

    The NLL is convex in 1/T, hence unimodal in log T: a golden-section search on log T finds the minimum
    deterministically (no optimiser state, no learning rate), in float64."""
    if len(labels) == 0:
        raise ValueError("fitting a temperature needs at least one labelled image")
    z, y = logits.detach().double().cpu(), labels.cpu()

    def loss(log_t: float) -> float:
        return float(F.cross_entropy(z / math.exp(log_t), y))

    lo, hi = math.log(TEMPERATURE_RANGE[0]), math.log(TEMPERATURE_RANGE[1])
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = loss(a), loss(b)
    while hi - lo > tol:
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = loss(b)
    return math.exp((lo + hi) / 2)


def top1(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """(top-1 confidence [N], whether the top-1 class is right [N]) under the temperature."""
    conf, pred = calibrated_probabilities(logits, temperature).max(dim=-1)
    return conf, pred == labels


def reliability_bins(confidence: Tensor, correct: Tensor, bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Equal-width bins over (0, 1] of the top-1 confidence (bin i holds (i/bins, (i+1)/bins]; a confidence of 0
    goes to the first): per bin its image count, mean confidence and accuracy (0 where empty)."""
    conf = confidence.double().flatten()
    hit = correct.double().flatten()
    index = (torch.ceil(conf * bins).long() - 1).clamp(0, bins - 1)
    count = torch.bincount(index, minlength=bins).double()
    conf_sum = torch.bincount(index, weights=conf, minlength=bins)
    hit_sum = torch.bincount(index, weights=hit, minlength=bins)
    safe = count.clamp(min=1)
    return [{"count": int(n), "confidence": float(c), "accuracy": float(a)}
            for n, c, a in zip(count, conf_sum / safe, hit_sum / safe, strict=True)]


def expected_calibration_error(confidence: Tensor, correct: Tensor, bins: int = ECE_BINS) -> float:
    """ECE: the sum over `reliability_bins` of |accuracy - confidence| weighted by the bin's share of images."""
    rows = reliability_bins(confidence, correct, bins)
    total = sum(r["count"] for r in rows)
    if total == 0:
        return 0.0
    return sum(r["count"] * abs(r["accuracy"] - r["confidence"]) for r in rows) / total


def min_score_for_precision(confidence: Tensor, correct: Tensor, target: float) -> float | None:
    """The smallest threshold t (images answered when their top-1 confidence >= t) whose precision over the
    answered images is >= `target`; None when no threshold reaches it (not even answering only the surest)."""
    if not 0 < target <= 1:
        raise ValueError(f"target precision must be in (0, 1], got {target}")
    conf = confidence.double().flatten()
    order = torch.argsort(conf, descending=True, stable=True)
    conf, hit = conf[order], correct.double().flatten()[order]
    precision = torch.cumsum(hit, 0) / torch.arange(1, len(hit) + 1, dtype=torch.float64)
    # A threshold answers every image at or above it, so only the last of a run of equal confidences is a cut.
    last_of_value = torch.ones(len(conf), dtype=torch.bool)
    last_of_value[:-1] = conf[:-1] != conf[1:]
    ok = (precision >= target) & last_of_value
    if not bool(ok.any()):
        return None
    return float(conf[int(torch.nonzero(ok).max())])
