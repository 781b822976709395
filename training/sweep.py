"""What the benchmark sweeps (`training.frontier`, `training.fewshot`) share: list flags, and running one sweep
as N disjoint shards (one process per core) whose rows a report step merges."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def shard_spec(text: str) -> tuple[int, int]:
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K/N, got {text!r}") from None
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"need 0 <= K < N, got {text!r}")
    return k, n


def add_shard_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("shards")
    g.add_argument("--shard", type=shard_spec, default=None,
                   help="run only part K of N (0-based) into <out>/shard-K; merge with --report")
    g.add_argument("--report", action="store_true", help="run nothing: merge the rows under --out and report")


def check_shard_data(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.shard is not None and args.data is None:
        parser.error("--shard needs --data (shards would generate the same synthetic root at once): "
                     "python -m training.data --data DIR --synthetic 24 first")


def shard(items: Sequence[T], part: tuple[int, int] | None, key: Callable[[T], Hashable] = lambda x: x) -> list[T]:
    """Part k of n: items with equal `key` stay together; parts are balanced by item count (greedy, in order)."""
    if part is None:
        return list(items)
    k, n = part
    groups: dict[Hashable, list[T]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    loads, owner = [0] * n, {}
    for g in sorted(groups, key=lambda g: -len(groups[g])):  # stable: equal sizes keep their order
        owner[g] = loads.index(min(loads))
        loads[owner[g]] += len(groups[g])
    return [item for item in items if owner[key(item)] == k]


def shard_dir(out: Path, part: tuple[int, int] | None) -> Path:
    return out if part is None else out / f"shard-{part[0]}"


def merged_rows(out: Path, pattern: str = "shard-*/results.json") -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows of `<out>/results.json` and every `<out>/<pattern>`, and the first file's settings
    (`command` lists every file's command)."""
    files = [f for f in [out / "results.json", *sorted(out.glob(pattern))] if f.is_file()]
    if not files:
        raise SystemExit(f"error: no results.json under {out}")
    results = [json.loads(f.read_text()) for f in files]
    meta = {**results[0], "command": [r["command"] for r in results]}
    return [row for r in results for row in r["rows"]], meta
