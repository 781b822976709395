"""`python -m training.bench`: docs/method.md's method comparison on one data root, several seeds.

    python -m training.bench [--data ROOT] [--tasks a,b] [--model NAME --pretrained TAG] [--shots K]
        [--steps N] [--seeds 0,1,2] [--methods ...] --out DIR

Methods (same data, same k-shot sample per seed, same test split, same steps and batch for every
gradient-trained method):
zero-shot (the task's hand-written template), CoOp-MT, VPT-MT, MaPLe-MT, independent-MT (one
module shared by all tasks with group_tokens + task_tokens tokens, so every task sees as many
prompt tokens as under MmAP), MmAP-ST (task modules only), MmAP one group, MmAP-MT (the
gradient-driven grouping, its cost included in the time), linear probe (L-BFGS heads on frozen
features), full fine-tuning (multi-task; image tower trains against frozen class-text embeddings).
Structure-matched controls, run on request (`--methods`): MaPLe / independent with MmAP-one-group's
structure ("MaPLe one group", "independent one group") and MmAP with the -MT baselines' structure
("MmAP shared only").

Learning rates: every method that trains with one gets its own, chosen from a grid (`--lr-grid`
for the prompt methods, `--finetune-lr-grid` for full fine-tuning) by mean VALIDATION accuracy on
the first seed; that run is kept (scored on test) and the other seeds reuse the chosen value.
Linear probe chooses its L2 strength on the same validation split. Pass `--lr-grid ''` to use
`--lr` for every prompt method instead.

Without `--data` the synthetic stand-in is generated (`training.data.prepare_synthetic`) into
`<out>/data`; with a real root (e.g. Office-Home) and real weights
(`--model ViT-B-16 --pretrained openai`) the same command runs unchanged.

Writes `<out>/results.json` (every run), `<out>/table.md` (per-task accuracy averaged over seeds,
mean ± std over seeds of the task-mean, trainable parameters absolute and as % of the backbone,
training time and training throughput) and `<out>/accuracy.png`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from mmap_model import PromptConfig, Widths, count_parameters

from . import cli
from .affinity import group_tasks
from .baselines import FineTuneClassifier, fit_linear_probe
from .classifiers import MultiTaskObjective, PromptClassifier, TaskClassifier, accuracy
from .configs import HelpFormatter
from .data import discover_tasks, load_splits, prepare_synthetic
from .steps import build_prompts, named_groups, train_prompts
from .trainer import TrainConfig, Trainer, autocast_factory

log = logging.getLogger(__name__)

BENCH_SHOTS = 8  # images per class and task, unless --shots or --fraction says otherwise
BENCH_LR = TrainConfig.lr  # AdamW lr of every prompt method
BENCH_FINETUNE_LR = 3e-4  # AdamW lr of full fine-tuning
# Every method that trains with a learning rate gets its own, picked from a grid on the
# validation split of the first seed (the same protocol for prompts and full fine-tuning).
BENCH_LR_GRID = ["0.003", "0.01", "0.03"]
BENCH_FINETUNE_LR_GRID = ["0.0001", "0.0003", "0.001"]
# One thread: on the shared 2-core box a tiny-model step ran 3-7x faster on one thread than on two
# (idle OpenMP threads spin against the other processes). Raise --threads on a dedicated machine.
BENCH_THREADS = 1


@dataclass(frozen=True)
class MethodSpec:
    """One row of the comparison."""

    label: str
    runner: str  # key of RUNNERS
    prompt_method: str | None = None
    groups: str | None = None  # one | none | auto (prompt runners)
    task_modules: bool = True
    prompt: tuple[tuple[str, Any], ...] = ()  # PromptConfig fields set for this row (sizes: tokens, rank, source_dim)
    lr_key: str | None = None  # rows with the same key share one learning-rate selection (default: the label)


METHOD_SPECS: dict[str, MethodSpec] = {s.label: s for s in [
    MethodSpec("zero-shot", "zero_shot"),
    MethodSpec("CoOp-MT", "prompts", "coop", "one", False),
    MethodSpec("VPT-MT", "prompts", "vpt", "one", False),
    MethodSpec("MaPLe-MT", "prompts", "maple", "one", False),
    MethodSpec("independent-MT", "prompts", "independent", "one", False),
    MethodSpec("MmAP-ST", "prompts", "mmap", "none", True),
    MethodSpec("MmAP one group", "prompts", "mmap", "one", True),
    MethodSpec("MmAP-MT", "prompts", "mmap", "auto", True),
    MethodSpec("linear probe", "linear_probe"),
    MethodSpec("full fine-tuning-MT", "finetune"),
    # Structure-matched controls (not in the default run): the baselines with MmAP-one-group's
    # structure (group module + task modules), and MmAP with the -MT baselines' structure.
    MethodSpec("MaPLe one group", "prompts", "maple", "one", True),
    MethodSpec("independent one group", "prompts", "independent", "one", True),
    MethodSpec("MmAP shared only", "prompts", "mmap", "one", False),
]}
DEFAULT_METHODS = list(METHOD_SPECS)[:10]  # docs/method.md's comparison


@dataclass
class Outcome:
    classifier: TaskClassifier
    seconds: float
    images_per_second: float | None = None
    extra: dict[str, Any] | None = None


@dataclass(frozen=True)
class BenchSettings:
    """What every run of one seed shares; `train.lr` is set per method before a runner is called."""

    prompt: PromptConfig
    train: TrainConfig
    grouping: Any
    progress: bool


def run_zero_shot(run: cli.Run, spec: MethodSpec, s: BenchSettings) -> Outcome:
    return Outcome(PromptClassifier(run.backbone, run.texts, None), 0.0)


def prompt_config_of(spec: MethodSpec, base: PromptConfig, widths: Widths) -> PromptConfig:
    """The prompt settings of a prompt row on a backbone of these widths: `base` with the row's method,
    structure and sizes. A `source_divisor` k in the sizes sets MmAP's d_s to gcd(d_t, d_v) / k."""
    cfg = base.for_method(spec.prompt_method)  # the base's MmAP settings do not carry over to other methods
    if not spec.task_modules:  # the shared module gets the tokens a grouped task would have
        cfg = replace(cfg, group_tokens=cfg.group_tokens + cfg.task_tokens)
    sizes = dict(spec.prompt)
    divisor = sizes.pop("source_divisor", None)
    if divisor is not None:
        sizes["source_dim"] = math.gcd(widths.d_t, widths.d_v) // divisor
    return replace(cfg, **sizes)


def run_prompts(run: cli.Run, spec: MethodSpec, s: BenchSettings) -> Outcome:
    start = time.perf_counter()
    cfg = prompt_config_of(spec, s.prompt, run.backbone.widths)
    names = [t.name for t in run.tasks]
    extra: dict[str, Any] = {}
    if spec.groups == "auto":
        grouping = group_tasks(run.backbone, run.texts, run.sets["train"], cfg, s.train, s.grouping, run.dist,
                               s.progress)
        groups = named_groups(grouping.groups)
        extra = {"groups": grouping.groups, "affinity": grouping.affinity,
                 "grouping_seconds": grouping.settings["seconds"]}
    else:
        groups = {"all": names} if spec.groups == "one" else {}
    prompts = build_prompts(run, cfg, groups, spec.task_modules, s.train.seed)
    classifier, result = train_prompts(run, prompts, s.train, progress=s.progress, validate=False)
    return Outcome(classifier, time.perf_counter() - start, result.images_per_second, extra)


def run_linear_probe(run: cli.Run, spec: MethodSpec, s: BenchSettings) -> Outcome:
    classifier, info = fit_linear_probe(run.backbone, run.texts, run.sets["train"], run.sets["val"])
    return Outcome(classifier, info["seconds"], None,
                   {"weight_decay": {t: v["weight_decay"] for t, v in info["tasks"].items()}})


def run_finetune(run: cli.Run, spec: MethodSpec, s: BenchSettings) -> Outcome:
    start = time.perf_counter()
    classifier = FineTuneClassifier(run.backbone, run.texts)
    trainer = Trainer(MultiTaskObjective(classifier), run.sets["train"], s.train, dist=run.dist, progress=s.progress)
    result = trainer.fit()
    return Outcome(classifier, time.perf_counter() - start, result.images_per_second)


RUNNERS: dict[str, Callable[[cli.Run, MethodSpec, BenchSettings], Outcome]] = {
    "zero_shot": run_zero_shot, "prompts": run_prompts, "linear_probe": run_linear_probe, "finetune": run_finetune,
}
LR_OPTION = {"prompts": "lr", "finetune": "finetune_lr"}  # runners that take a learning rate, and its option


def select_lr(run: cli.Run, spec: MethodSpec, s: BenchSettings,
              grid: Sequence[float]) -> tuple[float, dict[str, float], Outcome]:
    """The grid value with the best mean VALIDATION accuracy (ties: the smaller lr), its scores,
    and the run trained with it (the caller scores that run on test instead of training it again)."""
    scores, outcomes = {}, {}
    for lr in grid:
        outcomes[lr] = RUNNERS[spec.runner](run, spec, replace(s, train=replace(s.train, lr=lr)))
        scores[repr(lr)] = float(np.mean(list(accuracy(outcomes[lr].classifier, run.sets["val"],
                                                       s.train.eval_batch_size, run.dist).values())))
        log.info("  lr %g: val %.3f", lr, scores[repr(lr)])
    # Rounded: accuracies summed in another order must not break a tie between equal counts.
    best = max(grid, key=lambda lr: (round(scores[repr(lr)], 9), -lr))
    return best, scores, outcomes[best]


def summarise(rows: list[dict[str, Any]], tasks: list[str], backbone_params: int) -> list[dict[str, Any]]:
    """Per method: per-task accuracy (mean over seeds), mean ± std over seeds of the task mean."""
    out = []
    for label in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == label]
        task_means = [float(np.mean([r["accuracy"][t] for t in tasks])) for r in mine]
        out.append({
            "method": label, "seeds": [r["seed"] for r in mine],
            "per_task": {t: float(np.mean([r["accuracy"][t] for r in mine])) for t in tasks},
            "mean": float(np.mean(task_means)), "std": float(statistics.stdev(task_means)) if len(mine) > 1 else 0.0,
            "params": int(np.mean([r["params"] for r in mine])),
            "params_pct": 100 * float(np.mean([r["params"] for r in mine])) / backbone_params,
            "seconds": float(np.mean([r["seconds"] for r in mine])),
            "lr": mine[0].get("lr"),
            "images_per_second": (float(np.mean([r["images_per_second"] for r in mine]))
                                  if mine[0]["images_per_second"] else None),
        })
    return out


def markdown_table(summary: list[dict[str, Any]], tasks: list[str]) -> str:
    head = ["method", *tasks, "mean ± std", "trainable params", "% of backbone", "lr", "train time (s)", "train img/s"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for s in summary:
        cells = [s["method"], *(f"{100 * s['per_task'][t]:.1f}" for t in tasks),
                 f"**{100 * s['mean']:.1f}** ± {100 * s['std']:.1f}", f"{s['params']:,}", f"{s['params_pct']:.3f}",
                 f"{s['lr']:g}" if s.get("lr") else "–",
                 f"{s['seconds']:.0f}", f"{s['images_per_second']:.0f}" if s["images_per_second"] else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bar_chart(summary: list[dict[str, Any]], tasks: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [s["method"] for s in summary]
    fig, ax = plt.subplots(figsize=(max(9, 1.0 * len(labels) + 2), 4.8))
    x = np.arange(len(labels))
    ax.bar(x, [100 * s["mean"] for s in summary], yerr=[100 * s["std"] for s in summary], capsize=3,
           color="#9bbcd1", label="mean over tasks\n(± std over seeds)")
    for k, t in enumerate(tasks):
        jitter = (k - (len(tasks) - 1) / 2) * 0.08
        ax.scatter(x + jitter, [100 * s["per_task"][t] for s in summary], s=14, zorder=3, label=t)
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_ylabel("test accuracy (%)")
    lowest = min(100 * min([s["mean"], *s["per_task"].values()]) for s in summary)
    ax.set_ylim(max(0, 10 * np.floor(lowest / 10) - 5), 100)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never over the data
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parser(module: str, description: str) -> argparse.ArgumentParser:
    """The benchmark's options (data, backbone, prompt, training, grouping, lr grids, seeds, out): shared by
    `training.bench` and the sweeps built on it (`training.frontier`, `training.fewshot`)."""
    p = argparse.ArgumentParser(prog=f"python -m {module}", description=description,
                                formatter_class=HelpFormatter)
    cli.add_data_args(p, required=False)
    cli.add_backbone_args(p)
    cli.add_prompt_args(p)
    cli.add_train_args(p)
    cli.add_grouping_args(p, count_flag="--num-groups")
    p.set_defaults(steps=60, batch_size=16, quiet=True, lr=BENCH_LR, threads=BENCH_THREADS)
    p.add_argument("--progress", dest="quiet", action="store_false", help="progress bars (off by default here)")
    p.add_argument("--finetune-lr", type=float, default=BENCH_FINETUNE_LR, help="AdamW lr of full fine-tuning")
    p.add_argument("--lr-grid", type=cli.comma_list, default=BENCH_LR_GRID,
                   help="select each prompt method's lr from these on the validation split of the first seed "
                        "('' = use --lr for all)")
    p.add_argument("--finetune-lr-grid", type=cli.comma_list, default=BENCH_FINETUNE_LR_GRID,
                   help="the same for full fine-tuning ('' = use --finetune-lr)")
    p.add_argument("--seeds", type=cli.comma_list, default=["0", "1", "2"])
    p.add_argument("--synthetic-per-class", type=int, default=24, help="images per class when --data is omitted")
    p.add_argument("--out", type=Path, default=Path(f"runs/{module.split('.')[-1]}"))
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.shots is None and args.fraction is None:
        args.shots = BENCH_SHOTS
    if args.val_fraction == 0:
        p.error("the benchmark picks learning rates and the linear probe's weight decay on the validation split: "
                "--val-fraction must be > 0")


def run_specs(args: argparse.Namespace, specs: Sequence[MethodSpec],
              command: str) -> tuple[list[dict[str, Any]], cli.Run]:
    """Every spec on every seed of `args.seeds`; rows of test accuracy, parameters and time.

    A spec's lr is selected on the first seed's validation split from the grid of its runner (once per lr
    key), or is the runner's fixed lr option without a grid. `<out>/results.json` is rewritten after every row.
    """
    args.out.mkdir(parents=True, exist_ok=True)
    if args.data is None:
        args.data = prepare_synthetic(args.out / "data", args.synthetic_per_class)
    settings = BenchSettings(cli.prompt_config(args), cli.train_config(args), cli.grouping_config(args), not args.quiet)
    grids = {"lr": args.lr_grid, "finetune_lr": args.finetune_lr_grid}
    lrs: dict[str, float] = {}
    selection: dict[str, dict[str, float]] = {}
    rows: list[dict[str, Any]] = []
    run = None
    for seed in map(int, args.seeds):
        args.seed = seed
        if run is None:
            run = cli.prepare(args)
        else:  # same backbone and process group; the k-shot sample changes with the seed
            tasks = discover_tasks(args.data, args.tasks, run.split, seed, args.classnames, args.templates)
            run = replace(run, tasks=tasks, sets=load_splits(tasks, run.backbone.preprocess,
                                                             cache_bytes=int(args.cache_gb * (1 << 30))))
        s = replace(settings, train=replace(settings.train, seed=seed))
        autocast = autocast_factory(s.train.amp, run.dist.device)
        for spec in specs:
            key = spec.lr_key or spec.label
            option = LR_OPTION.get(spec.runner)
            grid = grids.get(option or "")
            log.info("seed %d: %s", seed, spec.label)
            if option and key not in lrs and grid:  # selected once, on the first seed's validation split
                lrs[key], selection[key], outcome = select_lr(run, spec, s, [float(v) for v in grid])
            else:
                lr = lrs.setdefault(key, getattr(args, option)) if option else s.train.lr
                outcome = RUNNERS[spec.runner](run, spec, replace(s, train=replace(s.train, lr=lr)))
            acc = accuracy(outcome.classifier, run.sets["test"], s.train.eval_batch_size, run.dist, autocast)
            rows.append({"method": spec.label, "seed": seed, "accuracy": acc,
                         "params": outcome.classifier.trainable_parameters(),
                         "seconds": outcome.seconds, "images_per_second": outcome.images_per_second,
                         "lr": lrs.get(key) if option else None, "extra": outcome.extra,
                         "spec": {**asdict(spec), "prompt": dict(spec.prompt)}})
            log.info("  test mean %.3f in %.0fs", float(np.mean(list(acc.values()))), outcome.seconds)
            (args.out / "results.json").write_text(json.dumps(
                {"command": command, "code_version": cli.code_version(),
                 "settings": {"train": asdict(s.train), "prompt": asdict(settings.prompt), "lr": lrs,
                              "lr_selection_on_val": selection, "grouping": asdict(settings.grouping),
                              "data": str(args.data), "split": asdict(run.split)},
                 "backbone": {"model": args.model, "pretrained": args.pretrained,
                              "params": count_parameters(run.backbone.model)},
                 "rows": rows}, indent=1))
    assert run is not None
    return rows, run


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    p = parser("training.bench", __doc__.splitlines()[0])
    p.add_argument("--methods", type=cli.comma_list, default=DEFAULT_METHODS,
                   help=f"comma-separated labels (default: docs/method.md's ten); all: {', '.join(METHOD_SPECS)}")
    args = cli.parse_args(p, argv)
    check_args(p, args)
    unknown = [m for m in args.methods if m not in METHOD_SPECS]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {list(METHOD_SPECS)}")
    cli.setup_logging()
    rows, run = run_specs(args, [METHOD_SPECS[m] for m in args.methods], cli.command_line("training.bench", argv))
    tasks = [t.name for t in run.tasks]
    summary = summarise(rows, tasks, count_parameters(run.backbone.model))
    table = markdown_table(summary, tasks)
    (args.out / "table.md").write_text(table + "\n")
    bar_chart(summary, tasks, args.out / "accuracy.png")
    print(table)
    return summary


if __name__ == "__main__":
    main()
