"""Service load benchmark: `python bench/load.py [--quick] [--model ViT-B-32] [--device cuda --precision fp16]`.

One run does everything, so the ratios compare numbers taken on the same machine minutes apart:
1. Builds the backbone with seeded random weights in this process and saves 16 tasks (4 prompt
   sets x 4 tasks, one group each, so one visual-prompt signature) bound to its fingerprint in a
   temporary prompt directory.
2. Starts `python -m service` on loopback with `--pretrained random:<seed>`: the same weights
   (it checks the fingerprint: a mismatch would leave the service without tasks).
3. Alternates, for `--rounds` rounds: the raw batched prompted image-tower forward here (same batch
   size as the service's, per-sample prompts of mixed tasks); the service under `--concurrency`
   closed-loop clients over the 16 tasks mixed; the same over one task. Then sequential requests
   (concurrency 1), each right after a raw single-image forward.
   While a raw forward runs, the service process is frozen (SIGSTOP, then SIGCONT), so nothing of
   the service (watcher, event loop, worker threads winding down after a request) can take CPU from
   the reference. On a quiet machine the effect is small (a raw single-image forward right after a
   request: 161 and 227 ms with the service running, 168 and 150 ms frozen); it removes a doubt
   rather than a bias.
Requests carry 224x224 JPEGs (what a client that resizes sends; `--image-size` for larger uploads) as
raw image/jpeg bodies. On a GPU (`--device cuda`) the reference is the service's own image tower
(`TorchImageTower`: pinned staging, autocast) called directly, and `--clients` load
generator processes share the concurrency, since one Python client cannot keep a GPU service busy.
Throughput is measured inside a timed window that follows an untimed warm-up (see `drive`).
Each ratio is the median of per-round (or per-pair) ratios: on a machine shared with other jobs
the absolute numbers swing from minute to minute, and pairing keeps both sides of a ratio under
the same conditions. Random weights: the cost does not depend on their values.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from uploads import synthetic_jpegs

from mmap_model import PromptConfig, PromptSet, TaskSpec, load_backbone
from service.engine.backends import TorchImageTower

REPO = Path(__file__).resolve().parents[1]
WORDS = ["apple", "boat", "chair", "dog", "eagle", "fork", "guitar", "house", "island", "jacket", "kite", "lamp",
         "mountain", "necklace", "orange", "piano", "quilt", "rabbit", "saddle", "tiger", "umbrella", "violin",
         "wagon", "xylophone", "yacht", "zebra"]
GOALS = {"service / raw batched forward": (">=", 0.90), "16 mixed tasks / one task": (">=", 0.95),
         "p50 at concurrency 1 / raw single forward": ("<=", 1.15)}


def make_prompt_sets(backbone, directory: Path, n_sets: int, tasks_per_set: int, n_classes: int) -> list[str]:
    """Prompt sets with default MmAP settings; every task grouped, so all share one (J, m) signature."""
    names = []
    for s in range(n_sets):
        torch.manual_seed(100 + s)
        tasks = {}
        for t in range(tasks_per_set):
            name = f"domain{s}_{t}"
            classes = [WORDS[(s * 7 + t * 3 + c) % len(WORDS)] + f" {c}" for c in range(n_classes)]
            tasks[name] = TaskSpec(classes, f"a {name} photo of a {{}}.", f"group{s}")
            names.append(name)
        PromptSet.create(f"set{s}", backbone, PromptConfig(), tasks).publish(directory)
    return names


def service_pids(pid: int) -> list[int]:
    """The service's processes: the launcher and its children (the engine and the HTTP workers)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [pid, *(int(p) for p in children.read_text().split())] if children.exists() else [pid]


def cpu_seconds(pids: int | list[int]) -> float:
    """User + system CPU time of processes so far (Linux /proc), all their threads."""
    total = 0.0
    for pid in [pids] if isinstance(pids, int) else pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def service_sums(base: str) -> dict[str, float]:
    """The service's own histogram sums and counts (/metrics): forwards, images, seconds spent in them."""
    wanted = ("mmap_batch_size_count", "mmap_batch_size_sum", "mmap_inference_duration_seconds_sum")
    text = httpx.get(f"{base}/metrics", timeout=30).text
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if s.name in wanted}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(args, prompts: Path, port: int, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port), "--prompts", str(prompts),
               "--model", args.model, "--pretrained", f"random:{args.seed}", "--device", args.device,
               "--precision", args.precision, "--decode-workers", str(args.decode_workers),
               "--backend", args.backend, "--torch-compile", args.torch_compile,
               "--max-batch-size", str(args.batch), "--max-wait-ms", str(args.max_wait_ms),
               "--queue-size", str(4 * args.concurrency), "--watch-interval-s", "0", "--log-level", "warning"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMAP_")}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_ready(base: str, process: subprocess.Popen, expected_tasks: int, log: Path) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"service exited:\n{log.read_text()[-3000:]}")
        try:
            ready = httpx.get(f"{base}/readyz", timeout=5)
            if ready.status_code == 200:
                tasks = ready.json()["tasks"]
                if tasks != expected_tasks:
                    sys.exit(f"service serves {tasks} tasks, expected {expected_tasks} (fingerprint mismatch?)")
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    sys.exit("service not ready in 300 s")


@contextlib.contextmanager
def frozen(process: subprocess.Popen | None):
    """The service's processes stopped by the kernel for the duration: they take no CPU at all."""
    pids = [] if process is None else service_pids(process.pid)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


class RawForward:
    """The service's image tower on the same backbone, called directly: the reference for the service."""

    def __init__(self, backbone, prompts_dir: Path, images: list[bytes], batch: int):
        self.service: subprocess.Popen | None = None  # frozen while a forward is timed
        self.tower = TorchImageTower(backbone)
        sets = {p.name: PromptSet.load(p, backbone) for p in sorted(prompts_dir.iterdir())}
        with torch.inference_mode():
            self.bank = torch.stack([ps.prompts(t).visual for ps in sets.values()
                                     for t in ps.tasks]).to(backbone.device)
        self.pixels = torch.stack([backbone.preprocess(Image.open(io.BytesIO(d))) for d in images])
        for size in (1, batch):  # first-call costs per shape (the CPU kernels' setup): 25% of the first batch
            self.seconds(size)

    def seconds(self, batch: int, repeats: int = 1) -> float:
        """Median wall seconds of one forward of `batch` images with per-sample prompts of mixed tasks."""
        images = self.pixels[torch.arange(batch) % len(self.pixels)]
        prompts = self.bank[torch.arange(batch) % len(self.bank)]
        times = []
        with torch.inference_mode(), frozen(self.service):
            for _ in range(repeats):
                start = time.perf_counter()
                self.tower(images, prompts)  # returns on the CPU: a GPU forward is complete
                times.append(time.perf_counter() - start)
        return statistics.median(times)


def drive_processes(clients: int, base: str, tasks: list[str], images: list[bytes], concurrency: int, warm_s: float,
                    window_s: float) -> tuple[float, list[float], int, float]:
    """`drive` split over `clients` processes (1: in this one): summed throughput, all latencies, failures,
    and the cores the load generator used (its child processes included)."""
    before = os.times()
    if clients == 1:
        throughput, latencies, failures = asyncio.run(drive(base, tasks, images, concurrency, warm_s, window_s))
    else:
        shares = [concurrency // clients + (c < concurrency % clients) for c in range(clients)]
        with ProcessPoolExecutor(clients) as pool:
            futures = [pool.submit(run_drive, base, tasks[c:] + tasks[:c], images, n, warm_s, window_s)
                       for c, n in enumerate(shares)]
            done = [f.result() for f in futures]
        throughput, latencies, failures = (sum(d[0] for d in done), [x for d in done for x in d[1]],
                                           sum(d[2] for d in done))
    after = os.times()
    cores = ((after.user + after.system + after.children_user + after.children_system
              - before.user - before.system - before.children_user - before.children_system)
             / (after.elapsed - before.elapsed))
    return throughput, latencies, failures, cores


def run_drive(*args) -> tuple[float, list[float], int]:
    return asyncio.run(drive(*args))


async def drive(base: str, tasks: list[str], images: list[bytes], concurrency: int, warm_s: float,
                window_s: float) -> tuple[float, list[float], int]:
    """Closed-loop clients for warm_s + window_s: (throughput in the window, its latencies, failures).

    Throughput sums each client's rate, (completions - 1) / (last - first completion) inside the
    window: answers leave in batch-sized bursts, and a plain count / window would be off by up to
    one burst depending on where the window edges fall.
    """
    ended_at: list[list[float]] = [[] for _ in range(concurrency)]
    latencies: list[float] = []
    failures = 0
    start = time.perf_counter()
    window = (start + warm_s, start + warm_s + window_s)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        async def worker(w: int) -> None:
            nonlocal failures
            i = w
            while time.perf_counter() < window[1]:
                task = tasks[i % len(tasks)]
                sent = time.perf_counter()
                try:
                    response = await client.post(f"/classify?task={task}&top_k=1", content=images[i % len(images)],
                                                 headers={"content-type": "image/jpeg"})
                except httpx.TransportError:  # e.g. a keep-alive connection the server closed as it was reused
                    response = None
                ended = time.perf_counter()
                if response is None or response.status_code != 200:
                    failures += 1
                elif window[0] <= ended <= window[1]:
                    ended_at[w].append(ended)
                    latencies.append(ended - sent)
                i += concurrency + 1  # walks tasks and images in a different order per worker
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    per_client = statistics.median(len(t) for t in ended_at)
    if per_client < 4:
        print(f"warning: a client finished only {per_client:g} requests in the window; lengthen --window-s", flush=True)
    throughput = sum((len(t) - 1) / (t[-1] - t[0]) for t in ended_at if len(t) >= 2)
    return throughput, latencies, failures


async def sequential(base: str, task: str, images: list[bytes], n: int,
                     raw: RawForward) -> tuple[list[float], list[float]]:
    """One request at a time, each right after a raw single-image forward (both under the same machine
    conditions): (request latencies, raw forward seconds)."""
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        latencies, forwards = [], []
        for i in range(n + 2):
            forward = raw.seconds(1)
            sent = time.perf_counter()
            response = await client.post(f"/classify?task={task}&top_k=1", content=images[i % len(images)],
                                         headers={"content-type": "image/jpeg"})
            response.raise_for_status()
            if i >= 2:  # the first two are warm-up
                latencies.append(time.perf_counter() - sent)
                forwards.append(forward)
    return latencies, forwards


def ms(seconds: float) -> str:
    return f"{1000 * seconds:.0f}"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sets", type=int, default=4)
    parser.add_argument("--tasks-per-set", type=int, default=4)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32, help="the service's max batch size and the raw batch")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=64,
                        help="closed-loop clients (2 x batch keeps one batch queued)")
    parser.add_argument("--warm-s", type=float, default=6.0, help="untimed start of each load phase")
    parser.add_argument("--window-s", type=float, default=30.0,
                        help="timed part of each load phase: long enough for every client to finish several requests")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--raw-repeats", type=int, default=2, help="raw batched forwards per round (median)")
    parser.add_argument("--single", type=int, default=40, help="sequential requests at concurrency 1")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument("--backend", choices=["torch", "onnx"], default="torch",
                        help="the service's backend (the raw reference is always the torch tower)")
    parser.add_argument("--torch-compile", default="off", help="the service's torch_compile mode")
    parser.add_argument("--decode-workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="the service's decode threads")
    parser.add_argument("--image-size", type=int, default=None,
                        help="side of the uploaded JPEGs (default: the model's input)")
    parser.add_argument("--clients", type=int, default=1, help="load generator processes sharing --concurrency")
    parser.add_argument("--quick", action="store_true", help="smoke run: short phases, one round")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.quick:  # checks the harness end to end in about a minute; its ratios mean little
        args.batch, args.concurrency, args.warm_s, args.window_s, args.rounds, args.raw_repeats, args.single = (
            8, 16, 3.0, 8.0, 1, 1, 8)

    backbone = load_backbone(args.model, None, args.device, args.precision, seed=args.seed)
    work = Path(tempfile.mkdtemp(prefix="mmap-load-"))
    prompts = work / "prompts"
    tasks = make_prompt_sets(backbone, prompts, args.sets, args.tasks_per_set, args.classes)
    images = synthetic_jpegs(64, args.image_size or backbone.image_size)
    raw = RawForward(backbone, prompts, images, args.batch)
    port, log = free_port(), work / "service.log"
    base = f"http://127.0.0.1:{port}"
    process = raw.service = start_service(args, prompts, port, log)
    print(f"model {args.model} (random weights, seed {args.seed}), {len(tasks)} tasks in {args.sets} prompt sets, "
          f"{torch.get_num_threads()} torch threads, {os.cpu_count()} cores, {args.device}/{args.precision}; batch "
          f"{args.batch}, concurrency {args.concurrency} from {args.clients} client process(es), uploads "
          f"{args.image_size or backbone.image_size} px, windows {args.window_s:g} s x {args.rounds} rounds",
          flush=True)
    try:
        wait_ready(base, process, len(tasks), log)
        rounds: list[dict[str, float]] = []
        mixed_latencies: list[float] = []
        failures = 0
        for r in range(args.rounds):
            raw_img_s = args.batch / raw.seconds(args.batch, args.raw_repeats)
            cpu, sums = (cpu_seconds(service_pids(process.pid)), time.perf_counter()), service_sums(base)
            mixed, latencies, failed_mixed, client_cores = drive_processes(
                args.clients, base, tasks, images, args.concurrency, args.warm_s, args.window_s)
            wall = time.perf_counter() - cpu[1]
            sums = {k: v - sums[k] for k, v in service_sums(base).items()}
            busy = sums["mmap_inference_duration_seconds_sum"] / wall
            mean_batch = sums["mmap_batch_size_sum"] / max(sums["mmap_batch_size_count"], 1)
            in_forward = sums["mmap_batch_size_sum"] / sums["mmap_inference_duration_seconds_sum"]
            service_cores = (cpu_seconds(service_pids(process.pid)) - cpu[0]) / wall
            one, _, failed_one, _ = drive_processes(args.clients, base, tasks[:1], images, args.concurrency,
                                                    args.warm_s, args.window_s)
            rounds.append({"raw_img_s": raw_img_s, "mixed_req_s": mixed, "one_task_req_s": one,
                           "service_cores": service_cores, "client_cores": client_cores, "forward_busy": busy,
                           "mean_batch": mean_batch, "img_s_inside_forwards": in_forward})
            mixed_latencies += latencies
            failures += failed_mixed + failed_one
            print(f"round {r + 1}: raw batched {raw_img_s:.2f} img/s, {len(tasks)} tasks mixed {mixed:.2f} req/s, "
                  f"one task {one:.2f} req/s", flush=True)
            print(f"  mixed phase: service {service_cores:.2f} cores, load generator {client_cores:.2f}; the service's "
                  f"forwards busy {busy:.0%} of the time, mean batch {mean_batch:.1f}, {in_forward:.2f} img/s inside "
                  "them", flush=True)
        c1_latencies, raw_single = asyncio.run(sequential(base, tasks[0], images, args.single, raw))
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    report(args, len(tasks), rounds, mixed_latencies, c1_latencies, raw_single, failures)


def report(args, n_tasks: int, rounds: list[dict[str, float]], mixed_latencies: list[float],
           c1_latencies: list[float], raw_single: list[float], failures: int) -> None:
    """Medians, and each ratio as the median of its per-round ratios (concurrency 1: of the pairs)."""
    med = statistics.median
    ratios = {"service / raw batched forward": med(r["mixed_req_s"] / r["raw_img_s"] for r in rounds),
              "16 mixed tasks / one task": med(r["mixed_req_s"] / r["one_task_req_s"] for r in rounds),
              "p50 at concurrency 1 / raw single forward": med(c1_latencies) / med(raw_single)}
    print(f"raw batched forward (batch {args.batch}):  {med(r['raw_img_s'] for r in rounds):7.2f} img/s")
    print(f"service, {n_tasks} tasks mixed:         {med(r['mixed_req_s'] for r in rounds):7.2f} req/s   latency "
          f"p50 {ms(percentile(mixed_latencies, 50))} p95 {ms(percentile(mixed_latencies, 95))} "
          f"p99 {ms(percentile(mixed_latencies, 99))} ms (concurrency {args.concurrency})")
    print(f"service, one task:                {med(r['one_task_req_s'] for r in rounds):7.2f} req/s")
    print(f"raw single-image forward:          {ms(med(raw_single))} ms (median of {len(raw_single)})")
    print(f"service at concurrency 1:          p50 {ms(percentile(c1_latencies, 50))} "
          f"p95 {ms(percentile(c1_latencies, 95))} p99 {ms(percentile(c1_latencies, 99))} ms")
    print(f"failed requests: {failures}")
    for name, value in ratios.items():
        op, goal = GOALS[name]
        met = value >= goal if op == ">=" else value <= goal
        print(f"{name:45s} {value:6.3f}   goal {op} {goal:.2f}   {'met' if met else 'NOT met'}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rounds": rounds,
                                         "c1_latencies_s": c1_latencies, "raw_single_s": raw_single,
                                         "ratios": ratios, "failures": failures}, indent=2))


if __name__ == "__main__":
    main()
