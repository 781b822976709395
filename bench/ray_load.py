"""The Ray Serve path against `python -m service` on the same box, under the same `wrk` load, in one run.

    python bench/ray_load.py --rounds 3 --window-s 15 --json docs/results/ray_load.json

The CPU proxy of bench/wrk_load.py: the embedded mmap-tiny and its demo tasks, 48-px JPEG bodies, max batch 32,
one engine thread, `--connections` keep-alive connections from wrk pinned to the last core. `python -m service`
runs with one HTTP worker; Ray Serve (started here: `ray.init` on every core) with one `mmap-ingress` and one
`mmap-engine` replica (deploy/ray/serve_app.py). Rounds alternate; while Ray is measured the service is frozen
(SIGSTOP), while the service is measured Ray is idle (its own daemons keep running).

Ray's own share: the same wrk load on a Serve deployment that reads the image and answers at once
(`/echo`, through the same proxy) is the ceiling of any Serve application on this box; and the ingress
replica's handle call to the engine is timed alone (one 48-px image a call, sequentially).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
from uploads import synthetic_jpegs
from wrk_load import LUA, Server, wrk

from mmap_model import EMBEDDED_PROMPTS_DIR

REPO = Path(__file__).resolve().parents[1]
DEPLOY_RAY = REPO / "deploy" / "ray"


def start_ray(port: int, direct_port: int, settings: dict) -> None:
    import ray
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import Response

    sys.path.insert(0, str(DEPLOY_RAY))
    import serve_app

    ray.init(include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(DEPLOY_RAY)}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cpu = {"num_cpus": 0.5, "num_gpus": 0}
    engine = serve_app.MmapEngine.options(num_replicas=1, ray_actor_options=cpu).bind(settings=settings)
    ingress = serve_app.MmapIngress.options(num_replicas=1, ray_actor_options=cpu)
    serve.run(ingress.bind(engine, settings=settings, http_port=direct_port), name="mmap", route_prefix="/")

    @serve.deployment(name="echo", ray_actor_options=cpu, max_ongoing_requests=256)  # as mmap-ingress
    class Echo:
        async def __call__(self, request: Request) -> Response:
            await request.body()
            return Response(b'{"ok":true}', media_type="application/json")

    serve.run(Echo.bind(), name="echo", route_prefix="/echo")


def wait_ready(base: str) -> None:
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{base} not ready"
        time.sleep(0.5)


def handle_round_trip_ms(body: bytes, n: int) -> float:
    """The median time of an ingress-to-engine handle call for one image, timed from this driver: what each
    batch pays on the Ray path on top of the engine's own work (the forward included)."""
    import msgspec
    import numpy as np
    from ray import serve

    from service import transport
    from service.http.uploads import Preprocessor
    from service.transport import EngineInfo, Infer, InferBatch

    handle = serve.get_deployment_handle("mmap-engine", app_name="mmap")
    info = msgspec.json.decode(handle.engine_info.remote().result(), type=EngineInfo)
    pixels = Preprocessor(info.preprocess, 10**8)(body)
    payload = transport.encode(InferBatch(np.ascontiguousarray(pixels[None]).tobytes(),
                                          [Infer(id=0, slot=0, task="sketch", top_k=5)]))

    async def timed() -> list[float]:
        took = []
        for _ in range(n):
            started = time.perf_counter()
            await handle.infer.remote(payload)
            took.append(1000 * (time.perf_counter() - started))
        return took

    return statistics.median(asyncio.run(timed()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warm-s", type=int, default=3)
    parser.add_argument("--window-s", type=int, default=15)
    parser.add_argument("--wrk-cores", default=str((os.cpu_count() or 1) - 1))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    tasks = sorted(t for p in EMBEDDED_PROMPTS_DIR.iterdir() if (p / "promptset.json").is_file()
                   for t in json.loads((p / "promptset.json").read_text())["tasks"])
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ray-load-")))
        bodies = synthetic_jpegs(16, 48)
        lines, echo = [], []
        for i, body in enumerate(bodies):
            (tmp / f"{i}.jpg").write_bytes(body)
            lines.append(f"/classify?task={tasks[i % len(tasks)]} {tmp / f'{i}.jpg'}\n")
            echo.append(f"/echo {tmp / f'{i}.jpg'}\n")
        (tmp / "targets.txt").write_text("".join(lines))
        (tmp / "echo.txt").write_text("".join(echo))
        (tmp / "load.lua").write_text(LUA)
        script, targets = tmp / "load.lua", tmp / "targets.txt"

        common = ["--model", "mmap-tiny", "--pretrained", "embedded", "--prompts", str(EMBEDDED_PROMPTS_DIR),
                  "--device", "cpu", "--max-batch-size", "32", "--watch-interval-s", "0", "--queue-size",
                  str(max(256, args.connections)), "--log-level", "warning", "--workers", "1", "--engine-threads", "1"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MMAP_")}
        service = Server("service", REPO, common, 18080, tmp / "service.log", env)
        stack.callback(service.stop)
        settings = {"model": "mmap-tiny", "pretrained": "embedded", "prompts": str(EMBEDDED_PROMPTS_DIR),
                    "device": "cpu", "max_batch_size": 32, "watch_interval_s": 0, "engine_threads": 1,
                    "queue_size": max(256, args.connections), "log_level": "warning"}
        with service.frozen():
            start_ray(18085, 18086, settings)
            wait_ready("http://127.0.0.1:18085")
            wait_ready("http://127.0.0.1:18086")
        ray_base, direct_base = "http://127.0.0.1:18085", "http://127.0.0.1:18086"

        def load(base: str, listing: Path) -> dict:
            wrk(base, script, listing, args.connections, args.warm_s, args.wrk_cores)
            return wrk(base, script, listing, args.connections, args.window_s, args.wrk_cores)

        rounds = []
        for r in range(args.rounds):
            row = {"service": load(service.base, targets)}
            with service.frozen():
                row["ray"] = load(ray_base, targets)
                row["ray_direct"] = load(direct_base, targets)
                row["ray_echo"] = load(ray_base, tmp / "echo.txt")
            row["ray_over_service"] = row["ray"]["rps"] / row["service"]["rps"]
            row["ray_direct_over_service"] = row["ray_direct"]["rps"] / row["service"]["rps"]
            print(f"round {r}: " + json.dumps(row), flush=True)
            rounds.append(row)
        with service.frozen():
            hop_ms = handle_round_trip_ms(bodies[0], 200)
        result = {"rounds": rounds,
                  "ray_over_service_median": statistics.median(r["ray_over_service"] for r in rounds),
                  "ray_direct_over_service_median": statistics.median(r["ray_direct_over_service"] for r in rounds),
                  "echo_rps_median": statistics.median(r["ray_echo"]["rps"] for r in rounds),
                  "handle_round_trip_ms_one_image": hop_ms}
        print(json.dumps(result, indent=1))
        if args.json:
            args.json.write_text(json.dumps(result, indent=1) + "\n")
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
