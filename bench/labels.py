"""What `labels=` costs: a caller's label set on first use against cached, and throughput with mixed label sets
against a fixed task, in one run on one service (the embedded default, mmap-tiny).

    python bench/labels.py --json docs/results/labels_cpu.json

1. Sequential requests (one connection): p50 latency of the task's own classes, of a label set seen for
   the first time (the engine runs the text tower for it), and of the same set again (cached).
2. wrk (see wrk_load.py), alternating round by round: the task's own classes; `--label-sets` label sets
   mixed over the tasks, all fitting the cache (after a warm-up, every request hits); and as many sets again
   as the cache holds, plus one, in turn (every request misses: the worst case of a cache too small).
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
from uploads import synthetic_jpegs
from wrk_load import LUA, REPO, Server, settle, wrk

from mmap_model import EMBEDDED_PROMPTS_DIR

EXTRA_WORDS = ("teapot", "violin", "bicycle", "lantern", "anchor", "cactus", "giraffe", "helmet", "kettle", "owl",
               "parrot", "robot", "saxophone", "tractor", "whale", "zebra", "castle", "drum", "feather", "globe")


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
    parser.add_argument("--firsts", type=int, default=40, help="sequential first-use / cached pairs")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window-s", type=int, default=10)
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1) - 1))
    parser.add_argument("--wrk-cores", default=str((os.cpu_count() or 1) - 1))
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
        server = Server("engine", REPO, ["--watch-interval-s", "0", "--log-level", "warning", "--workers",
                                         str(args.workers), "--engine-threads", "1",
                                         "--label-cache-size", str(args.cache),
                                         "--max-labels", str(max(256, args.labels))], 18090, tmp / "service.log", env)
        stack.callback(server.stop)

        # 1. first use against cached, sequentially
        body = bodies[0].read_bytes()
        firsts = label_sets(classes, args.firsts, args.labels, seed=1)
        own = sequential_ms(server.base, [path(names[i % len(names)], None) for i in range(args.firsts)], body)
        first, again = [], []
        for i, labels in enumerate(firsts):
            first += sequential_ms(server.base, [path(names[i % len(names)], labels)], body)
            again += sequential_ms(server.base, [path(names[i % len(names)], labels)], body)
        latency = {"own_classes_p50_ms": statistics.median(own), "first_use_p50_ms": statistics.median(first),
                   "cached_p50_ms": statistics.median(again)}
        print(json.dumps(latency), flush=True)

        # 2. throughput: fixed tasks, cached mixed label sets, every request a miss
        mixed = label_sets(classes, args.label_sets, args.labels, seed=2)
        thrash = label_sets(classes, args.cache + 1, args.labels, seed=3)
        targets = {"own_classes": write_targets(tmp, "own", [path(t, None) for t in names], bodies),
                   "mixed_cached": write_targets(tmp, "mixed", [path(names[i % len(names)], s)
                                                                for i, s in enumerate(mixed)], bodies),
                   "all_misses": write_targets(tmp, "thrash", [path(names[0], s) for s in thrash], bodies)}
        for listing in targets.values():  # warm-up: fills the cache with the mixed sets
            wrk(server.base, script, listing, args.connections, 3, args.wrk_cores)
        rounds = []
        for r in range(args.rounds):
            row = {}
            for name, listing in targets.items():
                if name == "mixed_cached":
                    wrk(server.base, script, listing, args.connections, 2, args.wrk_cores)  # the misses put it back
                settle(server.base)
                result = wrk(server.base, script, listing, args.connections, args.window_s, args.wrk_cores)
                row[name] = {"rps": result["rps"], "p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"],
                             "errors": result["errors"]}
            print(f"round {r}: {json.dumps(row)}", flush=True)
            rounds.append(row)

    summary = {"labels_per_set": args.labels, "label_sets": args.label_sets, "cache": args.cache,
               "workers": args.workers, "engine_threads": 1, "cores": os.cpu_count(), "latency": latency,
               "rounds": rounds,
               **{f"{k}_rps": statistics.median(row[k]["rps"] for row in rounds) for k in targets},
               "mixed_over_own": statistics.median(row["mixed_cached"]["rps"] / row["own_classes"]["rps"]
                                                   for row in rounds),
               "misses_over_own": statistics.median(row["all_misses"]["rps"] / row["own_classes"]["rps"]
                                                    for row in rounds)}
    print(json.dumps({k: v for k, v in summary.items() if k != "rounds"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
