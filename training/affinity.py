"""The measurement step of the task grouping (docs/method.md and training/group.py): a prompt module shared by
all tasks is warmed up, then every task's gradient on it gives the affinity (cosine or TAG's lookahead);
optionally the transfer it predicts is measured directly. `group_tasks` runs it and the partition search."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mmap_model import Backbone, MultiTaskPrompts, PromptConfig

from .classifiers import MultiTaskObjective, PromptClassifier, TaskText, task_metrics
from .configs import GroupingConfig
from .data import ImageSet
from .dist import DistInfo, all_reduce_sum
from .partition import EXHAUSTIVE_MAX_TASKS, best_partition
from .trainer import PhaseProgress, TrainConfig, Trainer

log = logging.getLogger(__name__)

PHASE = "grouping"  # the label of the grouping's progress output (training.fit trains again after it)


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
                      dist=dist, progress=progress, label=PHASE)
    if cfg.warmup_steps:
        PhaseProgress(f"{PHASE}: warm-up", cfg.warmup_steps, trainer.progress).note(
            f"{cfg.warmup_steps} of the {total} steps of the module shared by {len(names)} tasks (the other "
            f"{cfg.probe_steps} measure the affinity)")
        trainer.fit(until=cfg.warmup_steps)
    probe = PhaseProgress(f"{PHASE}: affinity ({cfg.affinity})", cfg.probe_steps, trainer.progress)
    probe.note(f"{cfg.probe_steps} probe steps, every task's gradient on its own batch")
    params = list(trainer.params.values())
    affinity = np.zeros((len(names), len(names)))
    for done in range(1, cfg.probe_steps + 1):
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
        probe.step(done)
    return affinity / cfg.probe_steps


def measure_transfer(backbone: Backbone, tasks: Mapping[str, TaskText], train_sets: Mapping[str, ImageSet],
                     prompt_cfg: PromptConfig, train_cfg: TrainConfig, steps: int,
                     dist: DistInfo | None = None, progress: bool = True) -> np.ndarray:
    """The T x T direct transfer of step 5: row i, what `steps` steps on task i alone do to every task's loss."""
    dist = dist or DistInfo()
    names = list(tasks)
    prompts = shared_module(backbone, names, prompt_cfg, train_cfg.seed)
    start = {k: v.clone() for k, v in prompts.state_dict().items()}

    def losses() -> np.ndarray:
        metrics = task_metrics(PromptClassifier(backbone, tasks, prompts), train_sets, dist=dist)
        return np.array([metrics[t][1] for t in names])

    lines = PhaseProgress(f"{PHASE}: transfer", len(names), progress and dist.main, unit="task")
    lines.note(f"measuring: {steps} steps on each of {len(names)} tasks alone")
    before = losses()
    transfer = np.zeros((len(names), len(names)))
    for i, source in enumerate(names):
        prompts.load_state_dict(start)
        alone = MultiTaskObjective(PromptClassifier(backbone, {source: tasks[source]}, prompts))
        Trainer(alone, {source: train_sets[source]}, replace(train_cfg, steps=steps, accum=1), dist=dist,
                progress=progress, label=f"{PHASE}: transfer from {source}").fit(until=steps)
        transfer[i] = 1 - losses() / before
        lines.step(i + 1)
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
    dist = dist or DistInfo()
    names = list(tasks)
    affinity = measure_affinity(backbone, tasks, train_sets, prompt_cfg, train_cfg, cfg, dist, progress)
    search = "exhaustive" if len(names) <= EXHAUSTIVE_MAX_TASKS else "greedy"
    partition = PhaseProgress(f"{PHASE}: partition", 1, progress and dist.main)
    partition.note(f"{search} search over the partitions of {len(names)} tasks")
    index_groups, score, tau, ranking = best_partition(affinity, cfg.groups, cfg.threshold)
    partition.note(f"{len(index_groups)} groups, score {score:.3f} (τ = {tau:.3f})")
    transfer = None
    if cfg.transfer_steps:
        transfer = measure_transfer(backbone, tasks, train_sets, prompt_cfg, train_cfg, cfg.transfer_steps, dist,
                                    progress)
    def named(gs: list[list[int]]) -> list[list[str]]:
        return [[names[i] for i in g] for g in gs]

    settings = {**asdict(cfg), "method": prompt_cfg.method,
                "shared_tokens": shared_module_config(prompt_cfg).group_tokens,
                "batch_size": train_cfg.batch_size, "lr": train_cfg.lr, "seed": train_cfg.seed,
                "search": search,
                "seconds": round(time.perf_counter() - start, 2)}
    return Grouping(names, affinity.tolist(), named(index_groups), score, tau,
                    [{"groups": named(g), "score": s} for g, s in ranking], settings,
                    None if transfer is None else transfer.tolist(),
                    None if transfer is None else rank_agreement(affinity, transfer))
