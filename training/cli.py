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
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from importlib import metadata
from pathlib import Path
from typing import TypeVar

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
from .configs import PARSERS, GroupingConfig, comma_list
from .data import ImageSet, SplitConfig, Task, discover_tasks, load_splits
from .dist import DistInfo, init_distributed, launched_by_torchrun
from .errors import UserError
from .trainer import TrainConfig

C = TypeVar("C")
GROUPING = "grouping_"  # the grouping flags' dest prefix: training.fit's --groups (a mode) is not GroupingConfig.groups

def add_data_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--data", type=Path, required=required,
                   help="ImageFolder-per-domain root: ROOT/<domain>/<class>/<image>")
    g.add_argument("--tasks", type=comma_list, default=None, help="comma-separated domains to use (default: all)")
    g.add_argument("--classnames", type=Path, default=None,
                   help="JSON {class_folder: class name} (default: folder names, _ -> space)")
    g.add_argument("--templates", type=Path, default=None,
                   help="JSON {task: 'a sketch of a {}.'} (default: ROOT/templates.json, else 'a photo of a {}.')")
    add_config_args(g, SplitConfig)
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


def add_config_args(group: argparse._ArgumentGroup, cls: type, skip: Sequence[str] = (), prefix: str = "",
                    flags: Mapping[str, str] | None = None, choices: Mapping[str, list[str]] | None = None) -> None:
    """One flag per field of a config dataclass (dest = `prefix` + the field's name): `--<field-name>` or the
    field metadata's `flag` (or `flags[name]`), its default, `help`, `choices` and `type` (a callable, or a name
    in configs.PARSERS); a boolean that defaults to True is a `--no-...` switch; fields marked `exclusive` are
    one mutually exclusive choice. `config_from` builds the config
    back by keyword, so a new field is a new flag with nothing else to write."""
    exclusive: argparse._MutuallyExclusiveGroup | None = None
    for f in fields(cls):
        if f.name in skip:
            continue
        meta, dest = f.metadata, prefix + f.name
        target: argparse._ActionsContainer = group
        if meta.get("exclusive"):
            exclusive = exclusive or group.add_mutually_exclusive_group()
            target = exclusive
        flag = (flags or {}).get(f.name) or meta.get("flag") or "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            target.add_argument(flag, dest=dest, action="store_false" if f.default else "store_true",
                                help=meta.get("help"))
            continue
        kind = meta.get("type", type(f.default))
        options = (choices or {}).get(f.name, meta.get("choices"))
        target.add_argument(flag, dest=dest, default=f.default, type=PARSERS.get(kind, kind), choices=options,
                            metavar=meta.get("metavar") or (None if options else f.name.upper()), help=meta.get("help"))


def config_from(args: argparse.Namespace, cls: type[C], prefix: str = "") -> C:
    """The config of the flags `add_config_args` made (fields without a flag keep their defaults)."""
    return cls(**{f.name: getattr(args, prefix + f.name) for f in fields(cls) if hasattr(args, prefix + f.name)})


def add_prompt_args(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser.add_argument_group("prompts"), PromptConfig, choices={"method": sorted(METHODS)})


def add_train_args(parser: argparse.ArgumentParser, epochs: bool = True) -> None:
    group = parser.add_argument_group("training")
    add_config_args(group, TrainConfig, skip=() if epochs else ("epochs", "steps"))
    group.add_argument("--quiet", action="store_true", help="no progress bars")


def add_grouping_args(parser: argparse.ArgumentParser, count_flag: str = "--groups") -> None:
    """Grouping options; `count_flag` names the option for the number of groups (K or auto)."""
    add_config_args(parser.add_argument_group("task grouping"), GroupingConfig, prefix=GROUPING,
                    flags={"groups": count_flag})


CONFIGS: tuple[tuple[type, str], ...] = ((SplitConfig, ""), (PromptConfig, ""), (TrainConfig, ""),
                                         (GroupingConfig, GROUPING))  # each with its flags' dest prefix


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """`parser.parse_args`, then every config its flags describe is built once: values a config refuses together
    (`--method maple --rank 3`) are a usage error, reported like a malformed flag before anything is loaded."""
    args = parser.parse_args(argv)
    for cls, prefix in CONFIGS:
        if any(hasattr(args, prefix + f.name) for f in fields(cls)):
            try:
                config_from(args, cls, prefix)
            except (ValueError, UserError) as e:
                parser.error(str(e))
    return args


def split_config(args: argparse.Namespace) -> SplitConfig:
    return config_from(args, SplitConfig)


def prompt_config(args: argparse.Namespace) -> PromptConfig:
    return config_from(args, PromptConfig)


def train_config(args: argparse.Namespace) -> TrainConfig:
    return config_from(args, TrainConfig)


def grouping_config(args: argparse.Namespace) -> GroupingConfig:
    return config_from(args, GroupingConfig, GROUPING)


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
