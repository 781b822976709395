"""Calibrated scores (docs/method.md, "Calibrated scores and abstention"): what users threshold on.

A temperature never changes which class wins; ECE is the textbook 15-bin measure; the fitted temperature is the
one that generated the labels; a target precision gives the smallest threshold that reaches it.
"""

from __future__ import annotations

import math

import pytest
import torch

from mmap_model import PromptConfig, PromptSet, TaskSpec, calibrated_logits, calibrated_probabilities
from mmap_model.calibration import (
    expected_calibration_error,
    fit_temperature,
    min_score_for_precision,
    reliability_bins,
)
from training.calibrate import Scores, fit_tasks, measure
from training.classifiers import PromptClassifier, TaskText

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_temperature_cannot_change_the_top_class_of_the_real_model(embedded):
    """Real scores of the embedded backbone with a trained-shape prompt set: the argmax, hence the accuracy, is the
    same at every temperature, while the confidences move."""
    torch.manual_seed(0)
    tasks = {"sketch": TaskSpec(["apple", "pear", "dog", "car", "tree"], "a sketch of a {}.")}
    ps = PromptSet.create("t", embedded, PromptConfig(), tasks)
    classifier = PromptClassifier(embedded, {"sketch": TaskText(tasks["sketch"].classnames, "a sketch of a {}.")},
                                  ps.prompts)
    images = torch.rand(16, 3, embedded.image_size, embedded.image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = classifier.scorer("sketch")(images)
    labels = torch.arange(16) % 5
    top = logits.argmax(-1)
    for t in (0.01, 0.3, 1.0, 2.5, 100.0):
        probs = calibrated_probabilities(logits, t)
        assert torch.equal(probs.argmax(-1), top)
        assert torch.equal(calibrated_logits(logits, t).argmax(-1), top)
        m = measure(Scores(logits, labels), t)
        assert m["accuracy_calibrated"] == m["accuracy"] == float((top == labels).double().mean())
    assert calibrated_logits(logits, 1.0) is logits  # a set without a temperature scores exactly as before
    sharper = calibrated_probabilities(logits, 0.3).max(-1).values
    assert bool((sharper > torch.softmax(logits, -1).max(-1).values).all())


def test_ece_on_a_hand_example():
    # 15 bins of width 1/15: 0.95 -> bin 14 (2 images, 1 right), 0.55 -> bin 8 (2 right), 0.25 -> bin 3 (1 wrong)
    conf = torch.tensor([0.95, 0.95, 0.55, 0.55, 0.25], dtype=torch.float64)
    correct = torch.tensor([True, False, True, True, False])
    expected = (2 * abs(0.5 - 0.95) + 2 * abs(1.0 - 0.55) + 1 * abs(0.0 - 0.25)) / 5
    assert expected_calibration_error(conf, correct) == pytest.approx(expected, abs=1e-12)
    bins = reliability_bins(conf, correct)
    assert [i for i, b in enumerate(bins) if b["count"]] == [3, 8, 14]
    assert bins[14] == {"count": 2, "confidence": pytest.approx(0.95), "accuracy": 0.5}
    assert expected_calibration_error(torch.tensor([1.0, 1.0]), torch.tensor([True, True])) == 0.0


def test_fitting_recovers_a_known_temperature():
    g = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(6000, 10, generator=g)
    labels = torch.multinomial(torch.softmax(logits / 2.5, -1), 1, generator=g).squeeze(1)
    fitted = fit_temperature(logits, labels)
    assert fitted == pytest.approx(2.5, rel=0.05)
    assert fit_temperature(logits, labels) == fitted  # deterministic
    # ... and it is the minimum of the NLL: a bit either way is worse
    nll = [torch.nn.functional.cross_entropy(logits.double() / t, labels) for t in (fitted * 0.9, fitted, fitted * 1.1)]
    assert nll[1] < nll[0] and nll[1] < nll[2]
    before = expected_calibration_error(*_top1(logits, labels, 1.0))
    after = expected_calibration_error(*_top1(logits, labels, fitted))
    assert after < before / 3


def _top1(logits, labels, t):
    conf, pred = calibrated_probabilities(logits, t).max(-1)
    return conf, pred == labels


def test_min_score_is_the_smallest_threshold_reaching_the_precision():
    conf = torch.tensor([0.99, 0.9, 0.8, 0.7, 0.6, 0.5])
    correct = torch.tensor([True, True, False, True, True, False])
    # answering >= 0.6: 4 right of 5 = 0.8; >= 0.9: 2 of 2; >= 0.7: 3 of 4 = 0.75
    assert min_score_for_precision(conf, correct, 0.8) == pytest.approx(0.6)
    assert min_score_for_precision(conf, correct, 0.9) == pytest.approx(0.9)
    assert min_score_for_precision(conf, correct, 0.6) == pytest.approx(0.5)
    assert min_score_for_precision(conf, torch.zeros(6, dtype=torch.bool), 0.5) is None
    # ties: a threshold answers every image at its value, so 0.7 (one right, one wrong) is no cut for precision 1
    tied = min_score_for_precision(torch.tensor([0.9, 0.7, 0.7]), torch.tensor([True, True, False]), 1.0)
    assert tied == pytest.approx(0.9)


def test_fit_tasks_stores_temperature_and_threshold():
    g = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(2000, 5, generator=g)
    labels = torch.multinomial(torch.softmax(logits / 0.5, -1), 1, generator=g).squeeze(1)
    fitted = fit_tasks({"a": Scores(logits, labels)}, target_precision=0.95)["a"]
    assert fitted["temperature"] == pytest.approx(0.5, rel=0.05) and fitted["val_images"] == 2000
    conf, hit = _top1(logits, labels, fitted["temperature"])
    answered = conf >= fitted["min_score"]
    assert hit[answered].double().mean() >= 0.95
    assert math.isfinite(fitted["min_score"]) and 0 <= fitted["min_score"] <= 1
