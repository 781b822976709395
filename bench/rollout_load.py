"""What a rollout costs the CPU proxy, and promote and abort under wrk load, in one run.

    python bench/rollout_load.py --json docs/results/rollout_load.json

Four services of this checkout on the embedded model and its demo sets (CPU proxy: `--workers 1 --engine-threads 1`,
as docs/benchmarks.md), each on its own prompt directory: `none` (no rollout), and a candidate for every task (a copy
of each demo set under another name, so its scores are real work) at `shadow` 10 %, `shadow` 100 % and `canary`
10 %. Windows alternate between them, the others frozen (bench/wrk_load.py's `measure`); req/s are compared within
a round. Then, on the shadow-100 and canary-10 services, wrk runs while the rollouts are aborted and promoted through
the admin API: wrk's errors (non-2xx, connection, timeouts) must be 0, and afterwards every task serves one version.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
from uploads import synthetic_jpegs
from wrk_load import REPO, Server, measure, write_load, wrk

from mmap_model import EMBEDDED_PROMPTS_DIR, rollouts
from mmap_model.backbone import EMBEDDED_DIR

TOKEN = "bench-token"
ADMIN = {"authorization": f"Bearer {TOKEN}"}
CONFIGS = {"none": None, "shadow10": ("shadow", 10), "shadow100": ("shadow", 100), "canary10": ("canary", 10)}


def prompt_directory(target: Path, rollout: tuple[str, float] | None) -> list[str]:
    """The demo sets, and with a rollout a candidate copy of each (records first); the tasks."""
    tasks = []
    for demo in sorted(p for p in EMBEDDED_PROMPTS_DIR.iterdir() if (p / "promptset.json").is_file()):
        shutil.copytree(demo, target / demo.name)
        names = sorted(json.loads((demo / "promptset.json").read_text())["tasks"])
        tasks += names
        if rollout is not None:
            for task in names:
                rollouts.start(target, task, f"{demo.name}-next", *rollout)
            shutil.copytree(demo, target / f"{demo.name}-next")
    return sorted(tasks)


def served_versions(base: str, tasks: list[str]) -> dict[str, list[str]]:
    return {t: [(info := httpx.get(f"{base}/tasks/{t}").json())["prompt_set"], info["rollout"]] for t in tasks}


def under_load(server: Server, script: Path, listing: Path, seconds: int, action: str, tasks: list[str],
               cores: str) -> dict:
    """wrk for `seconds`; in its middle every task's rollout is ended with `action` through the admin API."""
    result: dict = {}

    def load() -> None:
        result.update(wrk(server.base, script, listing, 64, seconds, cores))

    thread = threading.Thread(target=load)
    thread.start()
    time.sleep(seconds / 3)
    started = time.monotonic()
    for task in tasks:
        response = httpx.post(f"{server.base}/admin/rollouts/{task}/{action}", headers=ADMIN, timeout=60)
        assert response.status_code == 200, response.text
    ended_s = time.monotonic() - started
    thread.join()
    return {"action": action, "requests": result["requests"], "errors": result["errors"], "rps": result["rps"],
            "admin_calls_s": ended_s, "after": served_versions(server.base, tasks)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warm-s", type=int, default=3)
    parser.add_argument("--window-s", type=int, default=15)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--load-s", type=int, default=15, help="wrk seconds around each promote / abort")
    parser.add_argument("--wrk-cores", default=str((os.cpu_count() or 1) - 1))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))

    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rollout-load-")))
        config = json.loads((EMBEDDED_DIR / "open_clip_config.json").read_text())
        bodies = synthetic_jpegs(16, config["model_cfg"]["vision_cfg"]["image_size"])  # as the CPU proxy's
        servers: dict[str, Server] = {}
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("MMAP_")}, "MMAP_ADMIN_TOKEN": TOKEN}
        tasks: list[str] = []
        for port, (name, rollout) in enumerate(CONFIGS.items(), start=18090):
            prompts = tmp / name / "prompts"
            prompts.mkdir(parents=True)
            tasks = prompt_directory(prompts, rollout)
            servers[name] = Server(name, REPO, [
                "--model", "mmap-tiny", "--pretrained", "embedded", "--prompts", str(prompts), "--device", "cpu",
                "--workers", "1", "--engine-threads", "1", "--watch-interval-s", "0", "--queue-size", "256",
                "--log-level", "warning"], port, tmp / f"{name}.log", env)
            stack.callback(servers[name].stop)
        listing, script, _ = write_load(tmp, bodies, tasks)

        rounds = []
        for r in range(args.rounds):
            row = {}
            for name, server in servers.items():
                with ExitStack() as frozen:
                    for other in servers.values():
                        if other is not server:
                            frozen.enter_context(other.frozen())
                    row[name] = measure(server, script, listing, args)
            print(f"round {r}: " + json.dumps({n: round(m["rps"]) for n, m in row.items()}), flush=True)
            rounds.append(row)
        evidence = {name: httpx.get(f"{servers[name].base}/admin/rollouts", headers=ADMIN).json()["rollouts"]
                    for name in CONFIGS if name != "none"}

        ended = {}
        for name, action in (("shadow100", "abort"), ("canary10", "promote")):
            with ExitStack() as frozen:
                for other in servers.values():
                    if other is not servers[name]:
                        frozen.enter_context(other.frozen())
                ended[name] = under_load(servers[name], script, listing, args.load_s, action, tasks, args.wrk_cores)
            print(f"{action} under load: " + json.dumps(ended[name]), flush=True)

    ratios = {name: statistics.median(row[name]["rps"] / row["none"]["rps"] for row in rounds)
              for name in CONFIGS if name != "none"}
    summary = {"cores": os.cpu_count(), "connections": args.connections, "window_s": args.window_s,
               "rps": {name: statistics.median(row[name]["rps"] for row in rounds) for name in CONFIGS},
               "over_none": ratios, "rounds": rounds, "evidence": evidence, "under_load": ended}
    print(json.dumps({k: summary[k] for k in ("rps", "over_none")}, indent=1))
    for result in ended.values():
        assert result["errors"] == 0, result
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
