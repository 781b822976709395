"""Service settings: every field is an `MMAP_<FIELD>` environment variable and a `python -m service` flag."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from mmap_model.embedded import EMBEDDED_MODEL, EMBEDDED_PRETRAINED, EMBEDDED_PROMPTS_DIR

RANDOM_WEIGHTS = re.compile(r"^random:(\d+)$")


def default_workers() -> int:
    """One HTTP worker per core but one (the engine's), at least one."""
    return max(1, (os.cpu_count() or 1) - 1)


class Settings(BaseSettings):
    """What the service loads, how it batches, and what it accepts."""

    model_config = SettingsConfigDict(env_prefix="MMAP_", frozen=True)

    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, ge=0, le=65535, description="port to bind")
    prompts: Path = Field(EMBEDDED_PROMPTS_DIR, description="directory of prompt sets (one sub-directory each)")
    model: str = Field(EMBEDDED_MODEL, description="open_clip model name, local-dir:<dir>, or the embedded default")
    pretrained: str | None = Field(
        EMBEDDED_PRETRAINED,
        description="open_clip pretrained tag or checkpoint path; 'none' = random weights; "
                    "'random:<seed>' = seeded random weights (tests and benchmarks only)",
    )
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto = cuda when available")
    precision: Literal["fp32", "fp16", "bf16"] = Field("fp32", description="weight and activation precision")
    backend: Literal["torch", "onnx"] = Field("torch", description="image-tower backend: torch, or onnx (onnxruntime; "
                                                                    "the onnx extra)")
    onnx_model: Path | None = Field(None, description="onnx backend: a graph from "
                                                      "`python -m service.engine.onnx.export`; unset = export at "
                                                      "start-up into onnx_cache")
    onnx_cache: Path = Field(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mmap-serve" / "onnx",
                             description="onnx backend: directory of graphs exported on the fly, keyed by backbone "
                                         "fingerprint, J and m")
    torch_compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = Field(
        "off", description="torch backend: torch.compile mode for the image tower at batch buckets "
                           "(reduce-overhead = CUDA graphs of Inductor's kernels)")
    cuda_graphs: bool | None = Field(
        None, description="torch backend on CUDA: replay the eager image tower as CUDA graphs captured per batch "
                          "bucket and prompt shape at warm-up; unset = on when the model runs on CUDA and "
                          "torch_compile is off (measured faster: docs/benchmarks.md, GPU)")
    decode: Literal["worker", "engine"] = Field(
        "worker", description="where JPEG uploads are decoded: worker = Pillow in the HTTP workers (bit-identical to "
                              "open_clip's transform); engine = batched on the engine's device (nvjpeg on CUDA), "
                              "within a stated pixel tolerance; other formats always decode in the workers")
    max_batch_size: int | None = Field(
        None, ge=1, description="most images in one image-tower forward; unset = 128 on CUDA (near the tower's best "
                                "throughput, docs/benchmarks.md), 32 on a CPU")
    batches_in_flight: int = Field(1, ge=1, le=4, description="batches the engine launches before it reads the "
                                                             "oldest one's results back: 2 = prepare and launch the "
                                                             "next batch while the device computes the last (CUDA)")
    max_wait_ms: float = Field(5.0, ge=0, description="longest wait for a batch to fill while more requests are on "
                                                       "their way")
    queue_size: int = Field(256, ge=1, description="decoded images waiting for the model; beyond it requests get 503")
    request_timeout_s: float = Field(30.0, gt=0, description="queue wait + inference per request; beyond it 504")
    drain_timeout_s: float = Field(20.0, gt=0, description="on SIGTERM: how long in-flight requests may take to "
                                                           "finish before they are cut")
    workers: int = Field(default_factory=lambda: default_workers(), ge=1,
                         description="HTTP worker processes (read, check, decode uploads); default: one per core but "
                                     "one, at least 1")
    engine_threads: int = Field(0, ge=0, description="torch threads of the engine process; 0 = 1 on CUDA, every "
                                                     "core on CPU")
    worker_slots: int = Field(64, ge=1, description="images each HTTP worker may have in flight to the engine "
                                                    "(shared-memory slots); as many more may wait for one, "
                                                    "beyond them 503")
    decode_workers: int = Field(2, ge=1, description="threads decoding images in each HTTP worker")
    body_timeout_s: float = Field(30.0, gt=0, description="longest pause between two pieces of an upload's body; "
                                                          "beyond it 408 and the connection is closed")
    max_connections: int = Field(1000, ge=1, description="open connections each HTTP worker holds; beyond it a new "
                                                         "connection gets 503 and is closed")
    max_labels: int = Field(256, ge=1, description="class names a request may bring (labels=); beyond it 422")
    max_label_chars: int = Field(100, ge=1, description="characters of one caller class name; beyond it 422")
    label_cache_size: int = Field(256, ge=1, description="caller label sets whose text features the engine keeps "
                                                         "(least recently used go first)")
    max_images: int = Field(16, ge=1, description="images in one /classify/batch request; beyond it 413")
    max_upload_bytes: int = Field(20 << 20, ge=1, description="largest accepted image file (bytes); beyond it 413")
    max_image_pixels: int = Field(40_000_000, ge=1, description="largest accepted width x height; beyond it 413")
    max_inflight_bytes: int = Field(512 << 20, ge=1, description="bytes of upload bodies each HTTP worker holds at "
                                                                 "once (read, parsed or decoded); beyond it 503 busy")
    admin_token: SecretStr | None = Field(None, description="bearer token of /admin; unset = admin API off (404)")
    watch_interval_s: float = Field(2.0, ge=0, description="prompt-directory poll interval; 0 = no watching")
    watch_debounce_s: float = Field(1.0, ge=0, description="a change is applied once it has been stable this long")
    metrics_max_tasks: int = Field(100, ge=0, description="tasks with request metrics of their own (the first "
                                                          "loaded); the others are counted under task=\"_other\"")
    access_log: bool = Field(False, description="log every request (uvicorn's access log)")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    log_format: Literal["text", "json"] = Field("text", description="log lines as text or as JSON objects")
    cors_origins: str = Field("", description="comma-separated origins allowed to call the API from a browser "
                                              "(CORS); empty = CORS off, '*' = any origin")
    fetch_urls: bool = Field(False, description="accept image URLs in JSON bodies ({\"url\": ...}, {\"urls\": [...]}) "
                                                "and fetch them, guarded by the fetch_* settings; off = 403")
    fetch_allow: str = Field("", description="comma-separated hosts (images.example.com, *.example.com, host:port) "
                                             "or URL prefixes (https://cdn.example.com/images/) an image URL may "
                                             "name, redirects included; '*' = any host (the address checks still "
                                             "apply); needed with fetch_urls")
    fetch_allow_private: bool = Field(False, description="fetch from loopback, private, link-local and other "
                                                         "non-public addresses too (multicast, unspecified and "
                                                         "reserved ones never)")
    fetch_allow_http: bool = Field(False, description="fetch http:// URLs too (else https only)")
    fetch_timeout_s: float = Field(10.0, gt=0, description="longest fetch of one image URL, redirects included "
                                                           "(connect, headers, body); beyond it 504")
    fetch_max_concurrent: int = Field(16, ge=1, description="image URLs each HTTP worker fetches at once; more "
                                                            "wait up to fetch_timeout_s, then 503")

    @field_validator("pretrained")
    @classmethod
    def _none_means_random(cls, value: str | None) -> str | None:
        return None if value in (None, "", "none") else value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.cuda_graphs and self.torch_compile != "off":
            raise ValueError("cuda_graphs and torch_compile exclude each other: choose one")
        if self.max_inflight_bytes < self.max_upload_bytes * self.max_images:
            raise ValueError(f"max_inflight_bytes ({self.max_inflight_bytes}) must hold a whole batch: at least "
                             f"max_upload_bytes x max_images = {self.max_upload_bytes * self.max_images}")
        if self.fetch_urls and not self.fetch_allow.strip():
            raise ValueError("fetch_urls needs fetch_allow: the hosts or URL prefixes images may be fetched from "
                             "('*' for any public host)")
        return self

    def resolved(self, device_type: str) -> Settings:
        """These settings with the defaults that depend on the model's device ("cuda" or "cpu") filled in."""
        cuda = device_type == "cuda"
        update: dict[str, object] = {}
        if self.max_batch_size is None:
            update["max_batch_size"] = 128 if cuda else 32
        if self.cuda_graphs is None:  # on wherever it can run
            update["cuda_graphs"] = cuda and self.backend == "torch" and self.torch_compile == "off"
        return self.model_copy(update=update)

    @property
    def random_seed(self) -> int | None:
        """The seed of `pretrained='random:<seed>'`, else None."""
        match = RANDOM_WEIGHTS.match(self.pretrained or "")
        return int(match.group(1)) if match else None


SETTINGS_ENV = "MMAP_INTERNAL_SETTINGS"  # how the launcher hands its settings to the processes it starts


def settings_to_env(settings: Settings) -> str:
    """The settings as JSON for a child process's environment (the admin token included, in clear:
    the environment of a process is readable by its user alone, unlike a command line)."""
    values = settings.model_dump(mode="json")
    if settings.admin_token is not None:
        values["admin_token"] = settings.admin_token.get_secret_value()
    return json.dumps(values)


def settings_from_env() -> Settings:
    """The settings a launcher handed to this process."""
    return Settings(**json.loads(os.environ[SETTINGS_ENV]))
