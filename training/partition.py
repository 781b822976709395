"""The partition step of the task grouping (docs/method.md): maximise
S(P) = sum over groups of sum over pairs i<j in the group of (A_ij - tau). Singletons score 0, so a pair joins a
group only if its affinity beats tau (default: the mean off-diagonal affinity); with a group count K the same
score is maximised over partitions with exactly K groups. Exhaustive over all set partitions for T <= 10
(Bell(10) = 115,975, vectorised), greedy agglomeration plus single-task moves beyond that."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

EXHAUSTIVE_MAX_TASKS = 10


# ---------------------------------------------------------------------------------------------
# Partition search
# ---------------------------------------------------------------------------------------------


def set_partitions(n: int) -> np.ndarray:
    """All partitions of n items as restricted growth strings [Bell(n), n] (labels 0..k-1)."""
    rgs = np.zeros((1, min(n, 1)), dtype=np.int8)
    for _ in range(1, n):
        branches = rgs.max(axis=1).astype(np.int64) + 2  # reuse any label, or open a new one
        parent = np.repeat(np.arange(len(rgs)), branches)
        label = np.arange(len(parent)) - np.repeat(np.cumsum(branches) - branches, branches)
        rgs = np.concatenate([rgs[parent], label[:, None].astype(np.int8)], axis=1)
    return rgs


def resolve_threshold(affinity: np.ndarray, threshold: float | str) -> float:
    sym = (affinity + affinity.T) / 2
    off = sym[~np.eye(len(sym), dtype=bool)]
    if isinstance(threshold, str):
        if not off.size:
            return 0.0
        return float(np.mean(off) if threshold == "mean" else np.median(off))
    return float(threshold)


def partition_score(affinity: np.ndarray, labels: np.ndarray, tau: float) -> np.ndarray:
    """S for each labelling row [N, T]: Σ over within-group pairs of (A_ij - τ)."""
    m = (affinity + affinity.T) / 2 - tau
    np.fill_diagonal(m, 0.0)
    labels = np.atleast_2d(labels)
    scores = np.empty(len(labels))
    for start in range(0, len(labels), 20000):  # bounded memory: chunk of [20000, T, T] booleans
        chunk = labels[start:start + 20000]
        same = chunk[:, :, None] == chunk[:, None, :]
        scores[start:start + 20000] = (same * m).sum(axis=(1, 2)) / 2
    return scores


def _groups_of(labels: Sequence[int]) -> list[list[int]]:
    out: dict[int, list[int]] = {}
    for i, g in enumerate(labels):
        out.setdefault(int(g), []).append(i)
    return list(out.values())


def _greedy(m: np.ndarray, k: int | None) -> np.ndarray:
    """Agglomerate by largest gain (while positive, or down to k groups), then move single tasks."""
    clusters = [[i] for i in range(len(m))]
    while len(clusters) > 1:
        gains = [(m[np.ix_(a, b)].sum(), ia, ib) for ia, a in enumerate(clusters) for ib, b in enumerate(clusters)
                 if ia < ib]
        gain, ia, ib = max(gains)
        if (k is None and gain <= 0) or (k is not None and len(clusters) <= k):
            break
        clusters[ia] = clusters[ia] + clusters[ib]
        del clusters[ib]
    labels = np.zeros(len(m), dtype=np.int64)
    for g, members in enumerate(clusters):
        labels[members] = g
    improved = True
    while improved:
        improved = False
        for i in range(len(m)):
            here = labels[i]
            if k is not None and (labels == here).sum() == 1:
                continue  # moving a singleton away would change the number of groups
            options = list(range(labels.max() + 1)) + ([labels.max() + 1] if k is None else [])
            gain = {g: m[i, (labels == g) & (np.arange(len(m)) != i)].sum() for g in options}
            best = max(gain, key=gain.get)
            if gain[best] > gain[here] + 1e-12:
                labels[i] = best
                labels = np.unique(labels, return_inverse=True)[1]
                improved = True
    return labels


def best_partition(affinity: np.ndarray, groups: int | None = None, threshold: float | str = "mean",
                   top: int = 5) -> tuple[list[list[int]], float, float, list[tuple[list[list[int]], float]]]:
    """(groups as index lists, score, τ, ranking of the best `top` partitions)."""
    affinity = np.asarray(affinity, dtype=np.float64)
    n = len(affinity)
    if groups is not None and groups > n:
        raise ValueError(f"cannot split {n} tasks into {groups} groups")
    tau = resolve_threshold(affinity, threshold)
    if n <= EXHAUSTIVE_MAX_TASKS:
        labels = set_partitions(n)
        if groups is not None:
            labels = labels[labels.max(axis=1) + 1 == groups]
        scores = partition_score(affinity, labels, tau)
        order = np.argsort(-scores, kind="stable")[:top]
        ranking = [(_groups_of(labels[i]), float(scores[i])) for i in order]
        return ranking[0][0], ranking[0][1], tau, ranking
    m = (affinity + affinity.T) / 2 - tau
    np.fill_diagonal(m, 0.0)
    labels = _greedy(m, groups)
    score = float(partition_score(affinity, labels[None], tau)[0])
    return _groups_of(labels), score, tau, [(_groups_of(labels), score)]
