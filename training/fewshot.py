"""`python -m training.fewshot`: accuracy against labelled images per class (CoOp's few-shot curves).

    python -m training.fewshot --data ROOT [--shots-list 1,2,4,8,16] [--frontier DIR] [--shard K/N] --out DIR
    python -m training.fewshot --report --out DIR [--frontier DIR]

The method benchmark's protocol (`training.bench`) at each number of shots: zero-shot, the linear
probe, CoOp-MT, MaPLe-MT and MmAP-MT, plus MmAP at its best setting of the frontier sweep when
`--frontier` names its output (the most accurate MmAP row on its Pareto frontier, else the most
accurate MmAP row). Every learning rate is picked on the validation split of the first seed at each
shot count (the split is the same for every shot count; only the training sample grows). 16 shots
need 16 training images per class after the test and validation splits: generate the root with
`python -m training.data --data DIR --synthetic 40`.

`--shard K/N` runs part K of the (shots, method) pairs into `<out>/shard-K/<shots>`; `--report` merges
them into `<out>/fewshot.json`, `<out>/fewshot.md` and the plot `<out>/fewshot.png`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import bench, cli, sweep
from .bench import METHOD_SPECS, MethodSpec

log = logging.getLogger(__name__)

CURVE_METHODS = ["zero-shot", "linear probe", "CoOp-MT", "MaPLe-MT", "MmAP-MT"]
BEST_MMAP = "MmAP best frontier setting"


def best_mmap(frontier_dir: Path) -> MethodSpec:
    """MmAP's most accurate row on the frontier sweep's Pareto frontier (else its most accurate row)."""
    rows = [r for r in json.loads((frontier_dir / "frontier.json").read_text())["rows"] if r["prompt_method"] == "mmap"]
    best = max([r for r in rows if r["pareto"]] or rows, key=lambda r: r["mean"])
    return MethodSpec(f"{BEST_MMAP} ({best['method']})", "prompts", "mmap", "one", best["structure"] == "group+task",
                      tuple(best["prompt"].items()))


def curve_specs(frontier_dir: Path | None) -> list[MethodSpec]:
    return [METHOD_SPECS[m] for m in CURVE_METHODS] + ([best_mmap(frontier_dir)] if frontier_dir else [])


def report(out: Path) -> list[dict[str, Any]]:
    summary = []
    for shots_dir in sorted({d.name for d in out.glob("shard-*/*") if d.is_dir()}, key=int):
        rows, meta = sweep.merged_rows(out, f"shard-*/{shots_dir}/results.json")
        tasks = sorted(rows[0]["accuracy"])
        for s in bench.summarise(rows, tasks, meta["backbone"]["params"]):
            summary.append({**s, "shots": int(shots_dir)})
    order = {m: i for i, m in enumerate(CURVE_METHODS)}  # the curves in a fixed order, whatever shard ran them
    summary.sort(key=lambda s: (order.get(s["method"], len(order)), s["shots"]))
    (out / "fewshot.json").write_text(json.dumps({"command": meta["command"], "code_version": meta["code_version"],
                                                  "settings": meta["settings"], "rows": summary}, indent=1))
    (out / "fewshot.md").write_text(table(summary) + "\n")
    plot(summary, out / "fewshot.png")
    return summary


def table(summary: Sequence[dict[str, Any]]) -> str:
    shots = sorted({s["shots"] for s in summary})
    methods = list(dict.fromkeys(s["method"] for s in summary))
    cell = {(s["method"], s["shots"]): s for s in summary}
    lines = ["| method | " + " | ".join(f"{k} shot{'s' if k > 1 else ''}" for k in shots) + " |",
             "|---|" + "---:|" * len(shots)]
    for m in methods:
        values = [cell.get((m, k)) for k in shots]
        lines.append(f"| {m} | " + " | ".join(
            f"{100 * v['mean']:.1f} ± {100 * v['std']:.1f}" + (f" (lr {v['lr']:g})" if v.get("lr") else "")
            if v else "–" for v in values) + " |")
    return "\n".join(lines)


def plot(summary: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for method in dict.fromkeys(s["method"] for s in summary):
        mine = sorted((s for s in summary if s["method"] == method), key=lambda s: s["shots"])
        ax.errorbar([s["shots"] for s in mine], [100 * s["mean"] for s in mine], yerr=[100 * s["std"] for s in mine],
                    marker="o", capsize=3, label=method, ls="--" if method == "zero-shot" else "-")
    ax.set_xscale("log", base=2)
    shots = sorted({s["shots"] for s in summary})
    ax.set_xticks(shots, [str(k) for k in shots])
    ax.set_xlabel("labelled images per class (shots)")
    ax.set_ylabel("mean test accuracy over tasks (%) ± std over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]] | None:
    p = bench.parser("training.fewshot", __doc__.splitlines()[0])
    p.add_argument("--shots-list", type=sweep.int_list, default=[1, 2, 4, 8, 16], help="shots per class to run")
    p.add_argument("--frontier", type=Path, default=None,
                   help="output of training.frontier: add MmAP at its best frontier setting")
    sweep.add_shard_args(p)
    args = cli.parse_args(p, argv)
    bench.check_args(p, args)
    cli.setup_logging()
    if not args.report:
        sweep.check_shard_data(p, args)
        items = [(k, spec) for k in args.shots_list for spec in curve_specs(args.frontier)]
        mine = sweep.shard(items, args.shard)
        out, command = args.out, cli.command_line("training.fewshot", argv)
        for k in dict.fromkeys(k for k, _ in mine):
            args.shots, args.out = k, sweep.shard_dir(out, args.shard or (0, 1)) / str(k)
            bench.run_specs(args, [spec for shots, spec in mine if shots == k], command)
        args.out = out
        if args.shard is not None:
            return None
    summary = report(args.out)
    print((args.out / "fewshot.md").read_text())
    return summary


if __name__ == "__main__":
    main()
