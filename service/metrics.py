"""The service's Prometheus metrics (names and labels as in ARCHITECTURE.md), one registry per app.

A private `CollectorRegistry` per app keeps several apps in one process (tests) from clashing
and keeps `/metrics` to exactly these series. Labels are bounded: `task` is a loaded task name or
`UNKNOWN_TASK`, `status` an HTTP status code, `result` and `reason` small fixed sets.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

UNKNOWN_TASK = "_unknown"  # requests naming no loaded task share one label value
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The metric objects of one app."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mmap_requests", "classify requests by task and HTTP status",
                                ["task", "status"], registry=r)
        self.request_duration = Histogram("mmap_request_duration_seconds", "classify latency, upload read to response",
                                          ["task"], buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("mmap_queue_wait_seconds", "time a decoded image waits for its batch",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("mmap_batch_size", "images per image-tower forward",
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.inference_duration = Histogram("mmap_inference_duration_seconds", "one image-tower forward and scoring",
                                            buckets=_LATENCY_BUCKETS, registry=r)
        self.tasks_loaded = Gauge("mmap_tasks_loaded", "tasks in the serving snapshot", registry=r)
        self.prompt_set_loads = Counter("mmap_prompt_set_loads", "prompt-set (re)load attempts by result",
                                        ["result"], registry=r)
        self.images_rejected = Counter("mmap_images_rejected", "uploads refused by reason", ["reason"], registry=r)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
