"""`python -m training.publish CANDIDATE --to DIR --data ROOT`: publish a prompt set only if it is not worse.

1. Finds the live set of each of the candidate's tasks in DIR: the one the service serves it from
   (the newest publication, `mmap_model.promptset.serving`).
2. Evaluates the candidate and those live sets on the same held-out split: the candidate's recorded
   test split of ROOT (its provenance), the same images for both.
3. Refuses (exit status 1, nothing written) when the candidate is worse than the live set on any task
   by more than `--tolerance` (accuracy, absolute), unless `--force`.
4. Publishes atomically (`PromptSet.publish`: written beside DIR's sets under a hidden name, then one
   rename), samples included. A set of the same name is replaced; no other set is touched. A watching
   service swaps it in; under another name it takes over the tasks it defines (newest publication).

Prints the comparison as a table, then one JSON line: what was decided and why.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mmap_model import PromptSet
from mmap_model.promptset import CONFIG_FILE, serving

from . import cli
from .configs import HelpFormatter
from .data import SplitConfig
from .errors import MissingData
from .evaluate import evaluate, recorded_split

DEFAULT_TOLERANCE = 0.01


def compare(candidate: Path, live: dict[str, Path], root: Path, device: str) -> list[dict[str, Any]]:
    """Per task of the candidate: its accuracy and the live set's, on the candidate's test split."""
    meta = json.loads((candidate / CONFIG_FILE).read_text())
    versions = {d: PromptSet.load(d).version for d in {candidate, *live.values()}}  # content digests
    rows = evaluate(root, [candidate, *sorted(set(live.values()) - {candidate})], device=device,
                    split=recorded_split(meta, SplitConfig()))
    by_version = {(r["version"], r["task"]): r for r in rows}
    table = []
    for task in sorted(t for v, t in by_version if v == versions[candidate]):
        mine = by_version[(versions[candidate], task)]
        theirs = by_version.get((versions[live[task]], task)) if task in live else None
        table.append({"task": task, "candidate": mine["accuracy"], "test_images": mine["test_images"],
                      "live_set": live[task].name if theirs else None, "live": theirs["accuracy"] if theirs else None,
                      "rows": [mine, *([theirs] if theirs else [])]})
    return table


def markdown_table(table: list[dict[str, Any]]) -> str:
    """The comparison, a task per row: the candidate's accuracy beside the live set's. Each side's mean is its own
    column's mean, never the two pooled; when live sets cover only some tasks, a second row compares the candidate
    with them on those tasks alone."""
    lines = ["| task | test images | zero-shot | candidate | live | live set | Δ |",
             "|---|---:|---:|---:|---:|---|---:|"]

    def pct(value: float | None, sign: str = "") -> str:
        return "" if value is None else f"{100 * value:{sign}.1f}"

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    for r in table:
        delta = None if r["live"] is None else r["candidate"] - r["live"]
        lines.append(f"| {r['task']} | {r['test_images']} | {pct(r['rows'][0]['zero_shot'])} | {pct(r['candidate'])} | "
                     f"{pct(r['live'])} | {r['live_set'] or '(none)'} | {pct(delta, '+')} |")
    paired = [r for r in table if r["live"] is not None]
    means = [("**mean**", table, len(paired) == len(table))]
    if paired and len(paired) < len(table):
        means.append((f"**mean, the {len(paired)} of {len(table)} tasks with a live set**", paired, True))
    for label, rows, with_live in means:
        if not rows:
            continue
        candidate = mean([r["candidate"] for r in rows])
        live = mean([r["live"] for r in rows]) if with_live else None
        lines.append(f"| {label} | {sum(r['test_images'] for r in rows)} | "
                     f"{pct(mean([r['rows'][0]['zero_shot'] for r in rows]))} | {pct(candidate)} | {pct(live)} | | "
                     f"{pct(None if live is None else candidate - live, '+')} |")
    return "\n".join(lines)


def decide(table: list[dict[str, Any]], tolerance: float) -> list[str]:
    """Why the candidate must not replace what serves (empty: it may)."""
    return [f"{r['task']}: {100 * r['candidate']:.1f}% < live {r['live_set']} {100 * r['live']:.1f}% - "
            f"{100 * tolerance:.1f}" for r in table if r["live"] is not None and r["candidate"] < r["live"] - tolerance]


def publish(candidate: Path, to: Path, name: str | None = None) -> Path:
    ps = PromptSet.load(candidate)
    samples = candidate / "samples"

    def fill(directory: Path) -> None:
        if samples.is_dir():
            shutil.copytree(samples, directory / "samples")

    return ps.publish(to, name, fill=fill)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m training.publish", description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("candidate", type=Path, help="a prompt-set directory (what training.fit --out holds)")
    parser.add_argument("--to", type=Path, required=True, help="the prompt directory a service watches")
    parser.add_argument("--data", type=Path, required=True, help="the data root the candidate was trained on")
    parser.add_argument("--name", default=None, help="publish under this name (default: the candidate's)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="how much lower a task's accuracy may be than the live set's (absolute, 0.01 = 1 point; "
                             "negative: the candidate must be better by that much)")
    parser.add_argument("--force", action="store_true", help="publish even if worse")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    args = parser.parse_args(argv)
    cli.setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    with cli.user_errors(OSError, json.JSONDecodeError):
        if not (args.candidate / CONFIG_FILE).is_file():
            raise MissingData(f"{args.candidate} is not a prompt set (no {CONFIG_FILE})")
        candidate = PromptSet.load(args.candidate)
        live = {t: d for t, d in serving(args.to).items() if t in candidate.tasks} if args.to.is_dir() else {}
        table = compare(args.candidate, live, args.data, args.device)
        print(markdown_table(table))
        worse = decide(table, args.tolerance)
        if worse and not args.force:
            result = {"published": False, "reason": "worse than the live set", "worse": worse}
            print(json.dumps(result))
            raise SystemExit(1)
        written = publish(args.candidate, args.to, args.name)
    result = {"published": True, "path": str(written), "version": candidate.version, "forced": bool(worse),
              "worse": worse, "replaces": sorted({d.name for d in live.values()})}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
