"""What the training commands are configured with, importable by every module that needs it (the grouping,
the command-line pieces, pretraining) without pulling in the others."""

from __future__ import annotations

from dataclasses import dataclass


def comma_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


@dataclass(frozen=True, kw_only=True)  # built by keyword only: a reordered field cannot shift values
class GroupingConfig:
    """Settings of the grouping (saved with the result)."""

    affinity: str = "cosine"  # cosine | lookahead
    groups: int | None = None  # None = choose the number automatically
    threshold: float | str = "mean"  # τ: a number, "mean" or "median" of the off-diagonal affinities
    warmup_steps: int = 20
    probe_steps: int = 10
    lookahead_scale: float = 1.0  # lookahead step as a multiple of the optimiser's own step
    transfer_steps: int = 0  # > 0: also measure direct transfer (T trainings of this many steps) to check the affinity

    def __post_init__(self) -> None:
        if self.affinity not in ("cosine", "lookahead"):
            raise ValueError(f"affinity must be cosine or lookahead, got {self.affinity!r}")
        if self.groups is not None and self.groups < 1:
            raise ValueError("groups must be >= 1 (or None for auto)")
        if isinstance(self.threshold, str) and self.threshold not in ("mean", "median"):
            raise ValueError("threshold must be a number, 'mean' or 'median'")
        if self.warmup_steps < 0 or self.probe_steps < 1 or self.lookahead_scale <= 0 or self.transfer_steps < 0:
            raise ValueError("need warmup_steps >= 0, probe_steps >= 1, lookahead_scale > 0 and transfer_steps >= 0")
