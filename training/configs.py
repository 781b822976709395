"""What the training commands are configured with, and the `--help` format that shows their defaults, importable
by every module that needs it (the grouping, the command-line pieces, pretraining, the data tools) without pulling
in the others."""

from __future__ import annotations

import argparse
import copy
import re
from dataclasses import dataclass, field

SAYS_DEFAULT = re.compile(r"\(default\b|\bdefault:", re.IGNORECASE)  # help that already names its default


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The `--help` of every training command: an option that takes a value shows its default, unless it has none
    or its help names it already; descriptions and epilogs keep their line breaks."""

    @staticmethod
    def _default_note(action: argparse.Action) -> str | None:
        default = action.default
        if (not action.option_strings or action.nargs == 0 or default is None or default is argparse.SUPPRESS
                or SAYS_DEFAULT.search(action.help or "")):
            return None
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)  # as typed
        return f"(default: {shown.replace('%', '%%') or repr('')})"  # the help is %-formatted next

    def _get_help_string(self, action: argparse.Action) -> str | None:
        note = self._default_note(action)
        return f"{action.help} {note}" if note else action.help

    def _format_action(self, action: argparse.Action) -> str:
        note = self._default_note(action) if action.help is None else None
        if note:  # argparse prints nothing after an option without help: the default becomes its help
            action = copy.copy(action)
            action.help = note
        return super()._format_action(action)


def comma_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def group_count(text: str) -> int | None:
    """`auto` (None) or a number of groups."""
    return None if text == "auto" else int(text)


def threshold(text: str) -> float | str:
    """A number, or `mean` / `median` (GroupingConfig checks which)."""
    try:
        return float(text)
    except ValueError:
        return text


PARSERS = {"group_count": group_count, "threshold": threshold}  # the field metadata's "type" names


@dataclass(frozen=True, kw_only=True)  # built by keyword only: a reordered field cannot shift values
class GroupingConfig:
    """Settings of the grouping (saved with the result)."""

    # Each field is a command-line flag (training/cli.py); `groups` is --groups or --num-groups by command.
    affinity: str = field(default="cosine", metadata={"choices": ["cosine", "lookahead"],
                                                      "help": "how the tasks' gradients are compared"})
    groups: int | None = field(default=None, metadata={"type": "group_count", "metavar": "K|auto",
                                                       "help": "number of groups K, or auto (default: auto)"})
    threshold: float | str = field(default="mean", metadata={
        "type": "threshold", "help": "τ subtracted from each within-group affinity: mean | median | a number"})
    warmup_steps: int = field(default=20, metadata={"help": "steps of the shared module before probing"})
    probe_steps: int = field(default=10, metadata={"help": "steps over which per-task gradients are compared"})
    lookahead_scale: float = field(default=1.0, metadata={"help": "lookahead step as a multiple of the optimiser's "
                                                                  "own step"})
    transfer_steps: int = field(default=0, metadata={"help": "> 0: check the affinity against measured transfer "
                                                             "(one training of this many steps per task)"})

    def __post_init__(self) -> None:
        if self.affinity not in ("cosine", "lookahead"):
            raise ValueError(f"affinity must be cosine or lookahead, got {self.affinity!r}")
        if self.groups is not None and self.groups < 1:
            raise ValueError("groups must be >= 1 (or None for auto)")
        if isinstance(self.threshold, str) and self.threshold not in ("mean", "median"):
            raise ValueError("threshold must be a number, 'mean' or 'median'")
        if self.warmup_steps < 0 or self.probe_steps < 1 or self.lookahead_scale <= 0 or self.transfer_steps < 0:
            raise ValueError("need warmup_steps >= 0, probe_steps >= 1, lookahead_scale > 0 and transfer_steps >= 0")
