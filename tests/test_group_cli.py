"""`python -m training.group` end to end (random-weight backbone): the files and their invariants."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from training import group
from training.data import prepare_synthetic

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is 3-7x faster on 2 shared cores

TASKS = ["sketch", "photo", "clipart"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return prepare_synthetic(tmp_path_factory.mktemp("syn"), 3, domains=TASKS)


def _group(root: Path, out: Path, *extra: str) -> dict:
    group.main(["--data", str(root), "--pretrained", "none", "--threads", "1", "--shots", "1", "--batch-size", "8",
                "--warmup-steps", "2", "--probe-steps", "2", "--quiet", "--out", str(out), *extra])
    return json.loads(out.read_text())


def test_cosine_grouping_writes_json_and_heatmap(root, tmp_path):
    data = _group(root, tmp_path / "g" / "groups.json")
    a = np.array(data["affinity"])
    assert sorted(data["tasks"]) == sorted(TASKS) and a.shape == (3, 3)
    assert np.allclose(np.diag(a), 1.0, atol=1e-5) and np.allclose(a, a.T, atol=1e-6)  # cosine of a task with itself
    assert sorted(t for g in data["groups"] for t in g) == sorted(data["tasks"])  # a partition
    assert data["settings"]["affinity"] == "cosine" and data["settings"]["search"] == "exhaustive"
    assert (tmp_path / "g" / "groups.png").stat().st_size > 1000


def test_fixed_k_and_lookahead_with_the_transfer_check(root, tmp_path):
    data = _group(root, tmp_path / "k.json", "--groups", "2", "--affinity", "lookahead", "--transfer-steps", "3")
    transfer = np.array(data["transfer"])
    assert transfer.shape == (3, 3) and np.isfinite(transfer).all() and -1 <= data["agreement"] <= 1
    assert len(data["groups"]) == 2
    a = np.array(data["affinity"])
    assert np.isfinite(a).all()
    assert (np.diag(a) > 0).all(), a  # a small step down a task's own gradient lowers that task's loss


def test_every_phase_prints_labelled_progress(root, tmp_path, capsys):
    """The warm-up's epochs, the affinity probe and the partition search each say what is running."""
    group.main(["--data", str(root), "--pretrained", "none", "--threads", "1", "--shots", "1", "--batch-size", "8",
                "--warmup-steps", "2", "--probe-steps", "2", "--out", str(tmp_path / "groups.json")])
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("grouping: epoch 1/1: loss") for line in lines), lines
    assert "grouping: affinity (cosine): step 2/2" in "\n".join(lines)  # the last probe step is always shown
    assert any(line.startswith("grouping: partition: ") and "groups, score" in line for line in lines), lines
    assert not [line for line in lines if line.startswith("epoch")]  # nothing unlabelled
