"""Gradient-driven task grouping (docs/method.md): affinity from a shared module, then a partition.

1. Warm-up: ONE prompt module shared by all tasks (the method's module with
   group_tokens + task_tokens tokens, so it has the capacity a grouped task will see) trains on
   all tasks for `warmup_steps` with the normal trainer.
2. Probe: for `probe_steps` further steps, every task's gradient of its own loss w.r.t. the
   shared parameters is taken on its own mini-batch.
   - cosine (default): A_ij = mean over steps of cos(g_i, g_j).
   - lookahead (TAG, Fifty et al. 2021): A_ij = mean of 1 - L_j(θ - Δ_i) / L_j(θ), the relative
     drop of task j's loss (same batch) after the step the optimiser would take for task i's
     gradient alone: Δ_i = lr · g_i / (√v̂ + ε) with AdamW's current (bias-corrected) second
     moments v̂, or lr · g_i with SGD — TAG's lookahead with the weight update frozen at this
     point. `lookahead_scale` multiplies the step (1 = the optimiser's own size). Not
     symmetric; the partition uses (A + Aᵀ)/2. It costs T² extra forwards per probe step.
   The shared module keeps training during the probe (the summed gradient, as in TAG), so the
   affinities average over a short stretch of training rather than one point.
3. Partition: maximise S(P) = Σ_groups Σ_{i<j in group} (A_ij - τ). Singletons score 0, so a
   pair joins a group only if its affinity beats τ; without τ (a plain sum of positive
   affinities) one big group always wins. τ defaults to the mean off-diagonal affinity: pairs
   that are more alike than the average pair are rewarded, the others penalised — a
   correlation-clustering criterion that chooses the number of groups by itself ("auto"). The
   mean is relative: among tasks that are all equally related, noise decides; a number (e.g.
   `--threshold 0` with cosine: group only tasks whose gradients agree at all) is absolute. With
   `--groups K` the same score is maximised over partitions with exactly K groups.
   Exhaustive over all set partitions for T <= 10 (Bell(10) = 115,975, vectorised: ~1 s);
   beyond that greedy agglomeration (merge the pair of groups with the largest gain while it is
   positive, or until K groups) followed by single-task moves while they improve S.
4. Output: JSON with `tasks`, `affinity` (as measured), `affinity_symmetric`, `groups` (lists
   of task names), `score`, `threshold`, `ranking` (best partitions) and `settings`; a heatmap
   PNG beside it.
5. Optional check of the proxy (`transfer_steps` > 0): the affinity is a cheap estimate of how
   much training on one task helps another. `measure_transfer` measures that directly: from the
   same initial shared module, train on task i ALONE for `transfer_steps` and record
   T_ij = 1 - L_j(after) / L_j(before) on all of task j's training images (T trainings). The JSON
   then also holds `transfer` and `agreement`, the Spearman rank correlation between the
   off-diagonal entries of the symmetrised affinity and transfer matrices: near 1, the gradients
   predict transfer on this backbone; near 0, the grouping is not to be trusted there.

CLI: `python -m training.group --data ROOT --tasks a,b --out groups.json`, with
`--affinity cosine|lookahead` and `--groups K|auto`.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mmap_model import Backbone, MultiTaskPrompts, PromptConfig

from .classifiers import MultiTaskObjective, PromptClassifier, TaskText, task_metrics
from .configs import GroupingConfig
from .data import ImageSet
from .dist import DistInfo, all_reduce_sum, shutdown
from .errors import DataError
from .trainer import TrainConfig, Trainer

log = logging.getLogger(__name__)

EXHAUSTIVE_MAX_TASKS = 10


@dataclass
class Grouping:
    """A grouping result: the affinity and the chosen partition."""

    tasks: list[str]
    affinity: list[list[float]]
    groups: list[list[str]]
    score: float
    threshold: float
    ranking: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    transfer: list[list[float]] | None = None  # step 5, when measured
    agreement: float | None = None

    def to_json(self) -> dict[str, Any]:
        a = np.asarray(self.affinity)
        checked = {} if self.transfer is None else {"transfer": self.transfer, "agreement": self.agreement}
        return {"tasks": self.tasks, "affinity": self.affinity, "affinity_symmetric": ((a + a.T) / 2).tolist(),
                "groups": self.groups, "score": self.score, "threshold": self.threshold,
                "ranking": self.ranking, "settings": self.settings, **checked}


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


# ---------------------------------------------------------------------------------------------
# Affinity from gradients
# ---------------------------------------------------------------------------------------------


def shared_module_config(cfg: PromptConfig) -> PromptConfig:
    """The warm-up module: the method's module with the tokens a grouped task will have."""
    return replace(cfg, group_tokens=cfg.group_tokens + cfg.task_tokens)


def shared_module(backbone: Backbone, names: list[str], prompt_cfg: PromptConfig, seed: int) -> MultiTaskPrompts:
    """The one module all tasks share during grouping, initialised from `seed` (the same for affinity and transfer)."""
    torch.manual_seed(seed)
    return MultiTaskPrompts(shared_module_config(prompt_cfg), backbone.widths, names, {"shared": names},
                            task_modules=False)


def _task_losses(classifier: PromptClassifier, batch: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                 autocast) -> list[torch.Tensor]:
    with autocast():
        return [F.cross_entropy(classifier.scorer(t)(x).float(), y) for t, (x, y) in batch.items()]


def measure_affinity(backbone: Backbone, tasks: Mapping[str, TaskText], train_sets: Mapping[str, ImageSet],
                     prompt_cfg: PromptConfig, train_cfg: TrainConfig, cfg: GroupingConfig,
                     dist: DistInfo | None = None, progress: bool = True) -> np.ndarray:
    """The T x T affinity matrix of docs/method.md's grouping step 1-2 (order of `tasks`)."""
    dist = dist or DistInfo()
    names = list(tasks)
    prompts = shared_module(backbone, names, prompt_cfg, train_cfg.seed)
    classifier = PromptClassifier(backbone, tasks, prompts)
    total = cfg.warmup_steps + cfg.probe_steps
    trainer = Trainer(MultiTaskObjective(classifier), train_sets, replace(train_cfg, steps=total, accum=1),
                      dist=dist, progress=progress)
    if cfg.warmup_steps:
        trainer.fit(until=cfg.warmup_steps)
    params = list(trainer.params.values())
    affinity = np.zeros((len(names), len(names)))
    for _ in range(cfg.probe_steps):
        batch = {t: trainer.batch(t, trainer.step) for t in names}
        losses = _task_losses(classifier, batch, trainer.autocast)
        grads = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]) for loss in losses])
        grads = all_reduce_sum(grads, dist) / dist.world  # the global-batch gradient of every task
        if cfg.affinity == "cosine":
            unit = F.normalize(grads, dim=1)
            affinity += (unit @ unit.T).cpu().double().numpy()
        else:
            steps = cfg.lookahead_scale * _optimizer_steps(trainer, params, grads)
            affinity += _lookahead(classifier, batch, params, steps, trainer, dist)
        for p, g in zip(params, torch.split(grads.sum(0), [p.numel() for p in params]), strict=True):
            p.grad = g.view_as(p).clone()
        trainer.apply_gradients()
    return affinity / cfg.probe_steps


def measure_transfer(backbone: Backbone, tasks: Mapping[str, TaskText], train_sets: Mapping[str, ImageSet],
                     prompt_cfg: PromptConfig, train_cfg: TrainConfig, steps: int,
                     dist: DistInfo | None = None, progress: bool = True) -> np.ndarray:
    """The T x T direct transfer of step 5: row i, what `steps` steps on task i alone do to every task's loss."""
    names = list(tasks)
    prompts = shared_module(backbone, names, prompt_cfg, train_cfg.seed)
    start = {k: v.clone() for k, v in prompts.state_dict().items()}

    def losses() -> np.ndarray:
        metrics = task_metrics(PromptClassifier(backbone, tasks, prompts), train_sets, dist=dist)
        return np.array([metrics[t][1] for t in names])

    before = losses()
    transfer = np.zeros((len(names), len(names)))
    for i, source in enumerate(names):
        prompts.load_state_dict(start)
        alone = MultiTaskObjective(PromptClassifier(backbone, {source: tasks[source]}, prompts))
        Trainer(alone, {source: train_sets[source]}, replace(train_cfg, steps=steps, accum=1), dist=dist,
                progress=progress).fit(until=steps)
        transfer[i] = 1 - losses() / before
    return transfer


def rank_agreement(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman correlation of the off-diagonal pairs of two T x T matrices, each symmetrised first;
    None below 3 tasks (one pair has no ranking)."""
    if len(a) < 3:
        return None
    upper = np.triu_indices(len(a), 1)
    ranks = [np.argsort(np.argsort(((m + m.T) / 2)[upper])) for m in (np.asarray(a), np.asarray(b))]
    return float(np.corrcoef(*ranks)[0, 1])


def _optimizer_steps(trainer: Trainer, params: list[torch.Tensor], grads: torch.Tensor) -> torch.Tensor:
    """[T, P]: the update the trainer's optimiser would make for each task's gradient on its own."""
    group = trainer.optimizer.param_groups[0]
    lr = group["lr"]
    if not isinstance(trainer.optimizer, torch.optim.AdamW):
        return lr * grads
    beta2, eps = group["betas"][1], group["eps"]
    states = [trainer.optimizer.state.get(p, {}) for p in params]
    if not all("exp_avg_sq" in st for st in states):
        return lr * torch.sign(grads)  # no step taken yet: Adam's first step is lr · sign(g)
    v = torch.cat([(st["exp_avg_sq"] / (1 - beta2 ** float(st["step"]))).flatten() for st in states])
    return lr * grads / (v.sqrt() + eps)


@torch.no_grad()
def _lookahead(classifier: PromptClassifier, batch, params: list[torch.Tensor], steps: torch.Tensor,
               trainer: Trainer, dist: DistInfo) -> np.ndarray:
    """A_ij = 1 - L_j(θ - Δ_i) / L_j(θ) on this step's batches."""
    def losses() -> torch.Tensor:
        local = torch.stack(_task_losses(classifier, batch, trainer.autocast)).float()
        return all_reduce_sum(local, dist) / dist.world

    theta = [p.detach().clone() for p in params]
    base = losses()
    out = np.zeros((len(steps), len(steps)))
    for i, delta in enumerate(steps):
        for p, t, d in zip(params, theta, torch.split(delta, [p.numel() for p in params]), strict=True):
            p.copy_(t - d.view_as(p))
        out[i] = (1 - losses() / base).cpu().double().numpy()
    for p, t in zip(params, theta, strict=True):
        p.copy_(t)
    return out


def group_tasks(backbone: Backbone, tasks: Mapping[str, TaskText], train_sets: Mapping[str, ImageSet],
                prompt_cfg: PromptConfig, train_cfg: TrainConfig, cfg: GroupingConfig,
                dist: DistInfo | None = None, progress: bool = True) -> Grouping:
    """Measure affinity and choose the partition (docs/method.md's grouping, steps 1-3)."""
    start = time.perf_counter()
    names = list(tasks)
    affinity = measure_affinity(backbone, tasks, train_sets, prompt_cfg, train_cfg, cfg, dist, progress)
    index_groups, score, tau, ranking = best_partition(affinity, cfg.groups, cfg.threshold)
    transfer = None
    if cfg.transfer_steps:
        transfer = measure_transfer(backbone, tasks, train_sets, prompt_cfg, train_cfg, cfg.transfer_steps, dist,
                                    progress)
    def named(gs: list[list[int]]) -> list[list[str]]:
        return [[names[i] for i in g] for g in gs]

    settings = {**asdict(cfg), "method": prompt_cfg.method,
                "shared_tokens": shared_module_config(prompt_cfg).group_tokens,
                "batch_size": train_cfg.batch_size, "lr": train_cfg.lr, "seed": train_cfg.seed,
                "search": "exhaustive" if len(names) <= EXHAUSTIVE_MAX_TASKS else "greedy",
                "seconds": round(time.perf_counter() - start, 2)}
    return Grouping(names, affinity.tolist(), named(index_groups), score, tau,
                    [{"groups": named(g), "score": s} for g, s in ranking], settings,
                    None if transfer is None else transfer.tolist(),
                    None if transfer is None else rank_agreement(affinity, transfer))


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def write_grouping(grouping: Grouping, path: Path) -> tuple[Path, Path]:
    """groups.json and a heatmap PNG beside it (tasks ordered by group, group borders drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(grouping.to_json(), indent=2))
    order = [grouping.tasks.index(t) for g in grouping.groups for t in g]
    a = np.asarray(grouping.affinity)[np.ix_(order, order)]
    labels = [grouping.tasks[i] for i in order]
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(labels), 0.6 + 0.7 * len(labels)))
    off = ~np.eye(len(a), dtype=bool)
    # The colour scale spans the off-diagonal values: the diagonal (a task with itself) would
    # otherwise flatten every difference that matters for the grouping.
    lo, hi = (a[off].min(), a[off].max()) if off.any() else (0.0, 1.0)
    im = ax.imshow(np.where(off, a, np.nan), cmap="viridis", vmin=lo, vmax=hi if hi > lo else lo + 1e-9)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, f"{a[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if a[i, j] < (lo + hi) / 2 else "black")
    edge = 0
    for g in grouping.groups:
        ax.add_patch(plt.Rectangle((edge - 0.5, edge - 0.5), len(g), len(g), fill=False, lw=2, ec="red"))
        edge += len(g)
    ax.set_title(f"task affinity ({grouping.settings.get('affinity', '')}), τ = {grouping.threshold:.3f}")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    png = path.with_suffix(".png")
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return path, png


def read_groups(path: Path, tasks: Sequence[str]) -> list[list[str]]:
    """The `groups` of a groups.json restricted to `tasks` (tasks in no group stay ungrouped)."""
    data = json.loads(Path(path).read_text())
    groups = data.get("groups") if isinstance(data, dict) else None
    if not isinstance(groups, list) or not all(isinstance(g, list) for g in groups):
        raise DataError(f"{path}: needs a 'groups' list of lists of task names")
    seen = [t for g in groups for t in g]
    if len(seen) != len(set(seen)):
        raise DataError(f"{path}: a task appears in more than one group")
    unknown = sorted(set(seen) - set(tasks))
    if unknown:
        log.warning("%s: ignoring tasks not being trained: %s", path, unknown)
    return [[t for t in g if t in tasks] for g in groups if any(t in tasks for t in g)]


def main(argv: Sequence[str] | None = None) -> Grouping:
    from . import cli

    parser = argparse.ArgumentParser(prog="python -m training.group", description=__doc__.splitlines()[0])
    cli.add_data_args(parser)
    cli.add_backbone_args(parser)
    cli.add_prompt_args(parser)
    cli.add_train_args(parser, epochs=False)
    cli.add_grouping_args(parser)
    parser.add_argument("--out", type=Path, required=True, help="groups.json to write (a heatmap PNG goes beside it)")
    args = parser.parse_args(argv)
    cli.setup_logging()
    run = cli.prepare(args)
    grouping = group_tasks(run.backbone, run.texts, run.sets["train"], cli.prompt_config(args), cli.train_config(args),
                           cli.grouping_config(args), run.dist, progress=not args.quiet)
    shutdown(run.dist)
    if run.dist.main:
        json_path, png = write_grouping(grouping, args.out)
        checked = {} if grouping.agreement is None else {"agreement_with_transfer": grouping.agreement}
        print(json.dumps({"groups": grouping.groups, "score": grouping.score, "threshold": grouping.threshold,
                          **checked, "json": str(json_path), "heatmap": str(png)}, indent=2))
    return grouping


if __name__ == "__main__":
    main()
