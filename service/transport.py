"""Between the HTTP workers and the engine: small msgspec messages over ZeroMQ, pixels in shared memory.

Each worker owns a `PixelRing`: a file in /dev/shm holding a header and `slots` uint8 images of the
model's input size. A worker writes an upload's preprocessed pixels into a free slot and sends an
`Infer` naming the slot; the engine copies the slot into its batch and answers `Scored` or `Failed`
with the request's id; only then is the slot free again. Pixels are written once and read once and
are never pickled. The ring's file is unlinked as soon as the engine has mapped it, so a process
killed with -9 leaves nothing in /dev/shm (the launcher also removes any file of its own prefix).

Messages (docs/architecture.md, "Engine protocol"): a worker's DEALER socket talks to the engine's
ROUTER socket. Worker -> engine: `Hello` (once, with the ring), `Infer` (one image), `Call` (admin
operations, sample files), `Sync` (a delta was missed). Engine -> worker: `Welcome` (answers Hello,
with the whole `Catalog`), `CatalogDelta` (what changed; pushed to every worker after each change;
a worker that missed one asks with `Sync` and gets the missing changes or a whole `Catalog`),
`Scored` / `Embedded` / `Failed` (answer an Infer; those of one batch travel together as `Results`),
`Reply` (answers a Call). One `Infer` carries one image: a
request with several images sends several, and one with its own class names (`labels`) or asking
for the embedding says so in fields of its Infer. With `decode = "engine"` an Infer may carry the
JPEG upload itself instead of pixels in its slot (device_decode.py).
"""

from __future__ import annotations

import mmap
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

import msgspec
import numpy as np

from service.schema import ErrorCode, PromptSetListing, RolloutListing, RolloutRequest, ServedModel, TaskInfo

# The environment a launcher hands to the processes it starts (besides the settings, see settings.py).
ENGINE_READY_FD_ENV = "MMAP_ENGINE_READY_FD"  # the engine writes its EngineInfo here once it serves
ENGINE_ADDRESS_ENV = "MMAP_ENGINE_ADDRESS"  # the engine's ZeroMQ endpoint
ENGINE_INFO_ENV = "MMAP_ENGINE_INFO"  # a worker's copy of the EngineInfo (JSON)
WORKER_INDEX_ENV = "MMAP_WORKER_INDEX"
LISTEN_FD_ENV = "MMAP_LISTEN_FD"  # the inherited listening socket
LAUNCHER_PID_ENV = "MMAP_LAUNCHER_PID"

SHM_DIR = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
SHM_PREFIX = "mmap-serve"
HEADER_BYTES = 4096  # the ring's header page: int64 counters, then the slots (page-aligned)


def ring_prefix(launcher_pid: int) -> str:
    """Every shared-memory file of one service instance starts with this (so its launcher can remove them)."""
    return f"{SHM_PREFIX}.{launcher_pid}."


class SharedMemoryTooSmall(RuntimeError):
    """/dev/shm cannot hold a worker's ring: the container needs more shared memory."""


class PixelRing:
    """`slots` images [H, W, 3] uint8 in one shared-memory file, plus a counter of uploads on their way.

    `incoming` (header int64 0) is written by the worker alone: the number of requests it is reading
    or decoding now. The engine sums it over workers to decide whether waiting for a fuller batch
    can pay off.
    """

    def __init__(self, path: Path, slots: int, height: int, width: int, create: bool):
        self.path = Path(path)
        self.slots = slots
        self.shape = (height, width, 3)
        size = HEADER_BYTES + slots * height * width * 3
        fd = os.open(self.path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
        try:
            if create:
                try:
                    os.posix_fallocate(fd, 0, size)  # reserve now: a full tmpfs would otherwise SIGBUS on first write
                except OSError as e:
                    os.close(fd)
                    fd = -1
                    self.path.unlink(missing_ok=True)
                    raise SharedMemoryTooSmall(
                        f"cannot reserve {size / 2**20:.1f} MiB of shared memory in {SHM_DIR} ({e.strerror}): give "
                        "the container more (docker run --shm-size, compose shm_size, a k8s emptyDir with medium: "
                        "Memory at /dev/shm) or lower MMAP_WORKER_SLOTS") from None
            elif os.fstat(fd).st_size < size:
                raise ValueError(f"{self.path} holds {os.fstat(fd).st_size} bytes, expected {size}")
            self._mmap = mmap.mmap(fd, size)
        finally:
            if fd >= 0:
                os.close(fd)
        self.header = np.ndarray((HEADER_BYTES // 8,), np.int64, buffer=self._mmap)
        self.pixels = np.ndarray((slots, *self.shape), np.uint8, buffer=self._mmap, offset=HEADER_BYTES)

    @property
    def incoming(self) -> int:
        return int(self.header[0])

    def add_incoming(self, n: int) -> None:
        self.header[0] += n

    def unlink(self) -> None:
        """Remove the file; the mapping stays valid for every process that has it."""
        self.path.unlink(missing_ok=True)


# ---- messages ----

class Hello(msgspec.Struct, tag=True):
    worker: int  # the worker's index (a replacement keeps its predecessor's)
    pid: int
    ring: str  # path of the worker's PixelRing
    slots: int


class Infer(msgspec.Struct, tag=True):
    id: int
    slot: int
    task: str  # "" only with embed: the unprompted image tower
    top_k: int
    labels: list[str] | None = None  # score against these class names, with the task's prompts and template
    embed: bool = False  # answer the image embedding (`Embedded`), not scores
    jpeg: bytes | None = None  # decode=engine: the upload itself, decoded by the engine (the slot stays unused)
    expires: float = 0.0  # time.monotonic() (one clock for the host's processes) past which the worker has given up
    version: str | None = None  # pinned: score with this version of the task (live or rollout candidate), else 409
    key: str | None = None  # a rollout's assignment key (X-Client-ID, or one per request): same key, same version


class InferBatch(msgspec.Struct, tag=True):
    """Several images in one message, where no ring is shared (Ray Serve: an ingress replica to an engine
    replica): `pixels` holds them as one uint8 array [N, H, W, 3]; each Infer's `slot` is its row."""

    pixels: bytes
    requests: list[Infer]


class Sync(msgspec.Struct, tag=True):
    """A worker's catalog missed a delta: what changed since `generation` of catalog `source` (or a full copy)."""

    source: str
    generation: int


class ListSets(msgspec.Struct, tag=True):
    """The prompt sets of the prompt directory: answered with a `PromptSetListing`."""


class LoadSet(msgspec.Struct, tag=True):
    """Load (or reload) the set `name`: answered with the `PromptSetListing` after it."""

    name: str


class UnloadSet(msgspec.Struct, tag=True):
    """Stop serving the set `name`: answered with the `PromptSetListing` after it."""

    name: str


class GetSample(msgspec.Struct, tag=True):
    """A sample image a task's prompt set ships: answered with a `Sample`."""

    task: str
    filename: str


class ListRollouts(msgspec.Struct, tag=True):
    """The rollouts of the prompt directory (or of one task) with their evidence: answered with a `RolloutListing`."""

    task: str | None = None


class StartRollout(msgspec.Struct, tag=True):
    """Write the task's rollout record (replacing any): answered with the task's `RolloutListing`."""

    task: str
    rollout: RolloutRequest


class EndRollout(msgspec.Struct, tag=True):
    """Promote the task's candidate (it takes the task) or abort its rollout: answered with the `RolloutListing`."""

    task: str
    action: Literal["promote", "abort"]


Operation = ListSets | LoadSet | UnloadSet | GetSample | ListRollouts | StartRollout | EndRollout


class Call(msgspec.Struct, tag=True):
    """An operation off the hot path (admin, sample files), answered by a `Reply` with the same id."""

    id: int
    op: Operation


class Sample(msgspec.Struct):
    data: bytes
    media_type: str


class Catalog(msgspec.Struct, tag=True):
    """Every served task: what a worker gets when it connects or has missed a delta."""

    source: str  # the engine's catalog (its generations count from its start)
    generation: int
    ready: bool
    reason: str | None  # why not ready
    tasks: list[TaskInfo]


class CatalogDelta(msgspec.Struct, tag=True):
    """What changed from generation `base` to `generation`: tasks added or replaced, tasks gone."""

    source: str
    generation: int
    base: int
    ready: bool
    reason: str | None
    tasks: list[TaskInfo]
    removed: list[str]


class Welcome(msgspec.Struct, tag=True):
    engine_pid: int
    catalog: Catalog


class Scored(msgspec.Struct, tag=True):
    id: int
    task: str
    version: str
    prompt_set: str
    method: str
    labels: list[str]
    scores: list[float]


class Embedded(msgspec.Struct, tag=True):
    id: int
    task: str  # "" = the unprompted image tower
    version: str
    prompt_set: str
    vector: bytes  # float32, little-endian, L2-normalised


class Failed(msgspec.Struct, tag=True):
    id: int
    status: int
    error: ErrorCode
    detail: str
    retry_after_s: int | None = None


class Results(msgspec.Struct, tag=True):
    """The answers of one batch for one worker: one message instead of one per image."""

    items: list[Scored | Embedded | Failed]


class Reply(msgspec.Struct, tag=True):
    id: int
    status: int
    listing: PromptSetListing | None = None  # the answer to ListSets, LoadSet, UnloadSet
    rollouts: RolloutListing | None = None  # the answer to ListRollouts, StartRollout, EndRollout
    sample: Sample | None = None  # the answer to GetSample
    error: ErrorCode | None = None  # refused: why

    detail: str | None = None


ToEngine = Hello | Infer | Call | Sync
ToWorker = Welcome | Catalog | CatalogDelta | Results | Scored | Embedded | Failed | Reply

encode = msgspec.msgpack.Encoder().encode
decode_to_engine = msgspec.msgpack.Decoder(ToEngine).decode
decode_to_worker = msgspec.msgpack.Decoder(ToWorker).decode
decode_operation = msgspec.msgpack.Decoder(Operation).decode
decode_batch = msgspec.msgpack.Decoder(InferBatch).decode


class EngineInfo(ServedModel):
    """What the launcher learns from the engine once it is up, and hands to every worker."""

    address: str  # the engine's ZeroMQ endpoint
    pid: int
    image_size: tuple[int, int]  # (H, W) of the model's input
    preprocess: dict[str, Any]  # open_clip's PreprocessCfg fields (size, mode, mean, std, interpolation, resize_mode)
    max_batch_size: int = 32  # images in one forward (the device's default filled in)


def engine_info_json(info: EngineInfo) -> bytes:
    return msgspec.json.encode(info)


def engine_info_from_json(data: bytes | str) -> EngineInfo:
    return msgspec.json.decode(data, type=EngineInfo)
