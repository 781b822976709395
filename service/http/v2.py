"""The Open Inference Protocol (KServe v2, REST), beside the service's own API: one model per task.

GET /v2 (server metadata), /v2/health/live, /v2/health/ready, /v2/models/{task} (metadata: inputs and outputs),
/v2/models/{task}/ready, POST /v2/models/{task}/infer, each also under /versions/{version} (a task serves one
version, its prompt set's digest: another one is a 404). Infer takes the model's one input (v2_tensors.py) and scores
every image as POST /classify does (the same engine call, the same limits); errors are the protocol's
`{"error": "<why>"}` with the service's status and its error code in the header x-mmap-error. Health answers false
with 400, as the protocol has it (a 4xx).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.errors import ServiceError, version_not_served_detail
from service.schema import (
    TaskInfo,
    V2Error,
    V2InferRequest,
    V2InferResponse,
    V2Live,
    V2ModelMetadata,
    V2ModelReady,
    V2Ready,
    V2ServerMetadata,
    V2TensorMetadata,
    encode,
    ref,
)
from service.transport import Scored

from .bodies import JSON_OVERHEAD, base64_limit
from .checks import check_serving, counted, routing, served_versions, task_label, task_min_score
from .engine_client import MAX_TOP_K
from .images import ImageRejected
from .labels import parse_labels
from .ops import PACKAGE_VERSION
from .state import Worker, worker_of
from .uploads import read_body
from .v2_tensors import (
    ABSTAINED_OUTPUT,
    IMAGE_INPUT,
    LABELS_OUTPUT,
    PIXELS_INPUT,
    SCORES_OUTPUT,
    InferCall,
    answer,
    parse_request,
)

HEADER_LENGTH = "inference-header-content-length"
ERROR_HEADER = "x-mmap-error"  # the service's error code of a /v2 error
PLATFORM = "mmap-serve"
EXTENSIONS = ["binary_tensor_data", "parameters"]
JSON_PIXEL_CHARS = 6  # characters of JSON one uint8 value of a `pixels` tensor may take ("255, " and brackets)
JSON = "application/json"
router = APIRouter(tags=["inference protocol (v2)"])

WHY = {400: "a malformed inference request (`invalid_input`)", 404: "unknown model (task) or version",
       408: "the body stalled for body_timeout_s", 413: "an image, the images or the body over its limit",
       415: "not a supported image, or a compressed request", 422: "a corrupt image, bad base64 or bad labels",
       503: "not ready, overloaded, busy or the engine down (`Retry-After`)", 504: "no result within request_timeout_s"}


def v2_answers(answer: type[msgspec.Struct], *codes: int, false: str | None = None) -> dict[int | str, Any]:
    """The OpenAPI responses of a /v2 route: 200 with `answer`, the errors `codes` in the protocol's shape; with
    `false`, 400 is `answer` too (a health route's false)."""
    responses: dict[int | str, Any] = {200: {"description": "success", "content": {JSON: {"schema": ref(answer)}}}}
    for code in codes:
        responses[code] = {"description": WHY[code], "content": {JSON: {"schema": ref(V2Error)}}}
    if false is not None:
        responses[400] = {"description": false, "content": {JSON: {"schema": ref(answer)}}}
    return responses


def json(answer: msgspec.Struct, status: int = 200) -> Response:
    return Response(encode(answer), status_code=status, media_type=JSON)


def v2_error(error: ServiceError) -> Response:
    return Response(encode(V2Error(error.detail)), status_code=error.status, media_type=JSON,
                    headers={**error.headers, ERROR_HEADER: error.error})


def protocol(route: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
    """The route's refusals in the protocol's error shape."""

    @functools.wraps(route)
    async def speaking_v2(*args: Any, **kwargs: Any) -> Response:
        try:
            return await route(*args, **kwargs)
        except ServiceError as e:
            return v2_error(e)

    return speaking_v2


def model(request: Request, task: str, version: str | None) -> TaskInfo:
    """The task's catalog entry (404 for an unknown task or a version it does not serve)."""
    engine = worker_of(request).engine
    if task not in engine.tasks:
        raise engine.catalog.unknown(task)
    info = engine.tasks[task]
    if version is not None and version not in served_versions(info):
        raise ServiceError(404, "unknown_version", version_not_served_detail(task, served_versions(info), version))
    return info


@router.get("/v2", response_class=Response, responses=v2_answers(V2ServerMetadata, 503))
@protocol
async def server_metadata(request: Request) -> Response:
    """The server's name, version and protocol extensions."""
    worker_of(request)
    return json(V2ServerMetadata("mmap-serve", PACKAGE_VERSION, EXTENSIONS))


@router.get("/v2/health/live", response_class=Response,
            responses=v2_answers(V2Live, false="not live: the engine is not running"))
async def server_live(request: Request) -> Response:
    """Live: the worker answers and its engine runs (false: 400)."""
    worker = request.app.state.worker
    live = worker is not None and not worker.engine.down
    return json(V2Live(live), 200 if live else 400)


def serving(request: Request) -> bool:
    worker = request.app.state.worker
    return worker is not None and not worker.engine.down and worker.engine.catalog.ready


@router.get("/v2/health/ready", response_class=Response,
            responses=v2_answers(V2Ready, false="not ready (GET /readyz says why)"))
async def server_ready(request: Request) -> Response:
    """Ready as GET /readyz is (false: 400)."""
    ready = serving(request)
    return json(V2Ready(ready), 200 if ready else 400)


def metadata(request: Request, task: str, version: str | None) -> Response:
    info = model(request, task, version)
    height, width = worker_of(request).engine.info.image_size
    return json(V2ModelMetadata(
        task, served_versions(info), PLATFORM,
        [V2TensorMetadata(IMAGE_INPUT, "BYTES", [-1]), V2TensorMetadata(PIXELS_INPUT, "UINT8", [-1, height, width, 3])],
        [V2TensorMetadata(LABELS_OUTPUT, "BYTES", [-1, -1]), V2TensorMetadata(SCORES_OUTPUT, "FP32", [-1, -1]),
         V2TensorMetadata(ABSTAINED_OUTPUT, "BOOL", [-1])]))


def ready(request: Request, task: str, version: str | None) -> Response:
    model(request, task, version)
    ready = serving(request)
    return json(V2ModelReady(task, ready), 200 if ready else 400)


MODEL = v2_answers(V2ModelMetadata, 404, 503)
READY = v2_answers(V2ModelReady, 404, 503, false="known, but not ready")


@router.get("/v2/models/{task}", response_class=Response, responses=MODEL)
@protocol
async def model_metadata(task: str, request: Request) -> Response:
    """The task as a model: its version, its inputs (a request gives one of them: `image`, encoded files, or
    `pixels` at the model's input size) and its outputs (`labels`, `scores`: [N, k])."""
    return metadata(request, task, None)


@router.get("/v2/models/{task}/versions/{version}", response_class=Response, responses=MODEL)
@protocol
async def model_version_metadata(task: str, version: str, request: Request) -> Response:
    return metadata(request, task, version)


@router.get("/v2/models/{task}/ready", response_class=Response, responses=READY)
@protocol
async def model_ready(task: str, request: Request) -> Response:
    return ready(request, task, None)


@router.get("/v2/models/{task}/versions/{version}/ready", response_class=Response, responses=READY)
@protocol
async def model_version_ready(task: str, version: str, request: Request) -> Response:
    return ready(request, task, version)


INFER = v2_answers(V2InferResponse, 400, 404, 408, 413, 415, 422, 503, 504)
INFER[200]["content"]["application/octet-stream"] = {"schema": {
    "type": "string", "format": "binary", "description": "binary outputs (binary_data_output, or an output's "
                                                         "binary_data): the JSON answer (its length in the header "
                                                         "Inference-Header-Content-Length), then each output's bytes"}}
INFER_BODY = {"requestBody": {"required": True, "content": {
    JSON: {"schema": ref(V2InferRequest)},
    "application/octet-stream": {"schema": {
        "type": "string", "format": "binary", "description": "binary tensor extension: the JSON request (its length "
                                                             "in the header Inference-Header-Content-Length), then "
                                                             "each binary input's bytes"}}}}}


@router.post("/v2/models/{task}/infer", response_class=Response, responses=INFER, openapi_extra=INFER_BODY)
async def model_infer(task: str, request: Request) -> Response:
    """Classify N images (the input `image`: encoded files; or `pixels`: [N, H, W, 3] uint8 at the model's input
    size) for the task; parameters `top_k` (default: every class), `labels` (your class names), `version`,
    `min_score` (the output `abstained`)."""
    return await infer(request, task, None)


@router.post("/v2/models/{task}/versions/{version}/infer", response_class=Response, responses=INFER,
             openapi_extra=INFER_BODY)
async def model_version_infer(task: str, version: str, request: Request) -> Response:
    return await infer(request, task, version)


@protocol
async def infer(request: Request, task: str, version: str | None) -> Response:
    start = time.perf_counter()
    worker = worker_of(request)
    engine, settings, metrics = worker.engine, worker.settings, request.app.state.metrics
    with counted(metrics, task_label(task, engine), start):
        check_serving(engine, task)
        model(request, task, version)
        if request.headers.get("content-encoding", "identity").lower() != "identity":
            raise ServiceError(415, "unsupported_type", "compressed inference requests are not accepted")
        height, width = engine.info.image_size
        per_image = max(base64_limit(settings.max_upload_bytes) + 8, JSON_PIXEL_CHARS * height * width * 3)
        allowed = settings.max_images * per_image + JSON_OVERHEAD + settings.max_labels * (
            6 * settings.max_label_chars + 4)
        too_large = ImageRejected(413, "upload_too_large", f"inference request larger than {settings.max_images} "
                                                           "images at their limits take")
        with engine.incoming(), worker.budget.hold() as held:
            body = await read_body(request, held, allowed, too_large, settings.body_timeout_s)
            call = parse_request(body, request.headers.get(HEADER_LENGTH), (height, width),
                                 settings.max_upload_bytes, settings.max_images)
            if call.version is not None:
                model(request, task, call.version)
            names = None if call.labels is None else parse_labels(
                call.labels if isinstance(call.labels, str) else msgspec.json.encode(call.labels).decode(),
                settings.max_labels, settings.max_label_chars, json_array=not isinstance(call.labels, str))
            inputs = await prepared(worker, call)
            del body
        top_k = call.top_k or MAX_TOP_K
        wanted = version or call.version
        key = routing(request, engine, task, per_request=True)[1]  # one version for all its images
        results = await asyncio.gather(*(engine.infer(pixels, task, top_k, settings.request_timeout_s, names,
                                                      version=wanted, key=key) for pixels in inputs),
                                       return_exceptions=True)
        scored: list[Scored] = []
        for result in results:
            if isinstance(result, BaseException):
                raise result
            scored.append(result)
        versions = {r.version for r in scored}
        if len(versions) > 1 or len({len(r.labels) for r in scored}) > 1:
            raise ServiceError(503, "version_changed", f"model {task!r} changed version during the request; retry",
                               {"Retry-After": "0"})
        served = scored[0].version
        if wanted is not None and served != wanted:
            raise ServiceError(404, "unknown_version", f"model {task!r} now serves version {served!r}")
    threshold = call.min_score if call.min_score is not None else task_min_score(engine, task, names)
    content, header_length = answer(task, served, call, [r.labels for r in scored], [r.scores for r in scored],
                                    threshold)
    if header_length is None:
        return Response(content, media_type=JSON)
    return Response(content, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)})


async def prepared(worker: Worker, call: InferCall) -> list[np.ndarray | bytes]:
    """What the engine scores of each image: pixels as they are, encoded files decoded and preprocessed as an
    upload (an image's refusal names its element)."""
    if call.pixels is not None:
        return list(call.pixels)
    done = await asyncio.gather(*(worker.pixels(data) for data in call.images or []), return_exceptions=True)
    inputs: list[np.ndarray | bytes] = []
    for i, result in enumerate(done):
        if isinstance(result, ServiceError):
            kind = ImageRejected if isinstance(result, ImageRejected) else ServiceError
            raise kind(result.status, result.error, f"input 'image' element {i}: {result.detail}", result.headers)
        if isinstance(result, BaseException):
            raise result
        inputs.append(result)
    return inputs
