"""The wire schema: every answer of the HTTP API (and the JSON request bodies), defined once.

The HTTP workers encode these structs as they are (msgspec), the engine builds the ones it owns
(`TaskInfo`, `PromptSetListing`), and the OpenAPI document is generated from them (`openapi_components`),
so the documented schema and the real answer cannot drift; tests/test_service_schema.py validates live
answers of every route against the published document.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

# Every `error` an answer may carry (machine-readable; `detail` says why, for people).
ErrorCode = Literal[
    "unknown_task", "unknown_sample", "not_found", "not_loaded", "unknown_parameter", "invalid_request",
    "invalid_labels", "invalid_name", "missing_file", "empty", "corrupt", "unsupported_type", "upload_too_large",
    "too_many_pixels", "too_many_images", "body_timeout", "client_closed_request", "load_failed", "unauthorized",
    "forbidden", "not_ready", "not_running", "overloaded", "busy", "engine_unavailable", "shutting_down",
    "stopping", "too_many_connections", "timeout", "inference_failed", "internal_error", "protocol_error",
    "unknown_operation", "http_error", "invalid_json", "invalid_body", "invalid_base64", "fetch_disabled",
    "invalid_url", "url_not_allowed", "fetch_failed", "fetch_timeout", "too_many_redirects", "too_many_fetches",
    "invalid_input", "unknown_version", "version_changed", "version_not_served", "rollout_refused", "no_rollout"]


class ErrorBody(msgspec.Struct):
    """Every error answer: what went wrong, and why."""

    error: ErrorCode
    detail: str


class Prediction(msgspec.Struct):
    label: str
    score: float


class Classification(msgspec.Struct):
    """One image classified for one task: the `top_k` best classes, best first. `abstained`: the best score is below
    the request's `min_score` (or the task's default): act on it as "not sure" (the predictions are still listed)."""

    task: str
    version: str
    prompt_set: str
    method: str
    predictions: list[Prediction]
    abstained: bool = False


class BatchItem(msgspec.Struct, omit_defaults=True):
    """One image of a batch: `status` 200 with its classification, or its own error."""

    status: int
    task: str | None = None
    version: str | None = None
    prompt_set: str | None = None
    method: str | None = None
    predictions: list[Prediction] | None = None
    abstained: bool | None = None  # with status 200: as in Classification
    error: ErrorCode | None = None
    detail: str | None = None


class BatchAnswer(msgspec.Struct):
    results: list[BatchItem]  # one per image, in the order of the `file` parts


class Embedding(msgspec.Struct):
    """An image embedding, L2-normalised; `task` null: the unprompted image tower."""

    task: str | None
    version: str | None
    prompt_set: str | None
    dim: int
    embedding: list[float]


class RolloutInfo(msgspec.Struct):
    """A task's rollout, as the catalog carries it: the candidate set, its version while it gets traffic."""

    candidate: str  # the candidate prompt set (a directory of the prompt directory)
    version: str | None  # its version of the task, while it answers (canary) or scores (shadow) requests
    mode: Literal["canary", "shadow", "aborted"]
    share: float  # % of the task's requests
    state: Literal["active", "aborted", "inactive"]  # inactive: see `note`
    note: str | None = None  # why the candidate gets no traffic


class TaskInfo(msgspec.Struct):
    """A served task, as the engine's catalog describes it to the workers and the workers to callers."""

    task: str
    prompt_set: str
    version: str
    method: str
    group: str | None
    classes: list[str]
    samples: list[str]  # paths of its sample images (GET /samples/<task>/<file>)
    template: str = ""
    evaluation: dict[str, Any] = {}  # the set's recorded evaluation of this task: accuracy, zero_shot, test_images
    trained: dict[str, Any] = {}  # when and how: created, command, code_version, seed, train settings, data
    metered: bool = True  # its request metrics carry its name (else task="_other", see /metrics)
    rollout: RolloutInfo | None = None  # a candidate version beside `version` (docs: "Rollouts")
    temperature: float = 1.0  # its scores are softmax(logits / temperature): calibrated on validation when not 1
    min_score: float | None = None  # its default abstention threshold (min_score of /classify)


def sample_path(task: str, filename: str) -> str:
    return f"/samples/{task}/{filename}"


class TaskPage(msgspec.Struct):
    tasks: list[TaskInfo]
    next: str | None = None  # more tasks follow: ask again with after=<next>


class ServedModel(msgspec.Struct):
    """The backbone served and how it runs."""

    model: str
    pretrained: str | None
    fingerprint: str
    device: str
    precision: str
    backend: str


class VersionInfo(ServedModel):
    version: str  # of the mmap-serve package


class Health(msgspec.Struct):
    status: Literal["alive"]
    engine: Literal["up", "down"]


class WorkersServing(msgspec.Struct):
    serving: int  # HTTP workers taking connections now
    configured: int


class Readiness(msgspec.Struct, omit_defaults=True):
    ready: bool
    reason: str | None
    tasks: int
    workers: WorkersServing | None = None  # where the launcher balances connections over workers


class PromptSetStatus(msgspec.Struct):
    """One prompt set of the prompt directory."""

    name: str
    state: Literal["loaded", "failed", "available"]  # failed: never loaded, or not since its last failure
    version: str | None
    method: str | None
    tasks: list[str]  # the tasks it serves
    shadowed: list[str]  # the tasks it defines that a newer publication serves
    loaded_at: float | None  # unix time
    last_error: str | None
    last_error_at: float | None


class PromptSetListing(msgspec.Struct):
    directory: str
    directory_error: str | None
    prompt_sets: list[PromptSetStatus]


class VersionFigures(msgspec.Struct):
    """Requests of a task with a rollout answered by one version, and their mean top-1 score."""

    version: str
    prompt_set: str
    role: Literal["live", "candidate"]
    requests: int
    mean_top1_score: float | None


class ShadowFigures(msgspec.Struct):
    """A shadowed candidate against the live answers of the same requests."""

    version: str  # the candidate's
    compared: int  # requests scored by both
    agreement: float | None  # share of them whose top-1 label is the same
    live_mean_top1_score: float | None
    candidate_mean_top1_score: float | None


class RolloutStatus(msgspec.Struct):
    """A task's rollout: its record, how it resolves now, and the evidence this engine counted."""

    task: str
    candidate: str | None  # the candidate set the record names (None: the task has no rollout)
    mode: Literal["canary", "shadow", "aborted"] | None
    share: float | None
    state: Literal["active", "aborted", "inactive", "none"]
    note: str | None  # why the candidate gets no traffic
    live_version: str | None
    live_prompt_set: str | None
    candidate_version: str | None  # while it gets traffic
    answered: list[VersionFigures]  # per version: requests answered (live and canary)
    shadow: ShadowFigures | None  # mode shadow (and aborted shadows): the comparison
    abort_below: float | None  # automatic abort below this shadow agreement...
    min_requests: int | None  # ...after this many compared requests
    reason: str | None  # why it was aborted
    updated: str | None  # when the record was written (UTC)
    error: str | None = None  # the record on disk cannot be used: the previous one (if any) stays in effect


class RolloutListing(msgspec.Struct):
    directory: str  # the prompt directory; records are in its _rollouts/
    rollouts: list[RolloutStatus]


class RolloutRequest(msgspec.Struct, forbid_unknown_fields=True):
    """PUT /admin/rollouts/{task}: start (or replace) the task's rollout of `candidate`."""

    candidate: str
    mode: Literal["canary", "shadow"]
    share: float = 100.0
    abort_below: float | None = None  # shadow: abort automatically below this top-1 agreement...
    min_requests: int = 200  # ...once this many requests were compared


class ImageBody(msgspec.Struct, forbid_unknown_fields=True):
    """A JSON body of POST /classify and /embed (`image` or `url`) or /classify/batch (`images` or `urls`): each
    image base64-encoded (a data URI too), or with fetch_urls an image URL the service fetches."""

    image: str | None = None
    images: list[str] | None = None
    url: str | None = None
    urls: list[str] | None = None
    labels: list[str] | None = None  # /classify and /classify/batch: score against these class names


# The Open Inference Protocol (KServe v2), REST: its documents as the protocol defines them; one model per task.

class V2Error(msgspec.Struct):
    """Every error answer of the /v2 routes, in the protocol's shape (the code is in the x-mmap-error header)."""

    error: str


class V2ServerMetadata(msgspec.Struct):
    name: str
    version: str
    extensions: list[str]


class V2Live(msgspec.Struct):
    live: bool


class V2Ready(msgspec.Struct):
    ready: bool


class V2ModelReady(msgspec.Struct):
    name: str
    ready: bool


class V2TensorMetadata(msgspec.Struct):
    name: str
    datatype: str
    shape: list[int]  # -1: any size


class V2ModelMetadata(msgspec.Struct):
    """A task as a model: its one version (the prompt set's digest), its inputs (one of them per request) and
    outputs."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]


class V2InputTensor(msgspec.Struct):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = {}  # binary_data_size: its bytes follow the JSON (binary tensor extension)
    data: Any = None  # row-major, flat or nested; BYTES elements base64 strings


class V2RequestedOutput(msgspec.Struct):
    name: str
    parameters: dict[str, Any] = {}  # binary_data: true for this output's data after the JSON


class V2InferRequest(msgspec.Struct):
    """An inference request: one input (`image` BYTES [N] or `pixels` UINT8 [N, H, W, 3]); `parameters`: top_k,
    labels (an array, or comma-separated), version, binary_data_output."""

    inputs: list[V2InputTensor]
    id: str | None = None
    parameters: dict[str, Any] = {}
    outputs: list[V2RequestedOutput] | None = None


class V2OutputTensor(msgspec.Struct, omit_defaults=True):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] = {}
    data: list[Any] | None = None  # row-major, flat; absent when the data follows the JSON (binary_data_size)


class V2InferResponse(msgspec.Struct, omit_defaults=True):
    model_name: str
    model_version: str
    outputs: list[V2OutputTensor]
    id: str | None = None


ANSWERS = (ErrorBody, Classification, BatchAnswer, Embedding, TaskInfo, TaskPage, VersionInfo, Health, Readiness,
           PromptSetListing, RolloutStatus, RolloutListing, RolloutRequest, ImageBody, V2Error, V2ServerMetadata,
           V2Live, V2Ready, V2ModelReady, V2ModelMetadata, V2InferRequest, V2InferResponse)
REF = "#/components/schemas/{name}"


def openapi_components() -> dict[str, Any]:
    """The JSON Schema of every answer, as OpenAPI components (`$ref`: `ref(Struct)`)."""
    return msgspec.json.schema_components(ANSWERS, ref_template=REF)[1]


def ref(answer: type[msgspec.Struct]) -> dict[str, str]:
    return {"$ref": REF.format(name=answer.__name__)}


encode = msgspec.json.Encoder().encode
