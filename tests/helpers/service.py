"""Helpers shared by the service tests (this module holds no tests).

The served backbone is the embedded default's architecture with seeded random weights
(`pretrained="random:0"`), the same weights as the `tiny` fixture of conftest.py, so prompt sets
created from `tiny` here are valid for the service: the real model, tiny enough to run in ms.
Every test serves through the real process layout: `python -m service` (launcher, engine process,
HTTP worker processes) on a loopback port; stopping it checks that nothing is left behind.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
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

from mmap_model import (
    Backbone,
    PromptConfig,
    PromptedCLIP,
    PromptSet,
    TaskSpec,
    calibrated_probabilities,
    class_text_features,
)
from mmap_model.backbone import EMBEDDED_DIR
from service import Settings
from service.transport import SHM_DIR, SHM_PREFIX

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
    """The documented atomic publish (`PromptSet.publish`): written aside, renamed into place."""
    return ps.publish(prompts_dir, name)


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


def jpeg(seed: int, size: tuple[int, int] = (48, 40), mode: str = "RGB", **options) -> bytes:
    """`image_bytes`'s image as a JPEG (quality 90) in Pillow mode `mode`; `options` go to Pillow's save."""
    buffer = io.BytesIO()
    Image.open(io.BytesIO(image_bytes(seed, size))).convert(mode).save(buffer, "JPEG", quality=90, **options)
    return buffer.getvalue()


def truncated(data: bytes) -> bytes:
    """A JPEG whose header is whole (it passes the workers' checks) and whose scan data stops halfway."""
    return data[: len(data) // 2]


def settings(prompts_dir: Path, **overrides: Any) -> Settings:
    values = {**SERVED, "prompts": prompts_dir, "device": "cpu", "watch_interval_s": 0, "workers": 1, **overrides}
    return Settings(**values)


def settings_env(config: Settings) -> dict[str, str]:
    """The settings as the MMAP_* environment of `python -m service`."""
    env = {}
    for name, value in config.model_dump().items():
        if value is not None:
            secret = getattr(value, "get_secret_value", None)
            env[f"MMAP_{name.upper()}"] = secret() if secret else str(value)
    return env


async def wait_ready(client: httpx.AsyncClient, timeout_s: float = 60) -> None:
    """/readyz is 200 with every HTTP worker taking connections."""
    deadline = time.monotonic() + timeout_s
    while not all_ready(response := await client.get("/readyz")):
        assert time.monotonic() < deadline, f"not ready after {timeout_s} s: {response.text}"
        await asyncio.sleep(0.02)


def all_ready(response: httpx.Response) -> bool:
    workers = response.json().get("workers") if response.status_code == 200 else None
    return response.status_code == 200 and (workers is None or workers["serving"] == workers["configured"])


@asynccontextmanager
async def serve(config: Settings, ready: bool = True) -> AsyncIterator[httpx.AsyncClient]:
    """`python -m service` with these settings behind an httpx client, once /readyz is 200 (or, with
    `ready=False`, once it answers at all)."""
    with served(config, ready) as base:
        async with client(base) as c:
            yield c


def client(base: str) -> httpx.AsyncClient:
    """An httpx client for a running service (`served`); use it as `async with client(base) as c`."""
    return httpx.AsyncClient(base_url=base, timeout=60)


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


def reference_scores(backbone: Backbone, ps: PromptSet, task: str, data: bytes,
                     labels: list[str] | None = None) -> dict[str, float]:
    """The same classification with mmap_model and open_clip only: no service code involved. Calibrated by the
    task's temperature; `labels`: against these class names with the task's prompts and template."""
    image = open_clip_preprocess(backbone)(Image.open(io.BytesIO(data)))
    prompted = PromptedCLIP(backbone.model)
    spec = ps.tasks[task]
    names = labels or spec.classnames
    with torch.inference_mode():
        prompts = ps.prompts(task)
        text = class_text_features(prompted, backbone.tokenizer, names, spec.template, prompts.text)
        visual = prompts.visual
        features = prompted.encode_image(image[None], visual, normalize=True)
        probs = calibrated_probabilities(prompted.logit_scale * features @ text.T, spec.temperature)[0]
    return dict(zip(names, probs.tolist(), strict=True))


def metric(text: str, name: str, **labels: str) -> float:
    """One sample of a Prometheus exposition; 0 if absent."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def metrics_added(before: str, after: str) -> Callable[..., float]:
    """added(name, **labels): how much a sample grew from the exposition `before` to `after`."""
    return lambda name, **labels: metric(after, name, **labels) - metric(before, name, **labels)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def service_process(log_path: Path, args: list[str], env: dict[str, str], ready_timeout_s: float = 90,
                    ready: bool = True) -> Iterator[tuple[str, subprocess.Popen]]:
    """`python -m service ARGS` (with `env` on top of a clean MMAP_* environment) on a free loopback port;
    yields the base URL once /readyz is 200 (`ready=False`: once /healthz answers). At the end it is
    stopped with SIGTERM (killed if it does not stop), and nothing of it may be left: no process, no
    shared-memory file, no runtime directory."""
    port = free_port()
    environment = {**{k: v for k, v in os.environ.items() if not k.startswith("MMAP_")}, **env}
    with log_path.open("w") as log:
        process = subprocess.Popen([sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port), *args],
                                   cwd=REPO, env=environment, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        children: list[int] = []
        try:
            deadline = time.monotonic() + ready_timeout_s
            while not _answers(base, "/readyz" if ready else "/healthz"):
                assert process.poll() is None, f"service exited: {log_path.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"service not ready in {ready_timeout_s} s"
                time.sleep(0.05)
            children = child_pids(process.pid)
            LAUNCHERS[base] = process
            yield base, process
        finally:
            LAUNCHERS.pop(base, None)
            children = children or child_pids(process.pid)
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            assert_nothing_left(process.pid, children)


@contextmanager
def served(config: Settings, ready: bool = True) -> Iterator[str]:
    """`python -m service` with these settings; yields its base URL (see service_process)."""
    with tempfile.TemporaryDirectory(prefix="service-log-") as logs, \
            service_process(Path(logs) / "service.log", [], settings_env(config), ready=ready) as (base, _):
        yield base


LAUNCHERS: dict[str, subprocess.Popen] = {}  # base URL -> the launcher process serving it


def launcher(base: str | httpx.AsyncClient) -> subprocess.Popen:
    return LAUNCHERS[str(getattr(base, "base_url", base)).rstrip("/")]


def engine_pid(base: str | httpx.AsyncClient) -> int:
    return next(p for p in child_pids(launcher(base).pid) if b"service.engine.loop" in _cmdline(p))


def worker_pids(base: str | httpx.AsyncClient) -> list[int]:
    return [p for p in child_pids(launcher(base).pid) if b"service.http.worker" in _cmdline(p)]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@contextmanager
def frozen(pid: int) -> Iterator[None]:
    """The process stopped (SIGSTOP) for the length of the block."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def failed_start(config: Settings, timeout_s: float = 120) -> tuple[int, str]:
    """Run `python -m service` with settings it cannot start with: its exit status and its log."""
    environment = {**{k: v for k, v in os.environ.items() if not k.startswith("MMAP_")}, **settings_env(config)}
    process = subprocess.run([sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(free_port())],
                             cwd=REPO, env=environment, capture_output=True, text=True, timeout=timeout_s)
    return process.returncode, process.stdout + process.stderr


def child_pids(pid: int) -> list[int]:
    """The launcher's children (the engine and the HTTP workers)."""
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def assert_nothing_left(launcher: int, children: list[int], timeout_s: float = 15) -> None:
    """No process of a stopped service runs, and its shared memory and runtime directory are gone."""
    deadline = time.monotonic() + timeout_s
    while any(alive(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in children if alive(p)], "processes of the service outlived it"
    assert not list(SHM_DIR.glob(f"{SHM_PREFIX}.{launcher}.*")), "shared memory left in /dev/shm"
    assert not list(Path(tempfile.gettempdir()).glob(f"{SHM_PREFIX}-{launcher}-*")), "runtime directory left"


def _answers(base: str, path: str) -> bool:
    """`path` answers 200; for /readyz, with every HTTP worker taking connections (tests count on all of them)."""
    try:
        response = httpx.get(f"{base}{path}", timeout=5)
    except httpx.TransportError:
        return False  # not listening yet
    return all_ready(response) if path == "/readyz" else response.status_code == 200
