"""Bytes per served task: on the engine (host RSS, and the tensors that would sit on the device) and per HTTP worker.

    python bench/task_memory.py                              # the embedded model, 2,000 tasks
    python bench/task_memory.py --model ViT-B-16 --tasks 200 # ViT-B-16 shapes, random weights

One-task sets of `--classes` classes (random prompts, MmAP defaults) are written, then loaded by the
engine's `Registry` in this process twice: `--tasks // 4` of them first (so that first-use costs,
allocator pools and caches, are paid), then `--tasks` more; the RSS growth of the second load over its
tasks is the host memory a task costs on the engine (on a CPU the device is the host, so it includes
the tensors). The device share is counted from the tensors a task holds: its class-text features
[C, D] (fp32), its row of a visual-prompt bank [J, m, d_v] (fp32) and its text prompts (for
`labels=`). A worker's share: the catalog entries of those tasks decoded from the engine's own
message (`transport.Catalog`) into a `CatalogView`, RSS growth over tasks (after the same for the
first load). Extrapolated to 100,000 tasks.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
import tempfile
from pathlib import Path

import torch
from many_tasks import make_sets

from mmap_model import load_backbone
from service.engine.catalog import CatalogFeed
from service.engine.registry import Registry
from service.http.engine_client import CatalogView
from service.metrics import Metrics
from service.transport import decode_to_worker, encode


def rss_bytes() -> int:
    gc.collect()
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def engine_bytes(backbone, directory: Path) -> tuple[int, dict[str, float], Registry]:
    before = rss_bytes()
    registry = Registry(backbone, directory, Metrics())
    registry.scan()
    handles = list(registry.snapshot.tasks.values())
    tensors = {
        "text_features": sum(h.text_features.nbytes for h in handles),
        "visual_prompt_rows": sum(h.visual_prompts.nbytes for h in handles if h.visual_prompts is not None),
        "text_prompts": sum(h.text_prompts.nbytes for h in handles if h.text_prompts is not None)}
    return rss_bytes() - before, {k: v / len(handles) for k, v in tensors.items()}, registry


def worker_bytes(registry: Registry) -> int:
    feed = CatalogFeed(registry, lambda: None, lambda: 0, max_metered=100)
    message = encode(feed.full())
    before = rss_bytes()
    view = CatalogView("")
    view.apply(decode_to_worker(message))
    used = rss_bytes() - before
    assert len(view.tasks) == len(registry.snapshot.tasks)
    return used, len(message)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mmap-tiny")
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--classes", type=int, default=40)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    backbone = (load_backbone("mmap-tiny", "embedded", "cpu") if args.model == "mmap-tiny"
                else load_backbone(args.model, None, "cpu", seed=0))
    result = {"model": args.model, "classes": args.classes, "embed_dim": backbone.widths.embed_dim}
    with tempfile.TemporaryDirectory(prefix="task-memory-") as tmp:
        small, large = Path(tmp) / "small", Path(tmp) / "large"
        make_sets(backbone, large, 0, args.tasks, args.classes, "unique")
        make_sets(backbone, small, 0, args.tasks // 4, args.classes, "unique")
        _, _, warm = engine_bytes(backbone, small)  # first-use costs (allocator pools, caches) go here
        worker_bytes(warm)
        engine_rss, tensors, registry = engine_bytes(backbone, large)
        worker, message = worker_bytes(registry)
    tasks = args.tasks
    per_task_host = engine_rss / tasks
    device = sum(tensors.values())
    result.update({
        "tasks": args.tasks, "engine_host_bytes_per_task": per_task_host, "device_bytes_per_task": device,
        "device_tensors_per_task": tensors, "worker_bytes_per_task": worker / tasks,
        "catalog_message_bytes_per_task": message / tasks,
        "for_100k_tasks_gib": {"engine_host": per_task_host * 1e5 / 2**30, "device": device * 1e5 / 2**30,
                               "each_worker": worker / tasks * 1e5 / 2**30}})
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
