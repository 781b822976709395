"""With the embedded trained backbone: brief MmAP training beats zero-shot on the domains the tiny
CLIP never saw, and the gradient-driven grouping recovers the synthetic data's planted families.

Skipped (with the reason) until `mmap_model/weights/mmap-tiny/open_clip_model.safetensors` exists.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmap_model import EMBEDDED_MODEL, EMBEDDED_PRETRAINED, PromptConfig, PromptSet, load_backbone
from mmap_model.backbone import EMBEDDED_DIR
from training import fit, synthetic
from training.affinity import group_tasks
from training.classifiers import TaskText
from training.configs import GroupingConfig
from training.data import SplitConfig, discover_tasks, load_splits, prepare_synthetic
from training.trainer import TrainConfig

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),  # tiny models: one thread is 3-7x faster on 2 shared cores
    pytest.mark.skipif(not (EMBEDDED_DIR / "open_clip_model.safetensors").is_file(),
                       reason="embedded mmap-tiny weights not trained yet (python -m training.pretrain)"),
]


def _seen_domains() -> list[str]:
    from training.pretrain import SEEN_DOMAINS

    return list(SEEN_DOMAINS)


@pytest.mark.slow
def test_mmap_beats_zero_shot_on_unseen_domains(tmp_path: Path):
    unseen = [d for d in synthetic.DOMAINS if d not in _seen_domains()]
    assert unseen, "the model card should leave some domains unseen"
    root = prepare_synthetic(tmp_path / "syn", 16, domains=unseen, seed=7)
    fit.main(["--data", str(root), "--groups", "one", "--shots", "8", "--batch-size", "16", "--steps", "40",
              "--threads", "1", "--quiet", "--out", str(tmp_path / "sets")])
    evaluation = PromptSet.load(tmp_path / "sets" / "all").evaluation
    gains = {t: evaluation["accuracy"][t] - evaluation["zero_shot"][t] for t in unseen}
    assert all(g > 0.05 for g in gains.values()), evaluation  # every unseen domain improves clearly
    assert sum(gains.values()) / len(gains) > 0.10, evaluation


@pytest.fixture(scope="module")
def grouping(tmp_path_factory):
    """The default grouping (cosine affinity, τ = mean, auto K) of all seven synthetic domains, checked
    against measured transfer (one 40-step training per domain)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = prepare_synthetic(tmp_path_factory.mktemp("syn"), 10, seed=3)
        backbone = load_backbone(EMBEDDED_MODEL, EMBEDDED_PRETRAINED)
        tasks = discover_tasks(root, split=SplitConfig(shots=8))
        sets = load_splits(tasks, backbone.preprocess, ("train",))
        texts = {t.name: TaskText(t.classnames, t.template) for t in tasks}
        return group_tasks(backbone, texts, sets["train"], PromptConfig(), TrainConfig(batch_size=16, lr=0.01),
                           GroupingConfig(transfer_steps=40), progress=False)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=(
    "measured on the embedded mmap-tiny (docs/benchmarks.md, 'Method benchmark'): gradient affinity separates "
    "the two domains zero-shot fails on (quickdraw, infograph) from those it already solves, instead of the "
    "generator's style families; cosine/lookahead, warm-up 0-80 steps and mmap/vpt/coop modules all agree. "
    "Measured one-domain transfer says the same (training on an unseen domain raises the solved domains' loss), "
    "so on this backbone the families are not transfer families. A backbone pretrained on the textured "
    "family only, with "
    "and without a more coherent flat family, did not recover them either (same section). Strict: if a backbone or "
    "setting makes the families appear, this XPASS fails and the marker must go."))
def test_grouping_recovers_the_planted_domain_families(grouping):
    found = {frozenset(g) for g in grouping.groups}
    planted = {frozenset(ds) for ds in synthetic.FAMILIES.values()}
    assert found == planted, (grouping.groups, grouping.affinity)


@pytest.mark.slow
def test_grouping_keeps_failing_domains_apart_from_solved_ones(grouping):
    """What the grouping does recover on this backbone: tasks that need the same adaptation.

    No group mixes a domain zero-shot fails on (< 50% on the model card: quickdraw, infograph)
    with one it solves (>= 90%), and the solved domains are not left as singletons.
    """
    card = json.loads((EMBEDDED_DIR / "zero_shot.json").read_text())["domain"]
    hard = {d for d, acc in card.items() if acc < 0.5}
    solved = {d for d, acc in card.items() if acc >= 0.9}
    assert len(hard) >= 2 and len(solved) >= 2
    groups = [set(g) for g in grouping.groups]
    assert not any(g & hard and g & solved for g in groups), (grouping.groups, grouping.affinity)
    assert any(len(g & solved) >= 2 for g in groups), (grouping.groups, grouping.affinity)


@pytest.mark.slow
def test_gradient_affinity_predicts_measured_transfer(grouping):
    """The grouping's premise on this backbone: the cheap gradient affinity ranks task pairs the way
    direct transfer does (train on one domain alone, watch every domain's loss). Measured 0.72."""
    transfer = np.asarray(grouping.transfer)
    assert transfer.shape == (7, 7) and np.all(np.diag(transfer) > 0.3), transfer  # each task helps itself
    assert grouping.agreement >= 0.5, (grouping.agreement, grouping.affinity, grouping.transfer)
