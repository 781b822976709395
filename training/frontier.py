"""`python -m training.frontier`: accuracy against trainable parameters for every prompt method at several sizes.

    python -m training.frontier [--data ROOT] [--sizes 2,4,8] [--ranks 1,2,3] [--source-dims 0,16]
        [--shard K/N] --out DIR
    python -m training.frontier --report --out DIR      # merge the shards' rows: table, JSON, plot

The method benchmark's protocol (`training.bench`: same data, split, k-shot samples, steps, batch and
seeds) applied to CoOp, VPT, MaPLe, independent prompts and MmAP, each in two structures:
- "MT": one module shared by all tasks with n tokens;
- "group+task": one group module (all tasks) with n tokens plus a task module with n tokens per task;
at n tokens per module for n in `--sizes`, and for MmAP also at every coupling rank in `--ranks` and
source width d_s in `--source-dims` (0 = gcd(d_t, d_v)) at the smallest size. Learning rates are
picked on validation (the bench's grid, first seed): once per method and structure at the middle
size, reused at its other sizes; each MmAP rank / d_s variant gets its own selection, since both
change how the prompt responds to a step.

Every row also gets its size on ViT-B/16 (`mmap_model.params` on random weights, depth 9) with 4 tasks
(Office-Home): "MT" = one shared module, "group+task" = 2 groups of 2 and 4 task modules, d_s scaled
with the width (gcd/2 on the tiny model = gcd/2 on ViT-B/16). PAPER_BUDGET is the paper's share of
the backbone. The report marks the Pareto frontier (no row has fewer parameters and at least its
accuracy) and each method's best row within the paper's budget.

`--shard K/N` runs the K-th of N disjoint parts (whole lr groups) into `<out>/shard-K` (give `--data`:
the shards must not generate the same root at once); `--report` merges every `<out>/shard-*` and
`<out>/results.json` it finds. Without `--shard` the command runs everything and reports.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmap_model import PromptConfig, load_backbone
from mmap_model.params import count

from . import bench, cli, sweep
from .bench import MethodSpec

log = logging.getLogger(__name__)

PAPER_BUDGET = 0.0009  # the paper's trainable share of ViT-B/16 (about 0.09%)
PAPER_MODEL, PAPER_TASKS, PAPER_GROUPS = "ViT-B-16", 4, 2
METHOD_NAMES = {"coop": "CoOp", "vpt": "VPT", "maple": "MaPLe", "independent": "independent", "mmap": "MmAP"}
STRUCTURES = {"MT": False, "group+task": True}  # structure -> task modules
# The goal the frontier tests: MmAP with task modules at MaPLe's accuracy with 10x fewer parameters,
# MaPLe in the structure of the method benchmark's "MaPLe one group" (2 group + 2 task tokens).
GOAL_REFERENCE = "MaPLe group+task n=2"


def frontier_specs(sizes: Sequence[int], ranks: Sequence[int], source_divisors: Sequence[int],
                   methods: Sequence[str] = tuple(METHOD_NAMES)) -> list[MethodSpec]:
    """The sweep's rows; `source_divisors`: d_s as gcd(d_t, d_v) / k. Each lr group's first row selects its lr."""
    middle = sorted(sizes)[len(sizes) // 2]
    ordered = [middle, *(n for n in sizes if n != middle)]
    specs = []
    for method in methods:
        name = METHOD_NAMES[method]
        for structure, task_modules in STRUCTURES.items():
            group = f"{name} {structure}"
            for n in ordered:
                specs.append(_spec(method, structure, task_modules, n, 1, 1, group))
            if method != "mmap":
                continue
            for rank in ranks:
                for k in source_divisors:
                    if (rank, k) != (1, 1):
                        specs.append(_spec(method, structure, task_modules, min(sizes), rank, k, None))
    return specs


def _spec(method: str, structure: str, task_modules: bool, n: int, rank: int, divisor: int,
          lr_key: str | None) -> MethodSpec:
    label = f"{METHOD_NAMES[method]} {structure} n={n}"
    prompt: dict[str, Any] = {"group_tokens": n, "task_tokens": n if task_modules else 0}
    if method == "mmap":
        label += f" r={rank}" + (f" ds=gcd/{divisor}" if divisor > 1 else "")
        prompt |= {"rank": rank, "source_divisor": divisor}  # d_s = gcd(d_t, d_v) / divisor on any backbone
    return MethodSpec(label, "prompts", method, "one", task_modules, tuple(prompt.items()), lr_key)


def paper_sizes(specs: Sequence[MethodSpec]) -> dict[str, dict[str, Any]]:
    """Each row's trainable parameters on ViT-B/16 with the paper's 4 tasks (random weights, no download)."""
    backbone = load_backbone(PAPER_MODEL, None, seed=0)
    out = {}
    for spec in specs:
        cfg = bench.prompt_config_of(spec, PromptConfig(), backbone.widths)
        groups = PAPER_GROUPS if spec.task_modules else 1
        c = count(backbone, PAPER_TASKS, groups, cfg, spec.task_modules)
        out[spec.label] = {"params": c["trainable_params"], "ratio": c["ratio"],
                           "backbone_params": c["backbone_params"]}
    return out


def pareto(points: Sequence[tuple[float, float]]) -> list[bool]:
    """(params, accuracy) -> on the frontier: no other point has <= params and >= accuracy, one strictly."""
    return [not any(q[0] <= p[0] and q[1] >= p[1] and q != p for q in points) for p in points]


def report(out: Path, sizes: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows, meta = sweep.merged_rows(out)
    tasks = sorted(rows[0]["accuracy"])
    summary = bench.summarise(rows, tasks, meta["backbone"]["params"])
    specs = {r["method"]: r["spec"] for r in rows}
    on_front = pareto([(s["params"], s["mean"]) for s in summary])
    for s, front in zip(summary, on_front, strict=True):
        spec = specs[s["method"]]
        s |= {"prompt_method": spec["prompt_method"], "structure": "group+task" if spec["task_modules"] else "MT",
              "prompt": spec["prompt"], "pareto": front, "paper": sizes[s["method"]]}
    for method in METHOD_NAMES:
        within = [s for s in summary if s["prompt_method"] == method and s["paper"]["ratio"] <= PAPER_BUDGET]
        if within:
            max(within, key=lambda s: s["mean"])["best_in_budget"] = True
    (out / "frontier.json").write_text(json.dumps({"command": meta["command"], "code_version": meta["code_version"],
                                                   "settings": meta["settings"], "paper_budget": PAPER_BUDGET,
                                                   "goal": goal(summary), "rows": summary}, indent=1))
    (out / "frontier.md").write_text(table(summary) + "\n")
    plot(summary, out / "frontier.png")
    return summary


def goal(summary: Sequence[dict[str, Any]], reference: str = GOAL_REFERENCE, factor: int = 10) -> dict[str, Any] | None:
    """Does MmAP with task modules reach `reference`'s accuracy with `factor`x fewer parameters? The most
    accurate MmAP group+task row within that parameter budget, and its gap (None: reference not run)."""
    ref = next((s for s in summary if s["method"] == reference), None)
    within = [s for s in summary if s["prompt_method"] == "mmap" and s["structure"] == "group+task"
              and s["params"] * factor <= ref["params"]] if ref else []
    if not within:
        return None
    best = max(within, key=lambda s: s["mean"])
    return {"reference": reference, "reference_mean": ref["mean"], "reference_params": ref["params"],
            "mmap": best["method"], "mmap_mean": best["mean"], "mmap_params": best["params"],
            "gap_points": 100 * (ref["mean"] - best["mean"]), "met": best["mean"] >= ref["mean"],
            "on_frontier": best["pareto"]}


def table(summary: Sequence[dict[str, Any]]) -> str:
    head = ["row", "mean ± std", "trainable params", "% of backbone", "ViT-B/16 params (4 tasks)", "% of ViT-B/16",
            "x paper budget", "lr", "frontier"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for s in sorted(summary, key=lambda s: s["params"]):
        mark = ("yes" if s["pareto"] else "") + (" ★" if s.get("best_in_budget") else "")
        lines.append("| " + " | ".join([
            s["method"], f"**{100 * s['mean']:.1f}** ± {100 * s['std']:.1f}", f"{s['params']:,}",
            f"{s['params_pct']:.3f}", f"{s['paper']['params']:,}", f"{100 * s['paper']['ratio']:.4f}",
            f"{s['paper']['ratio'] / PAPER_BUDGET:.2f}", f"{s['lr']:g}", mark]) + " |")
    return "\n".join(lines)


def plot(summary: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6))
    colours = dict(zip(METHOD_NAMES, plt.get_cmap("tab10").colors, strict=False))
    markers = {"MT": "o", "group+task": "s"}
    for method, name in METHOD_NAMES.items():
        for structure, marker in markers.items():
            mine = sorted((s for s in summary if s["prompt_method"] == method and s["structure"] == structure),
                          key=lambda s: s["params"])
            if mine:
                ax.errorbar([s["params"] for s in mine], [100 * s["mean"] for s in mine],
                            yerr=[100 * s["std"] for s in mine], fmt=marker, color=colours[method], capsize=2,
                            ms=6, alpha=0.85, label=f"{name} {structure}")
    front = sorted((s for s in summary if s["pareto"]), key=lambda s: s["params"])
    ax.step([s["params"] for s in front], [100 * s["mean"] for s in front], where="post", color="black", lw=1,
            label="Pareto frontier")
    best = [s for s in summary if s.get("best_in_budget")]
    ax.scatter([s["params"] for s in best], [100 * s["mean"] for s in best], marker="*", s=180, facecolor="none",
               edgecolor="black", zorder=4, label="best within the paper's budget")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("mean test accuracy over tasks (%) ± std over seeds")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]] | None:
    p = bench.parser("training.frontier", __doc__.splitlines()[0])
    p.set_defaults(out=Path("runs/frontier"))
    p.add_argument("--sizes", type=sweep.int_list, default=[2, 4, 8], help="tokens per module")
    p.add_argument("--ranks", type=sweep.int_list, default=[1, 2, 3], help="MmAP coupling ranks")
    p.add_argument("--source-divisors", type=sweep.int_list, default=[1, 2],
                   help="MmAP d_s values as gcd(d_t, d_v) / k")
    p.add_argument("--prompt-methods", type=cli.comma_list, default=list(METHOD_NAMES),
                   help=f"prompt methods to sweep (default all: {', '.join(METHOD_NAMES)})")
    sweep.add_shard_args(p)
    args = cli.parse_args(p, argv)
    bench.check_args(p, args)
    unknown = set(args.prompt_methods) - set(METHOD_NAMES)
    if unknown:
        p.error(f"unknown prompt methods {sorted(unknown)}; choose from {list(METHOD_NAMES)}")
    cli.setup_logging()
    specs = frontier_specs(args.sizes, args.ranks, args.source_divisors, args.prompt_methods)
    if not args.report:
        sweep.check_shard_data(p, args)
        mine = sweep.shard(specs, args.shard, key=lambda s: s.lr_key or s.label)
        out = args.out
        args.out = sweep.shard_dir(out, args.shard)
        bench.run_specs(args, mine, cli.command_line("training.frontier", argv))
        args.out = out
        if args.shard is not None:
            return None
    summary = report(args.out, paper_sizes(specs))
    print((args.out / "frontier.md").read_text())
    log.info("frontier: %s", [s["method"] for s in summary if s["pareto"]])
    log.info("mean accuracy range %.1f-%.1f", 100 * float(np.min([s["mean"] for s in summary])),
             100 * float(np.max([s["mean"] for s in summary])))
    return summary


if __name__ == "__main__":
    main()
