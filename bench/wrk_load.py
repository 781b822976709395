"""The service under `wrk`, against the landed single-process service, in one run.

    python bench/wrk_load.py --landed /tmp/landed --engine-threads 1   # the CPU proxy of GPU serving: mmap-tiny
    python bench/wrk_load.py --model ViT-B-32 --landed /tmp/landed     # random weights, 224-px JPEGs
    python bench/wrk_load.py --model ViT-B-32 --device cuda --precision fp16   # a GPU host (no --landed needed)

`--landed DIR` is a checkout of the single-process service to compare with (`git worktree add DIR
<commit>`); it runs from DIR on this interpreter. `--variant FLAGS` serves this checkout a second
time with those service flags added (`--variant "--decode engine"`, `--variant "--cuda-graphs true"`)
and compares it the same way. The embedded tiny model's operations are short, like
GPU kernel launches, so with one engine thread (as the engine runs on a GPU) it is this machine's proxy
for GPU serving. Both services are started once and alternate,
round by round: the one not measured is frozen (SIGSTOP), so each window has the machine to itself.
Per window: wrk (pinned to the last core, `--connections` keep-alive connections, raw image/jpeg
bodies over all tasks) gives req/s; /metrics before and after gives the forward time per image inside
the service (inference_duration_sum / batch_size_sum), the mean batch, and with decode=engine the
engine's decoding time per image (averaged over batches); /proc gives the CPU
seconds of the HTTP side (the workers; the landed service's one process does everything) per
request. The same forward alone (the service's own tower, normalisation and scoring, at the mean
batch, the engine's thread count) is timed in this process with the services frozen. Then
sequential requests (one connection: an httpx client, then wrk) give p50 at concurrency 1 against a raw
single-image forward.
wrk's own percentiles are corrected for coordinated omission; they are reported as wrk prints them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np
import torch
from load import cpu_seconds, frozen, make_prompt_sets, service_pids
from prometheus_client.parser import text_string_to_metric_families
from uploads import synthetic_jpegs

from mmap_model import EMBEDDED_PROMPTS_DIR, PromptedCLIP, PromptSet, load_backbone
from service.engine.backends import PixelNormalizer, TorchImageTower
from service.http.uploads import Preprocessor
from service.settings import Settings

REPO = Path(__file__).resolve().parents[1]
WRK = os.environ.get("WRK", "wrk")  # Debian's wrk; a copied binary elsewhere (bench/gpu_check.sh)
LUA = """
local bodies, paths, n = {}, {}, 0
function init(args)
  for line in io.lines(args[1]) do
    local path, file = line:match("^(%S+) (%S+)$")
    local f = io.open(file, "rb"); local body = f:read("*a"); f:close()
    n = n + 1
    bodies[n] = wrk.format("POST", path, {["Content-Type"] = "image/jpeg"}, body)
  end
  i = 0
end
function request()
  i = i % n + 1
  return bodies[i]
end
function response(status, headers, body)
  if status ~= 200 then bad = (bad or 0) + 1 end
end
function done(summary, latency, requests)
  io.write(string.format("JSON {\\"requests\\": %d, \\"errors\\": %d, \\"p50_ms\\": %.3f, \\"p99_ms\\": %.3f}\\n",
    summary.requests, summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.timeout, latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
"""


def write_load(directory: Path, bodies: list[bytes], tasks: list[str]) -> tuple[Path, Path, list[tuple[str, bytes]]]:
    """wrk's files in `directory`: the JPEG bodies, the listing `LUA` reads (`/classify?task=<task> <file>`, the
    tasks in turn) and the script; and the (path, body) targets."""
    (directory / "bodies").mkdir()
    targets, lines = [], []
    for i, body in enumerate(bodies):
        file = directory / "bodies" / f"{i}.jpg"
        file.write_bytes(body)
        targets.append((f"/classify?task={tasks[i % len(tasks)]}", body))
        lines.append(f"{targets[-1][0]} {file}\n")
    listing, script = directory / "targets.txt", directory / "load.lua"
    listing.write_text("".join(lines))
    script.write_text(LUA)
    return listing, script, targets


def scrape(base: str) -> dict[str, float]:
    """Every sample of /metrics but histogram buckets, summed over label values (all tasks, all statuses)."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=30).text):
        for sample in family.samples:
            if "le" not in sample.labels:
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


class Server:
    """A service process tree on a loopback port; `frozen()` stops all of it for the length of a block."""

    def __init__(self, name: str, cwd: Path, args: list[str], port: int, log: Path, env: dict[str, str]):
        self.name, self.base = name, f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen([sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port),
                                         *args], cwd=cwd, env={**env, "PYTHONPATH": os.pathsep.join(
                                            p for p in (str(cwd), env.get("PYTHONPATH", "")) if p)},
                                        stdout=log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while True:
            assert self.process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"{name} not ready"
            try:
                response = httpx.get(f"{self.base}/readyz", timeout=5)
                workers = response.json().get("workers") or {"serving": 1, "configured": 1}  # a checkout without it
                if response.status_code == 200 and workers["serving"] == workers["configured"]:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)

    @property
    def pids(self) -> list[int]:
        return service_pids(self.process.pid)

    @property
    def http_pids(self) -> list[int]:
        """The processes that run HTTP and decoding: the workers, or the landed service's one process."""
        # service.http.worker (service.worker in older trees)
        kids = [p for p in self.pids[1:] if b"worker" in Path(f"/proc/{p}/cmdline").read_bytes()]
        return kids or [self.process.pid]

    def frozen(self):
        """All of its processes stopped for the length of a block (see load.frozen)."""
        return frozen(self.process)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def wrk(base: str, script: Path, targets: Path, connections: int, seconds: float, cores: str) -> dict[str, float]:
    threads = len(cores.split(","))
    command = ["taskset", "-c", cores, WRK, f"-t{threads}", f"-c{connections}", f"-d{round(seconds)}s",
               "--timeout", "30s",
               "-s", str(script), base, "--", str(targets)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    result = json.loads(re.search(r"^JSON (.*)$", out, re.M).group(1))
    result["rps"] = result["requests"] / seconds
    return result


def settle(base: str, timeout_s: float = 300.0) -> None:
    """Wait until the service has answered what the last wrk run left in flight (its slots are free again):
    no request answered for three mean forwards."""
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        metrics = scrape(base)
        answered = metrics.get("mmap_request_duration_seconds_count", 0.0)
        forward_s = (metrics["mmap_inference_duration_seconds_sum"]
                     / max(1.0, metrics["mmap_inference_duration_seconds_count"]))
        if answered == last:
            return
        last = answered
        time.sleep(0.5 + 3 * forward_s)


def measure(server: Server, script: Path, targets: Path, args: argparse.Namespace) -> dict[str, float]:
    wrk(server.base, script, targets, args.connections, args.warm_s, args.wrk_cores)  # untimed warm-up
    settle(server.base)
    before, cpu_before = scrape(server.base), cpu_seconds(server.http_pids)
    all_before = cpu_seconds(server.pids)
    result = wrk(server.base, script, targets, args.connections, args.window_s, args.wrk_cores)
    cpu, all_cpu = cpu_seconds(server.http_pids) - cpu_before, cpu_seconds(server.pids) - all_before
    after = scrape(server.base)
    settle(server.base)
    images = after["mmap_batch_size_sum"] - before["mmap_batch_size_sum"]
    batches = after["mmap_batch_size_count"] - before["mmap_batch_size_count"]
    seconds = after["mmap_inference_duration_seconds_sum"] - before["mmap_inference_duration_seconds_sum"]
    decoded = after.get("mmap_engine_decode_seconds_per_image_count", 0) - before.get(
        "mmap_engine_decode_seconds_per_image_count", 0)
    decode_s = after.get("mmap_engine_decode_seconds_per_image_sum", 0) - before.get(
        "mmap_engine_decode_seconds_per_image_sum", 0)
    return {**result, "forward_per_image_ms": 1000 * seconds / images, "mean_batch": images / batches,
            "engine_decode_per_image_ms": 1000 * decode_s / decoded if decoded else 0.0,
            "http_cpu_ms_per_request": 1000 * cpu / result["requests"],
            "all_cpu_ms_per_request": 1000 * all_cpu / result["requests"], "cores_used": all_cpu / args.window_s}


class RawForward:
    """The engine's work for a batch, in this process: normalise, prompted forward, per-row scores."""

    def __init__(self, backbone, prompt_dir: Path, bodies: list[bytes], max_batch: int, cuda_graphs: bool):
        sets = {}
        for path in sorted(p for p in prompt_dir.iterdir() if (p / "promptset.json").is_file()):
            sets[path.name] = PromptSet.load(path, backbone)
        self.backbone = backbone
        self.tower = TorchImageTower(backbone, max_batch_size=max_batch, cuda_graphs=cuda_graphs)  # as the engine's
        self.normalize = PixelNormalizer(backbone.device, backbone.preprocess_cfg["mean"],
                                         backbone.preprocess_cfg["std"])
        self.scale = float(PromptedCLIP(backbone.model).logit_scale)
        visual = {t: ps.prompts(t).visual for ps in sets.values() for t in ps.tasks}
        shapes = {v.shape for v in visual.values() if v is not None}
        shape = max(shapes, key=lambda s: sum(1 for v in visual.values() if v is not None and v.shape == s))
        self.bank = torch.stack([v for v in visual.values() if v is not None and v.shape == shape]).to(backbone.device)
        self.text = torch.randn(10, backbone.widths.embed_dim, device=backbone.device)
        preprocess = Preprocessor(backbone.preprocess_cfg, 10**9)
        self.pixels = [preprocess(b) for b in bodies]

    def per_image_ms(self, batch: int, repeats: int, min_s: float = 0.5) -> float:
        pixels = [self.pixels[i % len(self.pixels)] for i in range(batch)]
        index = torch.arange(batch, device=self.bank.device) % self.bank.shape[0]

        def once() -> None:
            with torch.inference_mode():
                images = self.normalize(torch.from_numpy(np.stack(pixels)))
                features = self.tower(images, self.bank[index])
                probs = (self.scale * features @ self.text.T).softmax(-1)
                probs.topk(5)[0].tolist()

        once()
        times = []
        for _ in range(repeats):
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < min_s:
                once()
                n += 1
            times.append((time.perf_counter() - start) / n / batch * 1000)
        return statistics.median(times)


def single_requests(base: str, targets: list[tuple[str, bytes]], n: int) -> list[float]:
    with httpx.Client(base_url=base, timeout=30) as client:
        times = []
        for i in range(n):
            path, body = targets[i % len(targets)]
            start = time.perf_counter()
            response = client.post(path, content=body, headers={"content-type": "image/jpeg"})
            times.append((time.perf_counter() - start) * 1000)
            assert response.status_code == 200, response.text
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mmap-tiny", help="mmap-tiny (embedded weights) or an open_clip name")
    parser.add_argument("--landed", type=Path, help="checkout of the single-process service to compare with")
    parser.add_argument("--landed-flags", type=shlex.split, default=[], metavar="FLAGS",
                        help="more flags for the landed service: the same '--workers 1 --engine-threads 1' as this "
                             "checkout's, to compare with a checkout that has them (else it runs its defaults: on a "
                             "CPU, an engine thread per core)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1) - 1))
    parser.add_argument("--engine-threads", type=int, default=0, help="the service's engine_threads (0 = its default)")
    parser.add_argument("--torch-compile", default="off", help="the service's torch_compile mode")
    parser.add_argument("--cuda-graphs", choices=["auto", "true", "false"], default="auto",
                        help="the service's cuda_graphs (auto = its default: on with CUDA unless torch_compile)")
    parser.add_argument("--decode", choices=["worker", "engine"], default="worker", help="the service's decode")
    parser.add_argument("--flags", type=shlex.split, default=[], metavar="FLAGS",
                        help="more flags for this checkout's service (and its variant): '--batches-in-flight 2'")
    parser.add_argument("--variant", type=shlex.split, default=None, metavar="FLAGS",
                        help="also serve this checkout with these service flags added (e.g. '--cuda-graphs true'), "
                             "alternated with the first, as 'variant'")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32, help="max_batch_size of both services")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warm-s", type=int, default=3)
    parser.add_argument("--window-s", type=int, default=15)
    parser.add_argument("--single", type=int, default=100, help="sequential requests at concurrency 1 (httpx)")
    parser.add_argument("--single-s", type=float, default=3.0,
                        help="seconds of wrk with one connection: p50 at concurrency 1 without a Python client's cost")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument("--image-size", type=int, default=None, help="side of the JPEG uploads (default: model input)")
    parser.add_argument("--wrk-cores", default=str((os.cpu_count() or 1) - 1),
                        help="cores wrk is pinned to, one wrk thread each (a taskset list: 14,15)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    # a timeout's SIGTERM must still stop the services (and thaw a frozen one): run the exit stack
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))

    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="wrk-load-")))
        if args.model == "mmap-tiny":
            pretrained, prompts = "embedded", EMBEDDED_PROMPTS_DIR
            backbone = load_backbone("mmap-tiny", "embedded", args.device, args.precision)
            tasks = sorted(t for p in prompts.iterdir() if (p / "promptset.json").is_file()
                           for t in json.loads((p / "promptset.json").read_text())["tasks"])
        else:
            pretrained, prompts = "random:0", tmp / "prompts"
            backbone = load_backbone(args.model, None, args.device, args.precision, seed=0)
            tasks = make_prompt_sets(backbone, prompts, 4, 4, 10)
        size = args.image_size or backbone.image_size
        bodies = synthetic_jpegs(16, size)
        listing, script, targets = write_load(tmp, bodies, tasks)

        env = {k: v for k, v in os.environ.items() if not k.startswith("MMAP_")}
        # every connection may wait in the engine's queue: the run measures throughput, not refusals
        common = ["--model", args.model, "--pretrained", pretrained, "--prompts", str(prompts), "--device", args.device,
                  "--precision", args.precision, "--max-batch-size", str(args.batch), "--watch-interval-s", "0",
                  "--queue-size", str(max(256, args.connections)), "--log-level", "warning"]
        chosen = None if args.cuda_graphs == "auto" else args.cuda_graphs == "true"
        graphs = Settings(cuda_graphs=chosen, torch_compile=args.torch_compile).resolved(args.device).cuda_graphs
        engine_args = [*common, "--workers", str(args.workers), "--engine-threads", str(args.engine_threads),
                       "--torch-compile", args.torch_compile, "--cuda-graphs", str(graphs), "--decode", args.decode,
                       *args.flags]
        servers = [Server("engine", REPO, engine_args, 18080, tmp / "engine.log", env)]
        stack.callback(servers[-1].stop)
        if args.landed:
            servers.append(Server("landed", args.landed, [*common, *args.landed_flags], 18081, tmp / "landed.log",
                                  env))
            stack.callback(servers[-1].stop)
        if args.variant:
            servers.append(Server("variant", REPO, [*engine_args, *args.variant], 18082, tmp / "variant.log", env))
            stack.callback(servers[-1].stop)
        engine_threads = args.engine_threads or (1 if args.device == "cuda" else os.cpu_count() or 1)
        raw = RawForward(backbone, prompts, bodies, args.batch, graphs)
        rounds: list[dict] = []
        for r in range(args.rounds):
            row: dict = {}
            for server in servers:
                with ExitStack() as frozen:
                    for other in servers:
                        if other is not server:
                            frozen.enter_context(other.frozen())
                    row[server.name] = measure(server, script, listing, args)
            batch = max(1, round(row["engine"]["mean_batch"]))
            with ExitStack() as frozen:
                for server in servers:
                    frozen.enter_context(server.frozen())
                threads = torch.get_num_threads()
                torch.set_num_threads(engine_threads)
                row["raw_per_image_ms"] = raw.per_image_ms(batch, 3)
                torch.set_num_threads(threads)
            row["raw_batch"] = batch
            print(f"round {r}: {json.dumps(row)}", flush=True)
            rounds.append(row)

        singles, wrk_singles = {}, {}
        for server in servers:
            with ExitStack() as frozen:
                for other in servers:
                    if other is not server:
                        frozen.enter_context(other.frozen())
                singles[server.name] = statistics.median(single_requests(server.base, targets, args.single))
                if args.single_s > 0:
                    wrk_singles[server.name] = wrk(server.base, script, listing, 1, args.single_s,
                                                   args.wrk_cores.split(",")[0])["p50_ms"]
        with ExitStack() as frozen:
            for server in servers:
                frozen.enter_context(server.frozen())
            torch.set_num_threads(engine_threads)
            raw_single_ms = raw.per_image_ms(1, 3)

    def med(name: str, key: str) -> float:
        return statistics.median(row[name][key] for row in rounds)

    engine = {k: med("engine", k) for k in rounds[0]["engine"]}
    summary = {"model": args.model, "device": args.device, "precision": args.precision, "workers": args.workers,
               "engine_threads": engine_threads, "torch_compile": args.torch_compile, "cuda_graphs": graphs,
               "flags": args.flags,
               "decode": args.decode,
               "connections": args.connections, "cores": os.cpu_count(),
               "image_size": size, "rounds": rounds, "engine": engine,
               "forward_in_service_over_alone": statistics.median(
                   row["engine"]["forward_per_image_ms"] / row["raw_per_image_ms"] for row in rounds),
               "service_over_raw_at_mean_batch": statistics.median(
                   row["engine"]["rps"] * row["raw_per_image_ms"] / 1000 for row in rounds),
               "p50_concurrency_1_ms": singles, "p50_concurrency_1_wrk_ms": wrk_singles,
               "raw_single_forward_ms": raw_single_ms,
               "predicted_16_core_http_rps": 15 * 1000 / engine["http_cpu_ms_per_request"],
               "predicted_16_core_cpu_rps": 16 * 1000 / engine["all_cpu_ms_per_request"]}
    if args.variant:
        summary["variant_flags"] = args.variant
        summary["variant"] = {k: med("variant", k) for k in rounds[0]["variant"]}
        summary["variant_over_engine_rps"] = statistics.median(
            row["variant"]["rps"] / row["engine"]["rps"] for row in rounds)
    if args.landed:
        summary["landed"] = {k: med("landed", k) for k in rounds[0]["landed"]}
        summary["engine_over_landed_rps"] = statistics.median(
            row["engine"]["rps"] / row["landed"]["rps"] for row in rounds)
        summary["landed_forward_in_service_over_alone"] = statistics.median(
            row["landed"]["forward_per_image_ms"] / row["raw_per_image_ms"] for row in rounds)
    print(json.dumps({k: v for k, v in summary.items() if k != "rounds"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
