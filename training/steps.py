"""The steps of a prompt-training run, as a library: name and resolve the groups, build and train the prompts,
score the test split, split the trained prompts into one prompt set per group, add sample images.
`training.fit` (the command) and `training.bench` (the method comparison) both run them."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from mmap_model import MultiTaskPrompts, PromptConfig, PromptSet, TaskSpec
from mmap_model.prompts import check_name

from . import cli
from .affinity import Grouping, group_tasks
from .classifiers import MultiTaskObjective, PromptClassifier, accuracy
from .group import read_groups, write_grouping
from .trainer import TrainConfig, Trainer, TrainResult, autocast_factory

log = logging.getLogger(__name__)


def group_name(members: Sequence[str], index: int) -> str:
    """A readable, valid name for a group: its tasks joined by '-', else `group<index>`."""
    name = "-".join(members)
    try:
        return check_name(name)
    except ValueError:
        return f"group{index}"


def named_groups(groups: Sequence[Sequence[str]]) -> dict[str, list[str]]:
    """{name: tasks} for the multi-member groups (a one-task group is just that task's module)."""
    out: dict[str, list[str]] = {}
    for i, members in enumerate(g for g in groups if len(g) > 1):
        out[group_name(members, i)] = list(members)
    return out


def resolve_groups(mode: str, run: cli.Run, prompt_cfg: PromptConfig, train_cfg: TrainConfig,
                   args: argparse.Namespace, run_dir: Path | None,
                   progress: bool) -> tuple[dict[str, list[str]], Grouping | None]:
    """The {group: tasks} to train for `--groups` (and the grouping result for `auto`)."""
    names = [t.name for t in run.tasks]
    if mode == "none":
        return {}, None
    if mode == "one":
        return {"all": names}, None
    if mode == "auto":
        cached = run_dir / "groups.json" if run_dir else None
        if cached is not None and getattr(args, "resume", None) and cached.is_file():
            return named_groups(read_groups(cached, names)), None  # a resumed run keeps its grouping
        grouping = group_tasks(run.backbone, run.texts, run.sets["train"], prompt_cfg, train_cfg,
                               cli.grouping_config(args), run.dist, progress)
        if cached is not None and run.dist.main:
            write_grouping(grouping, cached)
        return named_groups(grouping.groups), grouping
    with cli.user_errors(OSError, json.JSONDecodeError):  # the user's groups file
        return named_groups(read_groups(Path(mode), names)), None


def build_prompts(run: cli.Run, prompt_cfg: PromptConfig, groups: Mapping[str, list[str]], task_modules: bool,
                  seed: int) -> MultiTaskPrompts:
    torch.manual_seed(seed)  # prompt initialisation is part of the seeded run
    return MultiTaskPrompts(prompt_cfg, run.backbone.widths, [t.name for t in run.tasks], dict(groups), task_modules)


def train_prompts(run: cli.Run, prompts: MultiTaskPrompts, train_cfg: TrainConfig, run_dir: Path | None = None,
                  resume: str | None = None, progress: bool = True, validate: bool = True,
                  label: str = "") -> tuple[PromptClassifier, TrainResult]:
    """Multi-task training of `prompts` on the run's tasks; the backbone stays frozen. `label` names the phase in
    the progress output."""
    classifier = PromptClassifier(run.backbone, run.texts, prompts)
    trainer = Trainer(MultiTaskObjective(classifier), run.sets["train"], train_cfg,
                      run.sets.get("val") if validate else None, run_dir, run.dist, progress, label)
    return classifier, trainer.fit(resume)


def score_test_split(run: cli.Run, classifier: PromptClassifier, train_cfg: TrainConfig) -> dict[str, dict[str, float]]:
    """{'prompted': {task: acc}, 'zero_shot': {task: acc}} on the test split."""
    autocast = autocast_factory(train_cfg.amp, run.dist.device)
    zero_shot = PromptClassifier(run.backbone, run.texts, None)
    return {"prompted": accuracy(classifier, run.sets["test"], train_cfg.eval_batch_size, run.dist, autocast),
            "zero_shot": accuracy(zero_shot, run.sets["test"], train_cfg.eval_batch_size, run.dist, autocast)}


def split_into_sets(run: cli.Run, prompts: MultiTaskPrompts, groups: Mapping[str, list[str]],
                    calibration: Mapping[str, tuple[float, float | None]] | None = None) -> dict[str, PromptSet]:
    """One prompt set per group (its module + its tasks' modules) and one per ungrouped task. `calibration`:
    {task: (temperature, min_score)} for the tasks that have them."""
    state = prompts.state_dict()
    members = {g: list(ts) for g, ts in groups.items()}
    grouped = {t for ts in members.values() for t in ts}
    members.update({t.name: [t.name] for t in run.tasks if t.name not in grouped})
    by_name = {t.name: t for t in run.tasks}
    sets = {}
    for name, tasks in members.items():
        group = name if name in groups else None
        specs = {t: TaskSpec(by_name[t].classnames, by_name[t].template, group,
                             *(calibration or {}).get(t, (1.0, None))) for t in tasks}
        ps = PromptSet.create(name, run.backbone, prompts.cfg, specs, task_modules=bool(len(prompts.task)))
        prefixes = ([f"group.{group}."] if group else []) + [f"task.{t}." for t in tasks]
        ps.prompts.load_state_dict({k: v for k, v in state.items() if k.startswith(tuple(prefixes))})
        sets[name] = ps
    return sets


def write_samples(directory: Path, run: cli.Run, tasks: Sequence[str], per_task: int) -> None:
    """`samples/<task>/<class_folder>.<ext>`: test images of `per_task` classes spread over the list."""
    by_name = {t.name: t for t in run.tasks}
    for name in tasks:
        task = by_name[name]
        files, labels = task.files["test"], task.labels["test"]
        picks = np.unique(np.linspace(0, len(task.classnames) - 1, per_task).round().astype(int))
        for c in picks:
            first = next((f for f, y in zip(files, labels, strict=True) if y == c), None)
            if first is not None:
                target = directory / "samples" / name / f"{first.parent.name}{first.suffix.lower()}"
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(first, target)
