"""`python -m training.evaluate --data ROOT --promptsets DIR [DIR ...]`: per-task test accuracy.

Each DIR is a prompt set or a directory of prompt sets (what `training.fit --out` writes). The
backbone is the one the first set was trained on (`--model/--pretrained` override it; every set
is checked against its fingerprint). The test split is rebuilt from the split settings recorded
in each set's provenance (so it is the split the set was scored on at training time), else from
the command-line split options. Zero-shot accuracy (the task's own template, no prompts) is
reported alongside. Class names come from the folders, mapped by `--classnames` (default: the
file the set was trained with, when provenance records one). Calibration per task: NLL and ECE (15
equal-width bins over the top-1 confidence) with the raw scores and with the task's temperature
(`mmap_model.calibration`; 1 where the set has none); `--reliability PNG` draws the reliability
diagrams, a panel per task (sets sharing a task are pooled). Prints a markdown table; `--json
FILE` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from mmap_model import PromptSet
from mmap_model.promptset import CONFIG_FILE

from . import cli
from .calibrate import Scores, measure, reliability_figure, task_scores
from .classifiers import PromptClassifier, TaskText, accuracy
from .configs import HelpFormatter
from .data import SplitConfig, discover_tasks, load_splits
from .errors import DataError, MissingData

log = logging.getLogger(__name__)


def find_promptsets(paths: Sequence[Path]) -> list[Path]:
    """Prompt-set directories named directly or found one level below the given paths."""
    found: list[Path] = []
    for path in paths:
        if (path / CONFIG_FILE).is_file():
            found.append(path)
        else:
            found.extend(sorted(p.parent for p in path.glob(f"*/{CONFIG_FILE}")))
    if not found:
        raise MissingData(f"no prompt sets in {', '.join(map(str, paths))}")
    return found


def recorded_split(meta: dict[str, Any], fallback: SplitConfig) -> SplitConfig:
    recorded = (meta.get("provenance") or {}).get("data", {}).get("split")
    if not isinstance(recorded, dict):
        return fallback
    known = {f.name for f in fields(SplitConfig)}
    return SplitConfig(**{k: v for k, v in recorded.items() if k in known})


def recorded_classnames(meta: dict[str, Any]) -> Path | None:
    recorded = (meta.get("provenance") or {}).get("data", {}).get("classnames_file")
    return Path(recorded) if isinstance(recorded, str) and Path(recorded).is_file() else None


def evaluate(root: Path, set_dirs: Sequence[Path], model: str | None = None, pretrained: str | None = None,
             device: str = "cpu", fallback_split: SplitConfig | None = None, templates: Path | None = None,
             batch_size: int = 256, classnames: Path | None = None, split: SplitConfig | None = None,
             reliability: Path | None = None) -> list[dict[str, Any]]:
    """One row per (prompt set, task found in the root): accuracy with prompts and zero-shot, and NLL and ECE
    before and after the task's temperature. `split`: this one for every set (comparing sets on the same images),
    instead of each set's recorded split. `reliability`: write the reliability diagrams there (PNG)."""
    metas = [json.loads((d / CONFIG_FILE).read_text()) for d in set_dirs]
    if model is None:
        model, pretrained = metas[0]["backbone"]["model"], metas[0]["backbone"]["pretrained"]
    backbone = cli.backbone_from(model, pretrained, device)
    rows = []
    panels: dict[str, list[tuple[Scores, float]]] = {}
    for directory, meta in zip(set_dirs, metas, strict=True):
        ps = PromptSet.load(directory, backbone)
        names_file = classnames or recorded_classnames(meta)
        tasks = discover_tasks(root, None, split or recorded_split(meta, fallback_split or SplitConfig()),
                               classnames_file=names_file, templates_file=templates)
        present = [t for t in tasks if t.name in ps.tasks]
        missing = sorted(set(ps.tasks) - {t.name for t in present})
        if missing:
            log.warning("%s: tasks %s are not in %s", directory, missing, root)
        for task in present:
            if task.classnames != ps.tasks[task.name].classnames:
                raise DataError(f"{directory}: task {task.name!r} classes differ from the folders in {root} "
                                 f"(class names from {names_file or 'the folder names'}; --classnames picks the file)")
        sets = load_splits(present, backbone.preprocess, ("test",))["test"]
        texts = {t.name: TaskText(ps.tasks[t.name].classnames, ps.tasks[t.name].template) for t in present}
        scores = task_scores(PromptClassifier(backbone, texts, ps.prompts), sets, batch_size)
        zero_shot = accuracy(PromptClassifier(backbone, texts, None), sets, batch_size)
        for t in present:
            temperature = ps.tasks[t.name].temperature
            metrics = measure(scores[t.name], temperature)
            panels.setdefault(t.name, []).append((scores[t.name], temperature))
            rows.append({"promptset": ps.name, "version": ps.version, "method": ps.method, "task": t.name,
                         "group": ps.tasks[t.name].group, "test_images": len(sets[t.name]),
                         "zero_shot": zero_shot[t.name], "accuracy": metrics["accuracy"],
                         "temperature": temperature, "min_score": ps.tasks[t.name].min_score,
                         **{k: metrics[k] for k in ("nll", "nll_calibrated", "ece", "ece_calibrated")}})
    if reliability is not None and panels:
        reliability_figure(panels, reliability, title="test split, before and after temperature scaling")
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| task | prompt set | method | test images | zero-shot | prompted | Δ | T | NLL | NLL (T) | ECE "
             "| ECE (T) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['promptset']} | {r['method']} | {r['test_images']} | "
                     f"{100 * r['zero_shot']:.1f} | {100 * r['accuracy']:.1f} | "
                     f"{100 * (r['accuracy'] - r['zero_shot']):+.1f} | {r['temperature']:.3g} | {r['nll']:.3f} | "
                     f"{r['nll_calibrated']:.3f} | {r['ece']:.3f} | {r['ece_calibrated']:.3f} |")
    if rows:
        mean = {k: sum(r[k] for r in rows) / len(rows)
                for k in ("zero_shot", "accuracy", "nll", "nll_calibrated", "ece", "ece_calibrated")}
        lines.append(f"| **mean** | | | | {100 * mean['zero_shot']:.1f} | {100 * mean['accuracy']:.1f} | "
                     f"{100 * (mean['accuracy'] - mean['zero_shot']):+.1f} | | {mean['nll']:.3f} | "
                     f"{mean['nll_calibrated']:.3f} | {mean['ece']:.3f} | {mean['ece_calibrated']:.3f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--promptsets", type=Path, nargs="+", required=True, help="prompt-set dirs or dirs of them")
    parser.add_argument("--model", default=None, help="override the backbone recorded in the prompt sets")
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    parser.add_argument("--templates", type=Path, default=None, help="only matters for reading the root")
    parser.add_argument("--classnames", type=Path, default=None,
                        help="JSON {class_folder: class name} (default: the one recorded in the set's provenance)")
    parser.add_argument("--test-fraction", type=float, default=SplitConfig.test_fraction,
                        help="when provenance has no split")
    parser.add_argument("--split-seed", type=int, default=SplitConfig.split_seed, help="when provenance has no split")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    parser.add_argument("--reliability", type=Path, default=None,
                        help="write the reliability diagrams (a panel per task, before and after calibration) "
                             "to this PNG")
    args = parser.parse_args(argv)
    cli.setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    with cli.user_errors(OSError, json.JSONDecodeError):
        rows = evaluate(args.data, find_promptsets(args.promptsets), args.model, args.pretrained, args.device,
                        SplitConfig(test_fraction=args.test_fraction, split_seed=args.split_seed), args.templates,
                        classnames=args.classnames, reliability=args.reliability)
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
