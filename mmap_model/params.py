"""Parameter accounting: `python -m mmap_model.params --model ViT-B-16 --method mmap --tasks 4 --groups 2`.

Builds the backbone with random weights (no download) and a multi-task prompt set with the
default hyper-parameters of `PromptConfig`, then reports backbone parameters, trainable prompt
parameters and their ratio (a fraction; 0.0009 = 0.09%).
"""

from __future__ import annotations

import argparse
import json

from .backbone import EMBEDDED_MODEL, Backbone, count_parameters, load_backbone
from .prompts import METHODS, MultiTaskPrompts, PromptConfig


def split_groups(tasks: list[str], n_groups: int) -> dict[str, list[str]]:
    """Tasks dealt round-robin into n groups (the count is what matters here, not the partition)."""
    return {f"g{i}": tasks[i::n_groups] for i in range(n_groups) if tasks[i::n_groups]}


def count(model: str | Backbone, n_tasks: int, n_groups: int, cfg: PromptConfig, task_modules: bool = True) -> dict:
    """Trainable prompt parameters of `cfg` for n tasks dealt into n groups (a Backbone is reused, a name is built)."""
    backbone = load_backbone(model, None) if isinstance(model, str) else model
    tasks = [f"task{i}" for i in range(n_tasks)]
    prompts = MultiTaskPrompts(cfg, backbone.widths, tasks, split_groups(tasks, n_groups), task_modules)
    total = count_parameters(backbone.model)
    trainable = prompts.trainable_parameters()
    return {"model": backbone.model_name, "method": cfg.method, "tasks": n_tasks, "groups": n_groups,
            "task_modules": task_modules, "config": prompts.cfg.to_dict(),
            "backbone_params": total, "trainable_params": trainable, "ratio": trainable / total}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=EMBEDDED_MODEL, help="open_clip model name (random weights)")
    parser.add_argument("--method", default="mmap", choices=sorted(METHODS))
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--groups", type=int, default=2, help="0 = task modules only")
    parser.add_argument("--group-tokens", type=int, default=PromptConfig.group_tokens)
    parser.add_argument("--task-tokens", type=int, default=PromptConfig.task_tokens, help="0 = no task modules")
    parser.add_argument("--rank", type=int, default=PromptConfig.rank, help="MmAP's coupling rank r")
    parser.add_argument("--source-dim", type=int, default=None, help="MmAP's d_s (default gcd(d_t, d_v))")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.tasks < 1 or not 0 <= args.groups <= args.tasks:
        parser.error("need --tasks >= 1 and 0 <= --groups <= --tasks")
    try:
        cfg = PromptConfig(method=args.method, group_tokens=args.group_tokens, task_tokens=args.task_tokens,
                           rank=args.rank, source_dim=args.source_dim)
    except ValueError as e:  # e.g. --rank with a method other than mmap
        parser.error(str(e))
    result = count(args.model, args.tasks, args.groups, cfg, task_modules=args.task_tokens > 0)
    if args.json:
        print(json.dumps(result))
        return
    print(f"backbone   {args.model}: {result['backbone_params']:,} parameters (frozen)")
    print(f"prompts    {args.method}, {args.tasks} tasks in {args.groups} groups: "
          f"{result['trainable_params']:,} trainable")
    print(f"ratio      {result['ratio']:.6f} ({100 * result['ratio']:.4f}% of the backbone)")


if __name__ == "__main__":
    main()
