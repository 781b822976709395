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

Rollouts on live traffic (docs/architecture.md, "Rollouts"; README, "Rolling out a prompt set"):
`--canary PCT` or `--shadow PCT` publish the candidate beside the live sets without taking their tasks: a rollout
record per task (`DIR/_rollouts/<task>.json`) is written first, then the set. `--promote` lets the candidate take
its tasks, `--abort` stops its traffic (both in one step, every instance following the directory); `--status`
prints the records and, with `--service URL`, the evidence the service counted (requests and mean top-1 score per
version, shadow agreement).
"""

from __future__ import annotations

import argparse
import json
import shutil
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from mmap_model import PromptSet, rollouts
from mmap_model.promptset import CONFIG_FILE, serving
from mmap_model.rollouts import RolloutError

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


def held_out(to: Path) -> dict[str, str]:
    """{task: candidate} of the directory's rollout records: those sets do not serve the task (`serving`)."""
    return {task: r.candidate for task, r in rollouts.read_all(to)[0].items()}


def start_rollouts(name: str, tasks: list[str], to: Path, live: dict[str, Path], mode: str, share: float,
                   abort_below: float | None, min_requests: int) -> list[str]:
    """A record for each task (before the set is published: it never takes them); refused when a task has no live
    set to roll out against."""
    alone = [t for t in tasks if t not in live]
    if alone:
        raise RolloutError(f"nothing in {to} serves {', '.join(alone)}: publish without --{mode} to serve "
                           f"{'them' if len(alone) > 1 else 'it'}")
    for task in tasks:
        rollouts.start(to, task, name, mode, share, abort_below, min_requests)
    return tasks


def end_rollouts(name: str, to: Path, action: str) -> list[str]:
    """Promote or abort every rollout of candidate `name` in `to`; the tasks."""
    records, _ = rollouts.read_all(to)
    tasks = sorted(t for t, r in records.items() if r.candidate == name and r.mode != "aborted")
    if not tasks:
        raise RolloutError(f"no running rollout of {name!r} in {to}")
    for task in tasks:
        if action == "promote":
            rollouts.promote(to, task)
        else:
            rollouts.abort(to, task)
    return tasks


def status(to: Path, service: str | None) -> list[dict[str, Any]]:
    """The directory's rollout records (refused ones with why) and, from a service, its evidence; printed."""
    records, errors = rollouts.read_all(to)
    rows = []
    for task in sorted(records.keys() | errors.keys()):
        row: dict[str, Any] = {"task": task, **({"record": asdict(records[task])} if task in records else {}),
                               **({"error": errors[task]} if task in errors else {})}
        if service:
            with urllib.request.urlopen(f"{service.rstrip('/')}/tasks/{task}/rollout", timeout=30) as answer:
                row["service"] = json.loads(answer.read())
        rows.append(row)
    lines = ["| task | candidate | mode | share | state | live version | candidate version | requests (live / "
             "candidate) | shadow agreement | mean top-1 (live / candidate) |",
             "|---|---|---|---:|---|---|---|---:|---:|---:|"]
    for row in rows:
        lines.append("| " + " | ".join(status_cells(row)) + " |")
    print("\n".join(lines))
    return rows


def status_cells(row: dict[str, Any]) -> list[str]:
    record, served = row.get("record", {}), row.get("service", {})
    if "error" in row:
        return [row["task"], record.get("candidate", ""), record.get("mode", ""), "", f"refused: {row['error']}",
                "", "", "", "", ""]
    cells = [row["task"], record["candidate"], record["mode"], f"{record['share']:g}"]
    if not served:
        return [*cells, "", "", "", "", "", ""]
    by_role = {f["role"]: f for f in served["answered"]}
    shadow = served["shadow"] or {}
    live, candidate = by_role.get("live", {}), by_role.get("candidate", {})
    return [*cells, served["state"], served["live_version"] or "", served["candidate_version"] or "",
            f"{live.get('requests', 0)} / {candidate.get('requests', shadow.get('compared', 0))}",
            _number(shadow.get("agreement")),
            f"{_number(shadow.get('live_mean_top1_score', live.get('mean_top1_score')))} / "
            f"{_number(shadow.get('candidate_mean_top1_score', candidate.get('mean_top1_score')))}"]


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m training.publish", description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("candidate", type=Path, nargs="?",
                        help="a prompt-set directory (what training.fit --out holds); not with --status")
    parser.add_argument("--to", type=Path, required=True, help="the prompt directory a service watches")
    parser.add_argument("--data", type=Path, help="the data root the candidate was trained on (to publish)")
    parser.add_argument("--name", default=None, help="publish under this name (default: the candidate's)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="how much lower a task's accuracy may be than the live set's (absolute, 0.01 = 1 point; "
                             "negative: the candidate must be better by that much)")
    parser.add_argument("--force", action="store_true", help="publish even if worse")
    rollout = parser.add_mutually_exclusive_group()
    rollout.add_argument("--canary", type=float, metavar="PCT",
                         help="publish as a canary: the candidate answers PCT %% of its tasks' requests")
    rollout.add_argument("--shadow", type=float, metavar="PCT",
                         help="publish as a shadow: the candidate also scores PCT %% of its tasks' requests, the "
                              "callers get the live answers")
    rollout.add_argument("--promote", action="store_true", help="the candidate's rollout: it takes its tasks")
    rollout.add_argument("--abort", action="store_true", help="the candidate's rollout: no more traffic to it")
    rollout.add_argument("--status", action="store_true", help="print --to's rollouts (and --service's evidence)")
    parser.add_argument("--abort-below", type=float, default=None,
                        help="--shadow: abort automatically when top-1 agreement with the live answers falls below")
    parser.add_argument("--min-requests", type=int, default=200, help="--abort-below: after this many requests")
    parser.add_argument("--service", default=None, help="--status: a running service's URL, for its evidence")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    args = parser.parse_args(argv)
    cli.setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.status:
        with cli.user_errors(OSError, json.JSONDecodeError):
            return {"rollouts": status(args.to, args.service)}
    if args.candidate is None:
        parser.error("the candidate is required (but with --status)")
    with cli.user_errors(OSError, json.JSONDecodeError, RolloutError):
        if not (args.candidate / CONFIG_FILE).is_file():
            raise MissingData(f"{args.candidate} is not a prompt set (no {CONFIG_FILE})")
        candidate = PromptSet.load(args.candidate)
        name = args.name or candidate.name
        if args.promote or args.abort:
            action = "promote" if args.promote else "abort"
            result = {action: name, "tasks": end_rollouts(name, args.to, action)}
            print(json.dumps(result))
            return result
        if args.data is None:
            parser.error("--data is required to publish (the candidate is compared with the live sets on it)")
        live = {t: d for t, d in serving(args.to, held_out(args.to)).items() if t in candidate.tasks
                } if args.to.is_dir() else {}
        rollout = args.canary is not None or args.shadow is not None
        if rollout and any(d.name == name for d in live.values()):
            raise RolloutError(f"{name!r} serves these tasks already: a candidate needs a name of its own (--name)")
        table = compare(args.candidate, live, args.data, args.device)
        print(markdown_table(table))
        worse = decide(table, args.tolerance)
        if worse and not args.force:
            result = {"published": False, "reason": "worse than the live set", "worse": worse}
            print(json.dumps(result))
            raise SystemExit(1)
        mode, share = ("canary", args.canary) if args.canary is not None else ("shadow", args.shadow)
        rolled = start_rollouts(name, sorted(candidate.tasks), args.to, live, mode, share, args.abort_below,
                                args.min_requests) if rollout else []
        written = publish(args.candidate, args.to, args.name)
    result = {"published": True, "path": str(written), "version": candidate.version, "forced": bool(worse),
              "worse": worse, "replaces": [] if rolled else sorted({d.name for d in live.values()}),
              **({"rollout": {"mode": mode, "share": share, "tasks": rolled}} if rolled else {})}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
