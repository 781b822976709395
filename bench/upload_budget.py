"""Big batches against one HTTP worker: its peak memory, and what each request got, for this checkout and,
with `--landed DIR`, another checkout of the service (`git worktree add DIR <commit>`), in one run.

    python bench/upload_budget.py --landed /tmp/landed --json docs/results/upload_budget.json

Each service runs from its own tree on this interpreter with one HTTP worker, the embedded model and its demo
prompt sets. `--batches` concurrent POST /classify/batch requests each carry `--images` PNGs of random pixels
(they do not compress) of about `--image-mb` MB; the worker's peak resident set (VmHWM) is read from /proc
after they are answered.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def noise_png(nbytes: int) -> bytes:
    side = int((nbytes / 3) ** 0.5)
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG", compress_level=0)
    return out.getvalue()


def peak_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024


def worker_pid(launcher: int) -> int:
    for pid in Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split():
        if b"worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return int(pid)
    raise RuntimeError("no HTTP worker")


async def batches(base: str, image: bytes, n_batches: int, n_images: int) -> list[int]:
    files = [("file", (f"{i}.png", image, "image/png")) for i in range(n_images)]
    async with httpx.AsyncClient(base_url=base, timeout=300) as client:
        answers = await asyncio.gather(*(client.post("/classify/batch?task=sketch", files=files)
                                         for _ in range(n_batches)), return_exceptions=True)
    return [a.status_code if isinstance(a, httpx.Response) else type(a).__name__ for a in answers]


def measure(tree: Path, port: int, image: bytes, args: argparse.Namespace) -> dict:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MMAP_")}, "PYTHONPATH": str(tree),
           "MMAP_WORKERS": "1", "MMAP_DEVICE": "cpu", "MMAP_WATCH_INTERVAL_S": "0"}
    process = subprocess.Popen([sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)],
                               cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(base + "/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, "the service did not start"
            time.sleep(0.2)
        worker = worker_pid(process.pid)
        before = peak_rss_mib(worker)
        started = time.perf_counter()
        statuses = asyncio.run(batches(base, image, args.batches, args.images))
        return {"tree": str(tree), "peak_rss_mib_before": round(before), "peak_rss_mib": round(peak_rss_mib(worker)),
                "statuses": statuses, "seconds": round(time.perf_counter() - started, 1)}
    finally:
        process.terminate()
        process.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--landed", type=Path, help="another checkout of the service to measure the same way")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--image-mb", type=float, default=19.0)
    parser.add_argument("--port", type=int, default=18090)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    image = noise_png(int(args.image_mb * 1e6))
    runs = [measure(REPO, args.port, image, args)]
    if args.landed:
        runs.append(measure(args.landed.resolve(), args.port + 1, image, args))
    result = {"batches": args.batches, "images": args.images, "image_bytes": len(image), "runs": runs}
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
