"""What `labels=` costs: a caller's label set on first use against cached, and throughput with label sets
against a fixed task, on the embedded default (mmap-tiny); `--compare DIR` measures another checkout of the
service alternately (each round, the idle one frozen).

    python bench/labels.py --json docs/results/labels_cpu.json

1. Sequential requests (one connection): p50 latency of the task's own classes, of a label set seen for
   the first time (the engine runs the text tower for it), and of the same set again (cached).
2. wrk (see wrk_load.py), per round: the tasks' own classes; `--label-sets` label sets mixed over the
   tasks, all fitting the cache (after a warm-up, every request hits); as many sets as the cache holds,
   plus one, in turn (`cyclic`: the worst case of a cache too small for an LRU that computes each miss
   before the next request); `fresh`: every request a label set never seen before; `fresh_1_in_8`: the
   tasks' own classes, but every eighth request brings a fresh set. The cache's hits and misses in each
   window come from /metrics.
Each label set has `--labels` class names drawn from the embedded tasks' 40 classes and other words.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import urllib.parse
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from uploads import synthetic_jpegs
from wrk_load import LUA, REPO, Server, settle, wrk

from mmap_model import EMBEDDED_PROMPTS_DIR

EXTRA_WORDS = ("teapot", "violin", "bicycle", "lantern", "anchor", "cactus", "giraffe", "helmet", "kettle", "owl",
               "parrot", "robot", "saxophone", "tractor", "whale", "zebra", "castle", "drum", "feather", "globe")


def cache_results(base: str) -> dict[str, float]:
    """The engine's label-cache lookups so far, by result (hit, miss)."""
    counts = {"hit": 0.0, "miss": 0.0}
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name == "mmap_label_cache_total":
                counts[sample.labels["result"]] += sample.value
    return counts


def label_sets(classes: list[str], n_sets: int, size: int, seed: int) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    pool = sorted(set(classes) | set(EXTRA_WORDS))
    return [list(rng.choice(pool, size, replace=False)) for _ in range(n_sets)]


def path(task: str, labels: list[str] | None) -> str:
    query = {"task": task} | ({"labels": ",".join(labels)} if labels else {})
    return "/classify?" + urllib.parse.urlencode(query, quote_via=urllib.parse.quote)


def sequential_ms(base: str, paths: list[str], body: bytes) -> list[float]:
    times = []
    with httpx.Client(base_url=base, timeout=60) as client:
        for p in paths:
            started = time.perf_counter()
            response = client.post(p, content=body, headers={"content-type": "image/jpeg"})
            times.append(1000 * (time.perf_counter() - started))
            assert response.status_code == 200, response.text
    return times


def write_targets(tmp: Path, name: str, paths: list[str], bodies: list[Path]) -> Path:
    listing = tmp / f"{name}.txt"
    listing.write_text("".join(f"{p} {bodies[i % len(bodies)]}\n" for i, p in enumerate(paths)))
    return listing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=int, default=40, help="class names per label set")
    parser.add_argument("--label-sets", type=int, default=64, help="distinct label sets in the cached mix")
    parser.add_argument("--cache", type=int, default=128, help="the service's label_cache_size")
    parser.add_argument("--fresh-sets", type=int, default=6000, help="label sets of the fresh scenarios (none repeats "
                                                                     "within a run)")
    parser.add_argument("--firsts", type=int, default=40, help="sequential first-use / cached pairs")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window-s", type=int, default=10)
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1) - 1))
    parser.add_argument("--wrk-cores", default=str((os.cpu_count() or 1) - 1))
    parser.add_argument("--compare", type=Path, help="another checkout of the service, measured alternately")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    sets_json = [json.loads((p / "promptset.json").read_text()) for p in sorted(EMBEDDED_PROMPTS_DIR.iterdir())
                 if (p / "promptset.json").is_file()]
    tasks = {t: spec["classnames"] for meta in sets_json for t, spec in meta["tasks"].items()}
    names = sorted(tasks)
    classes = sorted({c for cs in tasks.values() for c in cs})
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="labels-bench-")))
        bodies = []
        for i, body in enumerate(synthetic_jpegs(16, 48)):
            bodies.append(tmp / f"{i}.jpg")
            bodies[-1].write_bytes(body)
        script = tmp / "load.lua"
        script.write_text(LUA)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MMAP_")}
        flags = ["--watch-interval-s", "0", "--log-level", "warning", "--workers", str(args.workers),
                 "--engine-threads", "1", "--label-cache-size", str(args.cache), "--max-labels",
                 str(max(256, args.labels))]
        servers = [Server("service", REPO, flags, 18090, tmp / "service.log", env)]
        stack.callback(servers[-1].stop)
        if args.compare:
            servers.append(Server("compare", args.compare, flags, 18091, tmp / "compare.log", env))
            stack.callback(servers[-1].stop)

        # 1. first use against cached, sequentially
        body = bodies[0].read_bytes()
        latency = {}
        for n, server in enumerate(servers):
            with alone(server, servers):
                firsts = label_sets(classes, args.firsts, args.labels, seed=10 + n)  # new to this service
                own = sequential_ms(server.base, [path(names[i % len(names)], None) for i in range(args.firsts)],
                                    body)
                first, again = [], []
                for i, labels in enumerate(firsts):
                    first += sequential_ms(server.base, [path(names[i % len(names)], labels)], body)
                    again += sequential_ms(server.base, [path(names[i % len(names)], labels)], body)
            latency[server.name] = {"own_classes_p50_ms": statistics.median(own),
                                    "first_use_p50_ms": statistics.median(first),
                                    "cached_p50_ms": statistics.median(again)}
        print(json.dumps(latency), flush=True)

        # 2. throughput: fixed tasks; cached mixed label sets; cache + 1 sets in turn; fresh sets (every request
        # a set never seen); one request in eight with a fresh set, the others the tasks' own classes
        mixed = label_sets(classes, args.label_sets, args.labels, seed=2)
        cyclic = label_sets(classes, args.cache + 1, args.labels, seed=3)
        fresh = label_sets(classes, args.fresh_sets, args.labels, seed=4)
        targets = {"own_classes": [path(t, None) for t in names],
                   "mixed_cached": [path(names[i % len(names)], s) for i, s in enumerate(mixed)],
                   "cyclic": [path(names[0], s) for s in cyclic],
                   "fresh": [path(names[i % len(names)], s) for i, s in enumerate(fresh)],
                   "fresh_1_in_8": [path(names[i % len(names)], fresh[-1 - i // 8] if i % 8 == 7 else None)
                                    for i in range(8 * args.fresh_sets)]}
        listings = {name: write_targets(tmp, name, paths, bodies) for name, paths in targets.items()}
        rounds = []
        for r in range(args.rounds):
            row: dict = {}
            for server in servers:
                with alone(server, servers):
                    if r == 0:  # warm-up: fills the cache with the mixed sets
                        wrk(server.base, script, listings["mixed_cached"], args.connections, 3, args.wrk_cores)
                    row[server.name] = {}
                    for name, listing in listings.items():
                        if name == "mixed_cached":  # the other scenarios' misses evicted them: put them back
                            wrk(server.base, script, listing, args.connections, 2, args.wrk_cores)
                        settle(server.base)
                        before = cache_results(server.base)
                        result = wrk(server.base, script, listing, args.connections, args.window_s, args.wrk_cores)
                        after = cache_results(server.base)
                        row[server.name][name] = {"rps": result["rps"], "p50_ms": result["p50_ms"],
                                                  "p99_ms": result["p99_ms"], "errors": result["errors"],
                                                  "cache_misses": after["miss"] - before["miss"],
                                                  "cache_hits": after["hit"] - before["hit"]}
            print(f"round {r}: {json.dumps(row)}", flush=True)
            rounds.append(row)

    summary = {"labels_per_set": args.labels, "label_sets": args.label_sets, "cache": args.cache,
               "fresh_sets": args.fresh_sets, "workers": args.workers, "engine_threads": 1, "cores": os.cpu_count(),
               "compare": str(args.compare) if args.compare else None, "latency": latency, "rounds": rounds}
    for server in servers:
        rps = {k: statistics.median(row[server.name][k]["rps"] for row in rounds) for k in targets}
        summary[server.name] = {"rps": rps, **{f"{k}_over_own": statistics.median(
            row[server.name][k]["rps"] / row[server.name]["own_classes"]["rps"] for row in rounds)
            for k in targets if k != "own_classes"}}
    print(json.dumps({k: v for k, v in summary.items() if k != "rounds"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


def alone(server: Server, servers: list[Server]) -> ExitStack:
    """The other services frozen (SIGSTOP) for the length of a block."""
    stack = ExitStack()
    for other in servers:
        if other is not server:
            stack.enter_context(other.frozen())
    return stack


if __name__ == "__main__":
    main()
