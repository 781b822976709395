"""The non-prompt baselines: full fine-tuning trains a private image tower, the linear probe learns."""

from __future__ import annotations

import pytest
import torch

from mmap_model import count_parameters
from mmap_model.backbone import fingerprint
from training.baselines import FineTuneClassifier, fit_linear_probe
from training.classifiers import MultiTaskObjective, PromptClassifier, TaskText, accuracy
from training.data import SplitConfig, discover_tasks, load_splits, prepare_synthetic
from training.trainer import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is 3-7x faster on 2 shared cores


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny):
    root = prepare_synthetic(tmp_path_factory.mktemp("syn"), 6, domains=["clipart", "photo"])
    tasks = discover_tasks(root, split=SplitConfig(test_fraction=0.34, val_fraction=0.17))
    return tasks, load_splits(tasks, tiny.preprocess)


def _texts(tasks) -> dict[str, TaskText]:
    return {t.name: TaskText(t.classnames, t.template) for t in tasks}


def test_full_finetuning_trains_a_private_copy(data, tiny):
    tasks, sets = data
    before = fingerprint(tiny.model)
    clf = FineTuneClassifier(tiny, _texts(tasks))
    assert clf.trainable_parameters() == count_parameters(tiny.model.visual)
    start = {k: v.clone() for k, v in clf.visual.state_dict().items()}
    zero_shot = PromptClassifier(tiny, _texts(tasks))
    with torch.no_grad():  # untrained, it is exactly zero-shot CLIP
        x, _ = sets["test"]["photo"].batch(range(4))
        assert torch.allclose(clf.scorer("photo")(x), zero_shot.scorer("photo")(x), atol=1e-4)
    Trainer(MultiTaskObjective(clf), sets["train"], TrainConfig(steps=2, batch_size=8, lr=1e-3), progress=False).fit()
    assert fingerprint(tiny.model) == before  # the shared backbone is untouched
    assert any(not torch.equal(start[k], v) for k, v in clf.visual.state_dict().items())


def test_linear_probe_learns_far_above_chance(data, tiny):
    tasks, sets = data
    clf, info = fit_linear_probe(tiny, _texts(tasks), sets["train"], sets["val"], max_iter=100)
    acc = accuracy(clf, sets["test"])
    chance = 1 / len(tasks[0].classnames)
    assert min(acc.values()) > 3 * chance, acc  # random-weight features still separate colour and shape
    assert set(info["tasks"]) == {"clipart", "photo"} and all(v["weight_decay"] > 0 for v in info["tasks"].values())
    assert clf.trainable_parameters() == sum(len(t.classnames) * (tiny.widths.embed_dim + 1) for t in tasks)
