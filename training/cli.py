"""Command-line pieces shared by `training.fit`, `training.group`, `training.evaluate` and `training.bench`.

Each `add_*_args` adds one family of options; the matching `*_config(args)` builds the config
object, so every command spells an option the same way and has the same default.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

from mmap_model import (
    EMBEDDED_MODEL,
    EMBEDDED_PRETRAINED,
    METHODS,
    Backbone,
    PromptConfig,
    PromptSetError,
    load_backbone,
)
from mmap_model.backbone import random_weights

from .classifiers import TaskText
from .configs import GroupingConfig, comma_list
from .data import ImageSet, SplitConfig, Task, discover_tasks, load_splits
from .dist import DistInfo, init_distributed, launched_by_torchrun
from .errors import UserError
from .trainer import TrainConfig


def add_data_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--data", type=Path, required=required,
                   help="ImageFolder-per-domain root: ROOT/<domain>/<class>/<image>")
    g.add_argument("--tasks", type=comma_list, default=None, help="comma-separated domains to use (default: all)")
    g.add_argument("--classnames", type=Path, default=None,
                   help="JSON {class_folder: class name} (default: folder names, _ -> space)")
    g.add_argument("--templates", type=Path, default=None,
                   help="JSON {task: 'a sketch of a {}.'} (default: ROOT/templates.json, else 'a photo of a {}.')")
    shots = g.add_mutually_exclusive_group()
    shots.add_argument("--shots", type=int, default=None, help="training images per class and task (k-shot)")
    shots.add_argument("--fraction", type=float, default=None, help="or this fraction of each class's training pool")
    g.add_argument("--test-fraction", type=float, default=SplitConfig.test_fraction,
                   help="stratified split without split files")
    g.add_argument("--val-fraction", type=float, default=SplitConfig.val_fraction,
                   help="validation share, carved from the training pool")
    g.add_argument("--split-seed", type=int, default=SplitConfig.split_seed,
                   help="seed of the train/val/test split (not of the shots)")
    g.add_argument("--cache-gb", type=float, default=4.0, help="keep decoded images in memory up to this size")


def add_backbone_args(parser: argparse.ArgumentParser, default_model: str | None = EMBEDDED_MODEL) -> None:
    g = parser.add_argument_group("backbone")
    g.add_argument("--model", default=default_model,
                   help=f"open_clip model name, local-dir:<dir>, or {EMBEDDED_MODEL} (default)")
    g.add_argument("--pretrained", default=EMBEDDED_PRETRAINED if default_model == EMBEDDED_MODEL else None,
                   help=f"open_clip pretrained tag or checkpoint path ('{EMBEDDED_PRETRAINED}' for {EMBEDDED_MODEL}; "
                        "'none' = random)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda (torchrun: cuda:<LOCAL_RANK>)")
    g.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0 = torch's default). On a busy machine 1 can be much faster: "
                        "idle OpenMP threads spin and fight other processes for the cores")


def add_prompt_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("prompts")
    d = PromptConfig()
    g.add_argument("--method", default=d.method, choices=sorted(METHODS), help="prompt module of every group and task")
    g.add_argument("--depth", type=int, default=d.depth, help="prompted layers J (clamped to the towers)")
    g.add_argument("--group-tokens", type=int, default=d.group_tokens, help="tokens per group-shared module")
    g.add_argument("--task-tokens", type=int, default=d.task_tokens, help="tokens per task-specific module")
    g.add_argument("--source-dim", type=int, default=d.source_dim, help="MmAP's d_s (default gcd(d_t, d_v))")
    g.add_argument("--init-std", type=float, default=d.init_std)


def add_train_args(parser: argparse.ArgumentParser, epochs: bool = True) -> None:
    g = parser.add_argument_group("training")
    d = TrainConfig()
    if epochs:
        g.add_argument("--epochs", type=int, default=d.epochs)
        g.add_argument("--steps", type=int, default=None, help="total optimiser steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="images per task per micro-step (global over ranks)")
    g.add_argument("--accum", type=int, default=d.accum, help="gradient accumulation: micro-steps per optimiser step")
    g.add_argument("--optimizer", default=d.optimizer, choices=["adamw", "sgd"])
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum")
    g.add_argument("--warmup", type=float, default=d.warmup_fraction, help="warm-up as a fraction of the steps")
    g.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="cosine floor as a fraction of --lr")
    g.add_argument("--grad-clip", type=float, default=None)
    g.add_argument("--amp", default=d.amp, choices=["auto", "bf16", "fp16", "off"],
                   help="mixed precision (auto: bf16 on GPU)")
    g.add_argument("--no-augment", action="store_true", help="no augmentation at all")
    g.add_argument("--crop-scale", type=float, default=d.crop_scale,
                   help="random crops down to this share of the side (1 = flip only)")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def add_grouping_args(parser: argparse.ArgumentParser, count_flag: str = "--groups") -> None:
    """Grouping options; `count_flag` names the option for the number of groups (K or auto)."""
    g = parser.add_argument_group("task grouping")
    d = GroupingConfig()
    g.add_argument(count_flag, dest="group_count", default="auto", help="number of groups K, or auto")
    g.add_argument("--affinity", default=d.affinity, choices=["cosine", "lookahead"])
    g.add_argument("--threshold", default=str(d.threshold),
                   help="τ subtracted from each within-group affinity: mean | median | a number")
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="steps of the shared module before probing")
    g.add_argument("--probe-steps", type=int, default=d.probe_steps,
                   help="steps over which per-task gradients are compared")
    g.add_argument("--lookahead-scale", type=float, default=d.lookahead_scale,
                   help="lookahead step as a multiple of the optimiser's own step")
    g.add_argument("--transfer-steps", type=int, default=d.transfer_steps,
                   help="> 0: check the affinity against measured transfer (one training of this many steps per task)")


def split_config(args: argparse.Namespace) -> SplitConfig:
    return SplitConfig(test_fraction=args.test_fraction, val_fraction=args.val_fraction, split_seed=args.split_seed,
                       shots=args.shots, fraction=args.fraction)


def prompt_config(args: argparse.Namespace) -> PromptConfig:
    return PromptConfig(method=args.method, depth=args.depth, group_tokens=args.group_tokens,
                        task_tokens=args.task_tokens, source_dim=args.source_dim, init_std=args.init_std)


def train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(epochs=getattr(args, "epochs", TrainConfig.epochs), steps=getattr(args, "steps", None),
                       batch_size=args.batch_size, accum=args.accum, optimizer=args.optimizer, lr=args.lr,
                       weight_decay=args.weight_decay, momentum=args.momentum, warmup_fraction=args.warmup,
                       min_lr_ratio=args.min_lr_ratio, grad_clip=args.grad_clip, amp=args.amp,
                       augment=not args.no_augment, crop_scale=args.crop_scale, seed=args.seed)


def grouping_config(args: argparse.Namespace) -> GroupingConfig:
    count = None if str(args.group_count) == "auto" else int(args.group_count)
    try:
        threshold: float | str = float(args.threshold)
    except ValueError:
        threshold = args.threshold
    return GroupingConfig(affinity=args.affinity, groups=count, threshold=threshold, warmup_steps=args.warmup_steps,
                          probe_steps=args.probe_steps, lookahead_scale=args.lookahead_scale,
                          transfer_steps=args.transfer_steps)


@dataclass
class Run:
    """What every command works on: the process group, the backbone and the data."""

    dist: DistInfo
    backbone: Backbone
    tasks: list[Task]
    sets: dict[str, dict[str, ImageSet]]
    split: SplitConfig

    @property
    def texts(self) -> dict[str, TaskText]:
        return {t.name: TaskText(t.classnames, t.template) for t in self.tasks}


def backbone_from(model: str, pretrained: str | None, device: str) -> Backbone:
    """load_backbone; a random-weight backbone (`--pretrained none`, for development) is drawn from seed 0,
    the same in every command, so its prompt sets stay loadable."""
    return load_backbone(model, pretrained, device=device, seed=0 if random_weights(pretrained) else None)


@contextmanager
def user_errors(*kinds: type[Exception]) -> Iterator[None]:
    """Inside, a UserError (and these `kinds`: reading a file the user named) is the user's mistake: one line
    on stderr and exit status 1, no traceback. Any other exception is a bug and keeps its traceback."""
    try:
        yield
    except (UserError, PromptSetError, *kinds) as e:
        raise SystemExit(f"error: {e}") from None


def prepare(args: argparse.Namespace, splits: tuple[str, ...] = ("train", "val", "test")) -> Run:
    """Read the tasks (before anything slow, so data mistakes show at once), join the process
    group, load the frozen backbone and the tasks' images."""
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    with user_errors(OSError, json.JSONDecodeError):  # a class-names or templates file that cannot be read
        split = split_config(args)
        tasks = discover_tasks(args.data, args.tasks, split, getattr(args, "seed", 0), args.classnames, args.templates)
    dist = init_distributed(args.device)
    backbone = backbone_from(args.model, args.pretrained, str(dist.device))
    with user_errors():
        sets = load_splits(tasks, backbone.preprocess, splits, int(args.cache_gb * (1 << 30)))
    return Run(dist, backbone, tasks, sets, split)


def command_line(module: str, argv: list[str] | None) -> str:
    """The command as typed (for provenance); torchrun launches are recorded as such."""
    args = sys.argv[1:] if argv is None else argv
    prefix = ["python", "-m", module]
    if launched_by_torchrun():
        prefix = ["torchrun", f"--nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', os.environ['WORLD_SIZE'])}",
                  "-m", module]
    return shlex.join([*prefix, *args])


def code_version() -> str:
    """`git describe --always --dirty` of the source tree, else the installed package version."""
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=10, check=True)
        return f"git:{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        try:
            return f"mmap-serve {metadata.version('mmap-serve')}"
        except metadata.PackageNotFoundError:
            return "unknown"


def setup_logging() -> None:
    """Our packages at INFO; open_clip (which logs on the root logger) only from WARNING."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("training", "mmap_model", "__main__"):
        logging.getLogger(name).setLevel(logging.INFO)
