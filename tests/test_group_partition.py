"""Partition search of the task grouping: exhaustive and greedy, automatic and fixed K, the files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from training import partition
from training.affinity import Grouping, rank_agreement
from training.group import read_groups, write_grouping
from training.partition import best_partition, partition_score, set_partitions

BELL = [1, 1, 2, 5, 15, 52, 203, 877, 4140, 21147, 115975]


def planted(sizes: list[int], within: float = 0.6, across: float = 0.2, noise: float = 0.05,
            seed: int = 0) -> np.ndarray:
    """A symmetric affinity with high values inside blocks of the given sizes, plus noise."""
    labels = np.repeat(np.arange(len(sizes)), sizes)
    rng = np.random.default_rng(seed)
    a = np.where(labels[:, None] == labels[None, :], within, across) + rng.normal(0, noise, (len(labels),) * 2)
    a = (a + a.T) / 2
    np.fill_diagonal(a, 1.0)
    return a


def as_sets(groups: list[list[int]]) -> set[frozenset[int]]:
    return {frozenset(g) for g in groups}


@pytest.mark.parametrize("n", range(1, 11))
def test_set_partitions_enumerates_each_partition_once(n):
    rgs = set_partitions(n)
    assert len(rgs) == BELL[n]
    canonical = {tuple(np.unique(r, return_inverse=True)[1]) for r in rgs}
    assert len(canonical) == BELL[n]  # no partition twice under relabelling


def test_auto_recovers_planted_families():
    a = planted([2, 2, 3])
    groups, score, tau, ranking = best_partition(a)
    assert as_sets(groups) == {frozenset({0, 1}), frozenset({2, 3}), frozenset({4, 5, 6})}
    assert tau == pytest.approx(a[~np.eye(7, dtype=bool)].mean())
    assert score == ranking[0][1] and all(score >= s for _, s in ranking)
    assert score == pytest.approx(partition_score(a, np.array([0, 0, 1, 1, 2, 2, 2]), tau)[0])


def test_plain_sum_of_positive_affinities_prefers_one_group():
    """Why the threshold exists: with τ = 0 and all affinities positive, one big group wins."""
    groups, _, _, _ = best_partition(planted([2, 2, 3]), threshold=0.0)
    assert len(groups) == 1


def test_fixed_number_of_groups():
    a = planted([2, 2, 3])
    for k in (1, 2, 3, 5, 7):
        groups, *_ = best_partition(a, groups=k)
        assert len(groups) == k
    two, *_ = best_partition(a, groups=2)
    assert frozenset({4, 5, 6}) in as_sets(two)  # the strongest family stays together
    with pytest.raises(ValueError, match="cannot split"):
        best_partition(a, groups=8)


def test_absolute_threshold_keeps_unrelated_tasks_apart():
    """τ = mean is relative (noise decides among equally related tasks); a number is absolute."""
    a = planted([1, 1, 1, 1], within=1.0, across=0.1, noise=0.02)
    groups, *_ = best_partition(a, threshold=0.3)
    assert len(groups) == 4
    groups, *_ = best_partition(a, threshold=0.0)
    assert len(groups) == 1


@pytest.mark.parametrize("k", [None, 4])
def test_greedy_beyond_ten_tasks_recovers_blocks(k):
    a = planted([3, 4, 2, 3], noise=0.05, seed=1)
    groups, score, tau, _ = best_partition(a, groups=k)
    assert as_sets(groups) == {frozenset(range(0, 3)), frozenset(range(3, 7)), frozenset(range(7, 9)),
                               frozenset(range(9, 12))}


def test_greedy_matches_exhaustive_on_ten_tasks(monkeypatch):
    a = planted([3, 3, 4], noise=0.08, seed=2)
    exhaustive, score, *_ = best_partition(a)
    monkeypatch.setattr(partition, "EXHAUSTIVE_MAX_TASKS", 5)
    greedy, greedy_score, *_ = best_partition(a)
    assert greedy_score <= score + 1e-12
    assert as_sets(greedy) == as_sets(exhaustive)


def test_files_round_trip(tmp_path):
    tasks = ["sketch", "quickdraw", "photo"]
    a = planted([2, 1])
    grouping = Grouping(tasks, a.tolist(), [["sketch", "quickdraw"], ["photo"]], 0.4, 0.3,
                        settings={"affinity": "cosine"})
    json_path, png = write_grouping(grouping, tmp_path / "g" / "groups.json")
    data = json.loads(json_path.read_text())
    assert data["tasks"] == tasks and np.allclose(data["affinity"], a) and data["groups"] == grouping.groups
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    assert read_groups(json_path, tasks) == grouping.groups
    assert read_groups(json_path, ["photo", "sketch"]) == [["sketch"], ["photo"]]  # restricted to trained tasks
    (tmp_path / "bad.json").write_text(json.dumps({"groups": [["a"], ["a", "b"]]}))
    with pytest.raises(ValueError, match="more than one group"):
        read_groups(tmp_path / "bad.json", ["a", "b"])


def test_rank_agreement_compares_symmetrised_pairs():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 5))
    sym = (a + a.T) / 2
    assert rank_agreement(a, sym) == pytest.approx(1.0)  # symmetrising first: a and its symmetric part agree
    assert rank_agreement(a, -a.T) == pytest.approx(-1.0)
    assert rank_agreement(a, sym + 100 * np.eye(5)) == pytest.approx(1.0)  # the diagonal is not a pair
    monotone = np.exp(3 * sym)  # ranks, not values
    assert rank_agreement(sym, monotone) == pytest.approx(1.0)
    assert rank_agreement(a[:2, :2], a[:2, :2]) is None  # one pair: nothing to rank
