"""Many tasks on one engine: start-up, memory, throughput, hot swaps and /metrics at N one-task prompt sets.

    python bench/many_tasks.py                              # N = 1,000, 10,000, 30,000 (embedded model)
    python bench/many_tasks.py --tasks 10000 --landed /tmp/landed   # the same N on another checkout too
    python bench/many_tasks.py --tasks 10000 --rounds 8 --throughput-only   # steps 1-2 alone

For each N: N one-task sets of `--classes` classes (random mmap-tiny prompts, `PromptSet.publish`;
each task its own class names unless `--vocabulary shared`) in a prompt directory; then
`python -m service --prompts DIR` (default workers, watcher on) and:
1. seconds until /readyz is 200 (from the launch), and RSS of each process then;
2. req/s under wrk (`-t1 -c64`, pinned to the last core, a 48-px JPEG) with a random task per request
   against one task, alternating (`--rounds` each);
3. p99 and failed requests under the same wrk load for `--swap-s` seconds without publishing, then
   with one set republished every second (new prompts, `PromptSet.publish`), alternating;
4. seconds from a new set's publication until /tasks/<new> answers 200, `--publishes` times;
5. the longest a request waited more than usual while sets were published: one connection sending
   requests back to back, the largest latency during publications against the median without;
6. /metrics bytes after one request to every task, and the exactness of the request totals.
`--landed DIR` runs steps 1-2 on a checkout of the code before (`git worktree add DIR <commit>`)
for the same N (`--landed-max` caps the N it is run for: it was quadratic in N).
Results and the command in docs/benchmarks.md ("Many tasks").
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
from load import service_pids
from prometheus_client.parser import text_string_to_metric_families
from uploads import synthetic_jpegs
from wrk_load import REPO, WRK

from mmap_model import PromptConfig, PromptSet, TaskSpec, load_backbone

WORDS = ["apple", "boat", "chair", "dog", "eagle", "fork", "guitar", "house", "island", "jacket", "kite", "lamp"]
LUA = """
local paths, n = {}, 0
function init(args)
  for line in io.lines(args[1]) do n = n + 1; paths[n] = line end
  local f = io.open(args[2], "rb"); body = f:read("*a"); f:close()
  math.randomseed(os.time() + n)
end
function request()
  return wrk.format("POST", paths[math.random(n)], {["Content-Type"] = "image/jpeg"}, body)
end
function done(summary, latency, requests)
  io.write(string.format("JSON {\\"requests\\": %d, \\"errors\\": %d, \\"non2xx\\": %d, \\"p50_ms\\": %.3f, "
    .. "\\"p99_ms\\": %.3f}\\n", summary.requests, summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.timeout, summary.errors.status, latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
"""


def task_name(i: int) -> str:
    return f"t{i:06d}"


def make_sets(backbone, directory: Path, start: int, n: int, classes: int, vocabulary: str, seed: int = 0) -> None:
    """Sets `start` .. `start + n - 1`, one task each."""
    for i in range(start, start + n):
        torch.manual_seed(seed * 1_000_003 + i)
        names = [f"{WORDS[c % len(WORDS)]} {c}" if vocabulary == "shared" else f"{WORDS[c % len(WORDS)]} {i}-{c}"
                 for c in range(classes)]
        tasks = {task_name(i): TaskSpec(names, "a photo of a {}.", "g")}
        PromptSet.create(f"s{i:06d}", backbone, PromptConfig(), tasks).publish(directory)


def linked_copy(source: Path, target: Path, n: int) -> None:
    """The first `n` sets of `source` in `target`, their files hard-linked (no symlink: a prompt directory's
    symlinks must stay inside it)."""
    target.mkdir(parents=True)
    for path in sorted(p for p in source.iterdir() if not p.name.startswith("."))[:n]:
        (target / path.name).mkdir()
        for file in path.iterdir():
            os.link(file, target / path.name / file.name)


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024


class Service:
    def __init__(self, checkout: Path, prompts: Path, port: int, log: Path, flags: list[str]):
        self.base = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MMAP_")}
        env["PYTHONPATH"] = str(checkout)
        self.started = time.monotonic()
        self.process = subprocess.Popen([sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port),
                                         "--prompts", str(prompts), "--log-level", "warning", *flags],
                                        cwd=checkout, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        self.log = log
        self.reasons: list[str] = []

    def wait_ready(self, timeout_s: float) -> float:
        """Seconds from the launch until /readyz is 200 with every worker taking connections."""
        while time.monotonic() - self.started < timeout_s:
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            try:
                response = httpx.get(f"{self.base}/readyz", timeout=10)
                body = response.json()
                workers = body.get("workers") or {"serving": 1, "configured": 1}
                if response.status_code == 200 and workers["serving"] == workers["configured"]:
                    return time.monotonic() - self.started
                if body.get("reason") and (not self.reasons or self.reasons[-1] != body["reason"]):
                    self.reasons.append(body["reason"])
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"not ready after {timeout_s} s; last reasons {self.reasons[-3:]}")

    def rss(self) -> dict[str, float]:
        names = {}
        for pid in service_pids(self.process.pid):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            role = ("engine" if b"service.engine" in cmdline else "worker" if b"worker" in cmdline
                    else "launcher")
            names.setdefault(role, []).append(rss_mb(pid))
        return {role: max(values) for role, values in names.items()}

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def wrk(base: str, script: Path, paths: Path, body: Path, seconds: float) -> dict[str, float]:
    core = str((os.cpu_count() or 1) - 1)
    out = subprocess.run(["taskset", "-c", core, WRK, "-t1", "-c64", f"-d{round(seconds)}s", "--timeout", "30s",
                          "-s", str(script), base, "--", str(paths), str(body)],
                         capture_output=True, text=True, check=True).stdout
    result = json.loads(re.search(r"^JSON (.*)$", out, re.M).group(1))
    result["rps"] = result["requests"] / seconds
    return result


class Republisher:
    """Republishes one set (new prompts, same task) every `interval_s` while running."""

    def __init__(self, backbone, directory: Path, index: int, classes: int, interval_s: float = 1.0):
        self.args = (backbone, directory, index, classes)
        self.interval_s = interval_s
        self.stop = threading.Event()
        self.count = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        backbone, directory, index, classes = self.args
        while not self.stop.wait(self.interval_s):
            self.count += 1
            make_sets(backbone, directory, index, 1, classes, "unique", seed=self.count)

    def __enter__(self) -> Republisher:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def probe_stalls(base: str, body: bytes, task: str, seconds: float) -> list[float]:
    """Latencies (ms) of requests sent back to back on one connection for `seconds`."""
    times = []
    with httpx.Client(base_url=base, timeout=30) as client:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            start = time.perf_counter()
            response = client.post(f"/classify?task={task}", content=body, headers={"content-type": "image/jpeg"})
            times.append((time.perf_counter() - start) * 1000)
            assert response.status_code == 200, response.text
    return times


def publish_latency(base: str, backbone, directory: Path, index: int, classes: int) -> float:
    """Seconds from publishing a new set until /tasks/<its task> is 200."""
    start = time.monotonic()
    make_sets(backbone, directory, index, 1, classes, "unique")
    while httpx.get(f"{base}/tasks/{task_name(index)}", timeout=10).status_code != 200:
        assert time.monotonic() - start < 60, "a new set not served within 60 s"
        time.sleep(0.02)
    return time.monotonic() - start


def metrics_check(base: str, n: int, body: bytes) -> dict[str, float]:
    """One request to every task, then the size of /metrics and whether its totals count them all."""
    with httpx.Client(base_url=base, timeout=30) as client:
        before = _requests_total(client.get("/metrics").text)
        for i in range(n):
            response = client.post(f"/classify?task={task_name(i)}", content=body,
                                   headers={"content-type": "image/jpeg"})
            assert response.status_code == 200, response.text
        text = client.get("/metrics").text
    return {"metrics_bytes": len(text.encode()), "requests_counted": _requests_total(text) - before,
            "requests_sent": n, "series": text.count("\nmmap_")}


def _requests_total(text: str) -> float:
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "mmap_requests_total")


def run_n(args, backbone, source: Path, n: int, tmp: Path, checkout: Path, name: str, full: bool) -> dict:
    prompts = tmp / f"{name}-{n}"
    linked_copy(source, prompts, n)
    body = synthetic_jpegs(1, 48)[0]
    (tmp / "body.jpg").write_bytes(body)
    script, random_paths, one_path = tmp / "many.lua", tmp / f"random-{n}.txt", tmp / "one.txt"
    script.write_text(LUA)
    random_paths.write_text("".join(f"/classify?task={task_name(i)}\n" for i in range(n)))
    one_path.write_text(f"/classify?task={task_name(0)}\n")
    service = Service(checkout, prompts, 18100, tmp / f"{name}-{n}.log", ["--watch-interval-s", str(args.watch_s)])
    result: dict = {"tasks": n, "checkout": name}
    try:
        result["ready_s"] = service.wait_ready(args.ready_timeout_s)
        result["progress_reasons"] = service.reasons[:3] + service.reasons[-2:]
        result["rss_mb"] = service.rss()
        print(f"{name} N={n}: ready in {result['ready_s']:.1f} s, RSS {result['rss_mb']}", flush=True)
        rounds = []
        for _ in range(args.rounds):
            rounds.append({"random": wrk(service.base, script, random_paths, tmp / "body.jpg", args.wrk_s),
                           "one": wrk(service.base, script, one_path, tmp / "body.jpg", args.wrk_s)})
        result["wrk"] = rounds
        result["random_over_one"] = statistics.median(r["random"]["rps"] / r["one"]["rps"] for r in rounds)
        print(f"  random/one task req/s: {result['random_over_one']:.3f} "
              f"({[round(r['random']['rps']) for r in rounds]} / {[round(r['one']['rps']) for r in rounds]})",
              flush=True)
        if not full:
            return result
        swaps = []
        for _ in range(args.rounds):
            quiet = wrk(service.base, script, random_paths, tmp / "body.jpg", args.swap_s)
            with Republisher(backbone, prompts, n // 2, args.classes) as publisher:
                busy = wrk(service.base, script, random_paths, tmp / "body.jpg", args.swap_s)
            swaps.append({"quiet": quiet, "publishing": busy, "republished": publisher.count})
        result["swaps"] = swaps
        result["p99_publishing_over_quiet"] = statistics.median(s["publishing"]["p99_ms"] / s["quiet"]["p99_ms"]
                                                                for s in swaps)
        result["failed_while_publishing"] = sum(s["publishing"]["errors"] + s["publishing"]["non2xx"] for s in swaps)
        print(f"  p99 publishing/quiet {result['p99_publishing_over_quiet']:.2f}, failed "
              f"{result['failed_while_publishing']}", flush=True)
        time.sleep(args.watch_s + 2)
        result["publish_to_served_s"] = [publish_latency(service.base, backbone, prompts, n + 1 + k, args.classes)
                                         for k in range(args.publishes)]
        print(f"  new set served after {[round(s, 2) for s in result['publish_to_served_s']]} s", flush=True)
        quiet = probe_stalls(service.base, body, task_name(0), 5)
        with Republisher(backbone, prompts, n // 3, args.classes, 0.5):
            busy = probe_stalls(service.base, body, task_name(0), 10)
        result["probe_quiet_ms"] = {"p50": statistics.median(quiet), "max": max(quiet)}
        result["probe_publishing_ms"] = {"p50": statistics.median(busy), "max": max(busy)}
        result["longest_extra_wait_ms"] = max(busy) - statistics.median(quiet)
        print(f"  one connection: p50 {statistics.median(quiet):.1f} ms quiet, max {max(busy):.1f} ms while "
              f"publishing every 0.5 s", flush=True)
        result.update(metrics_check(service.base, n, body))
        print(f"  /metrics {result['metrics_bytes']:,} bytes after {n} tasks; counted {result['requests_counted']:.0f}"
              f" of {n}", flush=True)
        result["rss_mb_after"] = service.rss()
    finally:
        service.stop()
        shutil.rmtree(prompts, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[1000, 10000, 30000])
    parser.add_argument("--classes", type=int, default=40)
    parser.add_argument("--vocabulary", choices=["unique", "shared"], default="unique",
                        help="unique: each task its own class names; shared: the same names in every task")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--wrk-s", type=float, default=5)
    parser.add_argument("--swap-s", type=float, default=30)
    parser.add_argument("--publishes", type=int, default=5)
    parser.add_argument("--watch-s", type=float, default=2.0, help="the service's watch_interval_s")
    parser.add_argument("--ready-timeout-s", type=float, default=900)
    parser.add_argument("--landed", type=Path, help="a checkout of the code before, for start-up and req/s")
    parser.add_argument("--landed-max", type=int, default=3000, help="largest N run on --landed")
    parser.add_argument("--sets", type=Path, help="a directory to keep the generated sets in between runs")
    parser.add_argument("--throughput-only", action="store_true", help="steps 1-2 only (ready, RSS, req/s)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    backbone = load_backbone("mmap-tiny", "embedded", "cpu")
    results = {"classes": args.classes, "vocabulary": args.vocabulary, "cores": os.cpu_count(), "runs": []}
    with tempfile.TemporaryDirectory(prefix="many-tasks-") as tmp_name:
        tmp = Path(tmp_name)
        source = args.sets or tmp / "sets"
        have = len([p for p in source.iterdir() if not p.name.startswith(".")]) if source.is_dir() else 0
        if have < max(args.tasks):
            start = time.monotonic()
            make_sets(backbone, source, have, max(args.tasks) - have, args.classes, args.vocabulary)
            print(f"wrote {max(args.tasks) - have} sets in {time.monotonic() - start:.0f} s", flush=True)
        for n in args.tasks:
            results["runs"].append(run_n(args, backbone, source, n, tmp, REPO, "this", full=not args.throughput_only))
            if args.landed and n <= args.landed_max:
                results["runs"].append(run_n(args, backbone, source, n, tmp, args.landed, "landed", full=False))
    this = {r["tasks"]: r for r in results["runs"] if r["checkout"] == "this"}
    if len(this) > 1:
        ns = sorted(this)
        results["ready_ratio_largest_over_previous"] = this[ns[-1]]["ready_s"] / this[ns[-2]]["ready_s"]
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
