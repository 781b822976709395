"""The trainer: schedule, gradient accumulation, mixed precision, metrics, validation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mmap_model import MultiTaskPrompts, PromptConfig
from training.classifiers import MultiTaskObjective, PromptClassifier, TaskText
from training.data import SplitConfig, discover_tasks, load_splits, prepare_synthetic
from training.trainer import TrainConfig, Trainer, lr_lambda

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is 3-7x faster on 2 shared cores


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny):
    root = prepare_synthetic(tmp_path_factory.mktemp("syn"), 4, domains=["sketch", "painting"])
    tasks = discover_tasks(root, split=SplitConfig(shots=2))
    return {t.name: TaskText(t.classnames, t.template) for t in tasks}, load_splits(tasks, tiny.preprocess)


def _train(tiny, data, cfg: TrainConfig, **kwargs) -> dict[str, torch.Tensor]:
    texts, sets = data
    torch.manual_seed(0)
    prompts = MultiTaskPrompts(PromptConfig(), tiny.widths, list(texts), {"all": list(texts)})
    clf = PromptClassifier(tiny, texts, prompts)
    Trainer(MultiTaskObjective(clf), sets["train"], cfg, progress=False, **kwargs).fit()
    return {k: v.detach().clone() for k, v in prompts.state_dict().items()}


def test_schedule_warms_up_then_follows_a_cosine():
    total, warmup = 100, 10
    values = [lr_lambda(s, total, warmup, 0.1) for s in range(total + 1)]
    assert values[0] == pytest.approx(1 / 11) and values[9] == pytest.approx(10 / 11)
    assert all(a < b for a, b in zip(values[:10], values[1:11], strict=True))  # rising warm-up
    assert values[10] == pytest.approx(1.0) and values[100] == pytest.approx(0.1)
    assert values[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(values[10:-1], values[11:], strict=True))


def test_accumulation_equals_the_larger_batch(tiny, data):
    """accum 2 x batch 4 draws the same 8 images per step as batch 8 and averages the same loss."""
    big = _train(tiny, data, TrainConfig(steps=3, batch_size=8, lr=0.01, augment=False))
    accumulated = _train(tiny, data, TrainConfig(steps=3, batch_size=4, accum=2, lr=0.01, augment=False))
    small = _train(tiny, data, TrainConfig(steps=3, batch_size=4, lr=0.01, augment=False))
    assert max((big[k] - accumulated[k]).abs().max().item() for k in big) < 1e-5
    assert max((big[k] - small[k]).abs().max().item() for k in big) > 1e-3  # the check can fail


def test_bf16_autocast_keeps_fp32_parameters(tiny, data):
    """Autocast runs the frozen towers in bf16; parameters and updates stay fp32 and close to fp32's.

    SGD, not AdamW: its update is proportional to the gradient, so the comparison measures the
    gradient's bf16 error instead of Adam's sign-like steps on near-zero gradients.
    """
    init = _train(tiny, data, TrainConfig(steps=1, batch_size=4, lr=0.0, optimizer="sgd"))
    fp32 = _train(tiny, data, TrainConfig(steps=2, batch_size=4, lr=0.1, optimizer="sgd"))
    bf16 = _train(tiny, data, TrainConfig(steps=2, batch_size=4, lr=0.1, optimizer="sgd", amp="bf16"))
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in bf16.values())
    update = torch.cat([(fp32[k] - init[k]).flatten() for k in init])
    error = torch.cat([(bf16[k] - fp32[k]).flatten() for k in init])
    print(f"bf16 update error: {error.norm() / update.norm():.3f} of the update")
    assert update.norm() > 0 and error.norm() < 0.1 * update.norm()


def test_metrics_and_checkpoints_every_epoch(tiny, data, tmp_path):
    texts, sets = data
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.01, log_every=1)
    prompts = MultiTaskPrompts(PromptConfig(), tiny.widths, list(texts), {"all": list(texts)})
    trainer = Trainer(MultiTaskObjective(PromptClassifier(tiny, texts, prompts)), sets["train"], cfg, sets["val"],
                      tmp_path, progress=False)
    result = trainer.fit()
    assert trainer.steps_per_epoch == 5 and result.steps == 10 and result.images_per_second > 0  # 80 images / 16
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert [r["step"] for r in epochs] == [5, 10] and set(epochs[-1]["val_acc"]) == set(texts)
    assert [r["step"] for r in rows if r["kind"] == "step"] == list(range(1, 11))
    assert (sorted(p.name for p in tmp_path.glob("checkpoint-*.json"))
            == ["checkpoint-00000005.json", "checkpoint-00000010.json"])


def test_weight_decay_spares_the_kronecker_factors(tiny, data):
    """K^t and K^v start at one and scale both prompts: decay would shrink the prompts with them. With decay on,
    the trainer decays every other tensor and none of the factors: after one step (same gradients in both runs)
    the factors equal those of the same run without decay, and every source prompt is smaller."""
    cfg = dict(steps=1, batch_size=4, lr=0.05, augment=False, warmup_fraction=0.0)
    plain = _train(tiny, data, TrainConfig(**cfg))
    decayed = _train(tiny, data, TrainConfig(**cfg, weight_decay=5.0))
    factors = [k for k in plain if "kron_" in k]
    assert factors and all(torch.equal(plain[k], decayed[k]) for k in factors)
    sources = [k for k in plain if k.endswith("source")]
    assert all(decayed[k].norm() < plain[k].norm() for k in sources)  # the others are decayed


def test_factor_lr_scale_moves_only_the_factors_rate(tiny, data):
    """`--factor-lr-scale` gives the Kronecker factors their own rate: after one AdamW step (whose first update is
    about lr per entry whatever the gradient) the sources move as without it and the factors 3x as far."""
    cfg = dict(steps=1, batch_size=4, lr=0.01, augment=False, warmup_fraction=0.0)
    plain = _train(tiny, data, TrainConfig(**cfg))
    scaled = _train(tiny, data, TrainConfig(**cfg, factor_lr_scale=3.0))
    torch.manual_seed(0)
    texts, _ = data
    start = MultiTaskPrompts(PromptConfig(), tiny.widths, list(texts), {"all": list(texts)}).state_dict()
    for k in plain:
        if "kron_" in k:
            torch.testing.assert_close(scaled[k] - start[k], 3 * (plain[k] - start[k]), rtol=1e-3, atol=1e-6)
        else:
            assert torch.equal(scaled[k], plain[k])
    with pytest.raises(ValueError, match="factor_lr_scale"):
        TrainConfig(factor_lr_scale=0.0)
