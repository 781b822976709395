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
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .affinity import Grouping, group_tasks
from .configs import HelpFormatter
from .dist import shutdown
from .errors import DataError

log = logging.getLogger(__name__)


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

    parser = argparse.ArgumentParser(prog="python -m training.group", description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    cli.add_data_args(parser)
    cli.add_backbone_args(parser)
    cli.add_prompt_args(parser)
    cli.add_train_args(parser, epochs=False)
    cli.add_grouping_args(parser)
    parser.add_argument("--out", type=Path, required=True, help="groups.json to write (a heatmap PNG goes beside it)")
    args = cli.parse_args(parser, argv)
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
