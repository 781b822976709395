"""Helpers shared by the service tests (this module holds no tests).

The served backbone is the embedded default's architecture with seeded random weights
(`pretrained="random:0"`), the same weights as the `tiny` fixture of conftest.py, so prompt sets
created from `tiny` here are valid for the service: the real model, tiny enough to run in ms.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import open_clip
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from mmap_model import Backbone, PromptConfig, PromptedCLIP, PromptSet, TaskSpec, class_text_features
from mmap_model.backbone import EMBEDDED_DIR
from service import Settings, create_app

REPO = Path(__file__).resolve().parents[1]
SERVED = {"model": "mmap-tiny", "pretrained": "random:0"}  # = conftest's `tiny` (seed 0)
SERVED_ENV = {"MMAP_MODEL": "mmap-tiny", "MMAP_PRETRAINED": "random:0", "MMAP_DEVICE": "cpu"}

OFFICE = {"clipart": TaskSpec(["dog", "cat", "car", "tree"], "a clipart of a {}.", "office"),
          "product": TaskSpec(["mug", "pen", "lamp"], "a product photo of a {}.", "office"),
          "real": TaskSpec(["dog", "cat", "car", "tree", "boat"])}  # no group: 2 visual tokens, not 4
DOODLES = {"sketch": TaskSpec(["apple", "pear"], "a sketch of a {}.", "lines"),
           "quickdraw": TaskSpec(["apple", "pear", "plum"], "a doodle of a {}.", "lines")}


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


def make_set(backbone: Backbone, name: str, tasks: dict[str, TaskSpec], seed: int,
             cfg: PromptConfig | None = None) -> PromptSet:
    torch.manual_seed(seed)
    return PromptSet.create(name, backbone, cfg or PromptConfig(), tasks)


def publish(ps: PromptSet, prompts_dir: Path, name: str | None = None) -> Path:
    """The documented atomic publish: write `.<name>.tmp/`, then rename it into place
    (an existing set is renamed away first and deleted after)."""
    name = name or ps.name
    staging, target, old = prompts_dir / f".{name}.tmp", prompts_dir / name, prompts_dir / f".{name}.old"
    ps.save(staging)
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def image_bytes(seed: int, size: tuple[int, int] = (48, 40), fmt: str = "PNG") -> bytes:
    """A smooth random image (a few blobs), encoded; different seeds give clearly different images."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    canvas = np.zeros((h, w, 3))
    for _ in range(4):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(4, max(w, h) / 2)
        canvas += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None] * rng.uniform(0, 255, 3)
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def settings(prompts_dir: Path, **overrides: Any) -> Settings:
    values = {**SERVED, "prompts": prompts_dir, "device": "cpu", "watch_interval_s": 0, "decode_workers": 2,
              **overrides}
    return Settings(**values)


async def wait_ready(client: httpx.AsyncClient, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while (response := await client.get("/readyz")).status_code != 200:
        assert time.monotonic() < deadline, f"not ready after {timeout_s} s: {response.text}"
        await asyncio.sleep(0.02)


@asynccontextmanager
async def serve(config: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app in-process (lifespan run as uvicorn would) behind an httpx client, once /readyz is 200."""
    app = create_app(config)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://service", timeout=60) as client:
            await wait_ready(client)
            yield client


async def classify(client: httpx.AsyncClient, task: str, data: bytes, top_k: int = 100) -> httpx.Response:
    """POST the image as multipart field `file` (top_k 100: every class of a test task)."""
    return await client.post("/classify", params={"task": task, "top_k": top_k},
                             files={"file": ("image", data, "application/octet-stream")})


def scores(response: httpx.Response) -> dict[str, float]:
    assert response.status_code == 200, response.text
    return {p["label"]: p["score"] for p in response.json()["predictions"]}


def open_clip_preprocess(backbone: Backbone) -> Callable:
    """open_clip's own eval transform for the served architecture, built by open_clip itself."""
    name = f"local-dir:{EMBEDDED_DIR}" if backbone.model_name == "mmap-tiny" else backbone.model_name
    return open_clip.create_model_and_transforms(name, load_weights=False)[2]


def reference_scores(backbone: Backbone, ps: PromptSet, task: str, data: bytes) -> dict[str, float]:
    """The same classification with mmap_model and open_clip only: no service code involved."""
    image = open_clip_preprocess(backbone)(Image.open(io.BytesIO(data)))
    prompted = PromptedCLIP(backbone.model)
    spec = ps.tasks[task]
    with torch.inference_mode():
        prompts = ps.prompts(task)
        text = class_text_features(prompted, backbone.tokenizer, spec.classnames, spec.template, prompts.text)
        visual = prompts.visual
        features = prompted.encode_image(image[None], visual, normalize=True)
        probs = (prompted.logit_scale * features @ text.T).softmax(-1)[0]
    return dict(zip(spec.classnames, probs.tolist(), strict=True))


def metric(text: str, name: str, **labels: str) -> float:
    """One sample of a Prometheus exposition; 0 if absent."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def service_process(log_path: Path, args: list[str], env: dict[str, str],
                    ready_timeout_s: float = 90) -> Iterator[tuple[str, subprocess.Popen]]:
    """`python -m service ARGS` (with `env` on top of a clean MMAP_* environment) on a free loopback port;
    yields the base URL once /readyz is 200, and stops the process at the end, whatever happens."""
    port = free_port()
    environment = {**{k: v for k, v in os.environ.items() if not k.startswith("MMAP_")}, **env}
    with log_path.open("w") as log:
        process = subprocess.Popen([sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port), *args],
                                   cwd=REPO, env=environment, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + ready_timeout_s
            while not _ready(base):
                assert process.poll() is None, f"service exited: {log_path.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"service not ready in {ready_timeout_s} s"
                time.sleep(0.1)
            yield base, process
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/readyz", timeout=5).status_code == 200
    except httpx.TransportError:
        return False  # not listening yet: the backbone loads before the socket opens
