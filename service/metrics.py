"""The service's Prometheus metrics (names and labels as in docs/architecture.md), summed over its processes.

The launcher gives every process it starts the same `PROMETHEUS_MULTIPROC_DIR`: prometheus_client
then keeps each process's values in files there, and `/metrics` (any worker) adds them up, so a
counter equals the traffic whichever worker took it, and counts of a worker that died stay counted.
HTTP workers write the request metrics, the engine the batching, inference and prompt-set ones.
Without that variable (a process on its own) the values stay in the process and `/metrics` shows them.

Labels are bounded: `task` is one of at most `metrics_max_tasks` loaded tasks (the engine picks
them, the catalog says which: `TaskInfo.metered`), `OTHER_TASKS` for every other loaded task, or
`UNKNOWN_TASK`; `status` an HTTP status code; `result` and `reason` small fixed sets. Totals over
all label values stay exact whatever the number of tasks.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
UNKNOWN_TASK = "_unknown"  # requests naming no loaded task share one label value
OTHER_TASKS = "_other"  # loaded tasks beyond metrics_max_tasks share one label value
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_PER_IMAGE_BUCKETS = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The metric objects of one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mmap_requests", "classify requests by task and HTTP status",
                                ["task", "status"], registry=r)
        self.request_duration = Histogram("mmap_request_duration_seconds", "classify latency, upload read to response",
                                          ["task"], buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("mmap_queue_wait_seconds", "time a decoded image waits in the engine for its batch",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("mmap_batch_size", "images per image-tower forward",
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.inference_duration = Histogram("mmap_inference_duration_seconds", "one image-tower forward and scoring",
                                            buckets=_LATENCY_BUCKETS, registry=r)
        self.forward_per_image = Histogram("mmap_forward_seconds_per_image",
                                           "one image-tower forward and scoring divided by its images",
                                           buckets=_PER_IMAGE_BUCKETS, registry=r)
        self.decode_per_image = Histogram("mmap_engine_decode_seconds_per_image",
                                          "JPEG decoding and resizing on the engine (decode=engine), per image",
                                          buckets=_PER_IMAGE_BUCKETS, registry=r)
        self.tasks_loaded = Gauge("mmap_tasks_loaded", "tasks in the serving snapshot", registry=r,
                                  multiprocess_mode="livemax")
        self.prompt_sets_loaded = Gauge("mmap_prompt_sets_loaded", "prompt sets in the serving snapshot", registry=r,
                                        multiprocess_mode="livemax")
        self.prompt_set_loads = Counter("mmap_prompt_set_loads", "prompt-set (re)load attempts by result",
                                        ["result"], registry=r)
        self.images_rejected = Counter("mmap_images_rejected", "uploads refused by reason", ["reason"], registry=r)
        self.label_cache = Counter("mmap_label_cache", "caller label sets (labels=): text features cached or computed",
                                   ["result"], registry=r)

    def render(self) -> bytes:
        """The text exposition format: every process of the service, or this one alone."""
        if not os.environ.get(MULTIPROC_ENV):
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)

