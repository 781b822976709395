"""The HTTP surface of one worker: FastAPI routes, response schemas and error bodies.

An HTTP worker imports no model. It reads and checks uploads, decodes and preprocesses them to
uint8 pixels (uploads.py, on a small thread pool), and hands each image to the engine process
through its `EngineClient` (shared memory + ZeroMQ); it answers /tasks, /readyz and 404s from the
catalog the engine pushes after every change. `create_app(settings, connect)` builds the app;
`connect` is awaited when the app starts and returns the started engine client.

Errors are JSON `{"error": <code>, "detail": <why>}` with the right status. The admin API
(`/admin/promptsets`) exists only when `admin_token` is set: without one its routes answer 404,
as if absent, so an unconfigured deployment does not even reveal it. With one, a missing bearer
token is 401 and a wrong one 403. Admin operations run in the engine, whichever worker took them.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import importlib.metadata
import importlib.resources
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from msgspec.json import encode as encode_json
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from .engine_client import EngineClient, EngineUnavailable
from .errors import ServiceError
from .images import ImageRejected, plain_jpeg, set_pillow_pixel_limit
from .labels import parse_labels
from .metrics import OTHER_TASKS, UNKNOWN_TASK, Metrics
from .settings import Settings
from .transport import Embedded, Scored, TaskInfo
from .uploads import Preprocessor, Upload, read_upload

STATIC_DIR = Path(__file__).parent / "static"
# Swagger UI and ReDoc as files in an installed package: FastAPI's default pages load them from a CDN,
# which leaves /docs blank on an air-gapped host.
DOCS_ASSETS = Path(str(importlib.resources.files("fastapi_offline") / "static"))
WORKER_HEADER = "x-mmap-worker"  # which HTTP worker answered a classify request (its index)
try:
    PACKAGE_VERSION = importlib.metadata.version("mmap-serve")
except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
    PACKAGE_VERSION = "0+unknown"
EMBED_UNPROMPTED = "_unprompted"  # the metrics' task label of /embed without a task
MAX_TASKS_PAGE = 10_000  # most tasks one GET /tasks answers


class Worker:
    """What one HTTP worker owns: the engine client, the preprocessing and the decode threads."""

    def __init__(self, settings: Settings, engine: EngineClient):
        self.settings = settings
        self.engine = engine
        self.preprocess = Preprocessor(engine.info.preprocess, settings.max_image_pixels)
        self._decode_pool = ThreadPoolExecutor(max_workers=settings.decode_workers, thread_name_prefix="decode")

    async def pixels(self, data: bytes) -> np.ndarray | bytes:
        """Decode and preprocess one upload: small images right here (a hand-off to a thread costs more
        than their decoding), larger ones on the decode threads (Pillow releases the GIL there). With
        decode=engine a plain JPEG, its header checked, is returned as it is: the engine decodes it."""
        image = self.preprocess.open(data)
        if self.settings.decode == "engine" and plain_jpeg(image):
            return data
        if self.preprocess.quick(image):
            return self.preprocess.finish(image)
        return await asyncio.get_running_loop().run_in_executor(self._decode_pool, self.preprocess.finish, image)

    async def close(self) -> None:
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        await self.engine.close()


# ---- response models (they make /docs describe the answers) ----

class Prediction(BaseModel):
    label: str
    score: float


class ClassifyResponse(BaseModel):
    task: str
    version: str
    prompt_set: str
    method: str
    predictions: list[Prediction]


class TaskInfoModel(BaseModel):
    task: str
    prompt_set: str
    version: str
    method: str
    group: str | None
    classes: list[str]
    samples: list[str]  # URLs of sample images for the web page
    template: str
    evaluation: dict[str, Any]  # the set's recorded test evaluation of this task: accuracy, zero_shot, test_images
    trained: dict[str, Any]  # when and how: created, command, code_version, seed, train settings, data (+ digest)


class BatchItem(BaseModel):
    """One image's answer: `status` 200 with the classification, or its own error."""

    status: int
    task: str | None = None
    version: str | None = None
    prompt_set: str | None = None
    method: str | None = None
    predictions: list[Prediction] | None = None
    error: str | None = None
    detail: str | None = None


class BatchResponse(BaseModel):
    results: list[BatchItem]  # one per image, in the order of the `file` parts


class EmbedResponse(BaseModel):
    task: str | None  # None: the unprompted image tower
    version: str | None
    prompt_set: str | None
    dim: int
    embedding: list[float]  # L2-normalised


class VersionResponse(BaseModel):
    version: str  # of the mmap-serve package
    model: str
    pretrained: str | None
    fingerprint: str
    device: str
    precision: str
    backend: str


class TaskList(BaseModel):
    tasks: list[TaskInfoModel]
    next: str | None = None  # more tasks follow: ask again with after=<next>


ErrorCode = Literal[
    "unknown_task", "unknown_sample", "not_found", "not_loaded", "unknown_parameter", "invalid_request",
    "invalid_labels", "invalid_name", "missing_file", "empty", "corrupt", "unsupported_type", "upload_too_large",
    "too_many_pixels", "too_many_images", "body_timeout", "client_closed_request", "load_failed", "unauthorized",
    "forbidden", "not_ready", "not_running", "overloaded", "engine_unavailable", "shutting_down", "stopping",
    "too_many_connections", "timeout", "inference_failed", "internal_error", "protocol_error", "http_error"]


class ErrorResponse(BaseModel):
    error: ErrorCode  # machine-readable: what went wrong
    detail: str  # for people: why, and what to do


RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}
WHY = {401: "no bearer token", 403: "wrong token", 404: "unknown task (or sample, or set)",
       408: "the body stalled for body_timeout_s (`body_timeout`)",
       413: "upload, image or image count over its limit", 415: "not a supported image type",
       422: "invalid parameters, labels, multipart body or image", 503: "not ready, overloaded, the engine is down, "
       "or stopping; `Retry-After` when retrying helps", 504: "no result within request_timeout_s"}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI responses of the errors a route can return (`{"error", "detail"}` bodies)."""
    return {code: {"model": ErrorResponse, "description": WHY[code],
                   **({"headers": RETRY_AFTER} if code == 503 else {})}
            for code in codes}


UPLOAD_ERRORS = errors(404, 408, 413, 415, 422, 503, 504)
UPLOAD_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                       "properties": {"file": {"type": "string", "format": "binary"}}}},
    "image/*": {"schema": {"type": "string", "format": "binary"}},
}}}


async def _worker(request: Request) -> Worker:  # async: FastAPI runs a sync dependency on a thread
    worker = getattr(request.app.state, "worker", None)
    if worker is None:
        raise ServiceError(503, "not_running", "the service is starting or stopping", {"Retry-After": "1"})
    return worker


WorkerDep = Annotated[Worker, Depends(_worker)]
router = APIRouter()


def _query_doc(name: str, schema: dict[str, Any], description: str, required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "schema": schema, "description": description}


TASK_DOC = _query_doc("task", {"type": "string"}, "a loaded task (GET /tasks)", required=True)
TOP_K_DOC = _query_doc("top_k", {"type": "integer", "minimum": 1, "default": 5},
                       "predictions to return per image (at most the task's classes)")
LABELS_DOC = _query_doc("labels", {"type": "string"}, "score against these class names (comma-separated) with the "
                                                      "task's prompts and template; or the form field `labels`, "
                                                      "a JSON array")
CLASSIFY_QUERY = {"parameters": [TASK_DOC, TOP_K_DOC, LABELS_DOC], **UPLOAD_BODY}
CLASSIFY_PARAMS = frozenset({"task", "top_k", "labels"})


def classify_query(request: Request) -> tuple[str, int]:
    """`task` and `top_k` of an upload route, parsed here, not by FastAPI (its parameter machinery cost a
    tenth of a request's CPU); an unknown parameter is refused, so that a typo is not silently ignored."""
    params = request.query_params
    check_params(params, CLASSIFY_PARAMS)
    task = params.get("task")
    if task is None:
        raise ServiceError(422, "invalid_request", "query.task: Field required")
    text = params.get("top_k", "5")
    digits = text.strip()  # ASCII digits only: "²".isdigit() holds, and int() refuses it
    top_k = int(digits) if digits.isascii() and digits.isdigit() and len(digits) <= 18 else 0  # an int64
    if top_k < 1:
        raise ServiceError(422, "invalid_request", f"query.top_k: must be an integer of at least 1, not {text[:20]!r}")
    return task, top_k


def check_params(params: Mapping[str, str], allowed: frozenset[str]) -> None:
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ServiceError(422, "unknown_parameter", f"unknown query parameter {', '.join(map(repr, unknown))}; "
                                                     f"this route takes {', '.join(sorted(allowed))}")


def check_serving(engine: EngineClient, task: str | None) -> None:
    """Refusals known before the body is read: the engine down, an unknown task (None: no task asked), not ready."""
    if engine.down:
        raise EngineUnavailable()
    if task is not None and task not in engine.tasks:
        raise engine.catalog.unknown(task)
    if not engine.catalog.ready:
        raise ServiceError(503, "not_ready", engine.catalog.reason or "", {"Retry-After": "1"})


def labels_of(request: Request, upload: Upload | None, settings: Settings) -> list[str] | None:
    """The caller's class names from the query (before the body is read) or, given `upload`, its form."""
    query = request.query_params.get("labels")
    form = upload.fields.get("labels") if upload is not None else None
    if query is not None and form is not None:
        raise ServiceError(422, "invalid_labels", "labels given both as a query parameter and as a form field")
    if form is not None:
        return parse_labels(form, settings.max_labels, settings.max_label_chars, json_array=True)
    return None if query is None else parse_labels(query, settings.max_labels, settings.max_label_chars)


@contextmanager
def counted(metrics: Metrics, task: str, start: float | None = None, failures_only: bool = False) -> Iterator[None]:
    """Count one request (one image of a batch) under `task` with the status it ends with: 200, a ServiceError's
    (an ImageRejected's reason counted too), 503 when the drain deadline cancels it, else 500; with `start`,
    its duration too. `failures_only`: a success is not counted here (its images are, one by one)."""
    status = 500
    try:
        yield
        status = 200
    except ServiceError as e:
        status = e.status
        if isinstance(e, ImageRejected):
            metrics.images_rejected.labels(e.error).inc()
        raise
    except asyncio.CancelledError:  # cut at the drain deadline: RequestEdge answers 503
        status = 503
        raise
    finally:
        if status != 200 or not failures_only:
            metrics.requests.labels(task, str(status)).inc()
        if start is not None:
            metrics.request_duration.labels(task).observe(time.perf_counter() - start)


def task_label(task: str | None, engine: EngineClient) -> str:
    """The metrics' label of a request's task (bounded label values, metrics.py): a loaded task with metrics of
    its own, OTHER_TASKS for the other loaded tasks, else UNKNOWN_TASK."""
    info = engine.tasks.get(task) if task is not None else None
    return UNKNOWN_TASK if info is None else task if info.metered else OTHER_TASKS


def scored_body(result: Scored) -> dict[str, Any]:
    return {"task": result.task, "version": result.version, "prompt_set": result.prompt_set, "method": result.method,
            "predictions": [{"label": label, "score": score}
                            for label, score in zip(result.labels, result.scores, strict=True)]}


@router.post("/classify", response_model=ClassifyResponse, responses=UPLOAD_ERRORS, openapi_extra=CLASSIFY_QUERY,
             tags=["classify"])
async def classify(request: Request) -> Response:
    """Classify one image for one task: the image as multipart field `file` or as a raw image/* body."""
    start = time.perf_counter()
    worker = await _worker(request)  # not a dependency: resolving one costs more than this whole handler's own work
    engine, settings, metrics = worker.engine, worker.settings, request.app.state.metrics
    with counted(metrics, task_label(request.query_params.get("task"), engine), start):
        task, top_k = classify_query(request)
        check_serving(engine, task)
        names = labels_of(request, None, settings)
        with engine.incoming():
            upload = await read_upload(request, settings.max_upload_bytes, settings.body_timeout_s)
            names = labels_of(request, upload, settings) if upload.fields else names
            pixels = await worker.pixels(upload.files[0])
        result = await engine.infer(pixels, task, top_k, settings.request_timeout_s, names)
    # Encoded here (ClassifyResponse documents it): FastAPI's validation of the model would cost more than the rest
    return Response(encode_json(scored_body(result)), media_type="application/json",
                    headers={WORKER_HEADER: str(engine.worker)})


@router.post("/classify/batch", response_model=BatchResponse, responses=UPLOAD_ERRORS, openapi_extra=CLASSIFY_QUERY,
             tags=["classify"])
async def classify_batch(request: Request) -> Response:
    """Classify several images (multipart fields `file`, at most `max_images`) for one task. One result per image,
    in order: an image that cannot be used gets its own error (`status`, `error`, `detail`), the others their
    predictions. Each image counts as one request in the metrics; a request refused whole (before its images are
    known) counts as one."""
    worker = await _worker(request)
    engine, settings, metrics = worker.engine, worker.settings, request.app.state.metrics

    async def prepared(data: bytes) -> np.ndarray | bytes | ServiceError:
        try:
            if len(data) > settings.max_upload_bytes:
                raise ImageRejected(413, "upload_too_large", f"image larger than {settings.max_upload_bytes} bytes")
            return await worker.pixels(data)
        except ServiceError as e:  # this image's own answer
            return e

    async def one(pixels: np.ndarray | bytes | ServiceError) -> dict[str, Any]:
        try:
            with counted(metrics, task_label(task, engine)):
                if isinstance(pixels, ServiceError):
                    raise pixels
                result = await engine.infer(pixels, task, top_k, settings.request_timeout_s, names)
        except ServiceError as e:
            return {"status": e.status, "error": e.error, "detail": e.detail}
        return {"status": 200, **scored_body(result)}

    with counted(metrics, task_label(request.query_params.get("task"), engine), failures_only=True):
        task, top_k = classify_query(request)
        check_serving(engine, task)
        names = labels_of(request, None, settings)
        with engine.incoming():  # decoded while the engine knows more images are on their way
            upload = await read_upload(request, settings.max_upload_bytes, settings.body_timeout_s,
                                       settings.max_images)
            names = labels_of(request, upload, settings) if upload.fields else names
            images = await asyncio.gather(*(prepared(data) for data in upload.files))
    results = await asyncio.gather(*(one(pixels) for pixels in images))
    return Response(encode_json({"results": results}), media_type="application/json",
                    headers={WORKER_HEADER: str(engine.worker)})


@router.post("/embed", response_model=EmbedResponse, openapi_extra=UPLOAD_BODY, tags=["classify"],
             responses={**UPLOAD_ERRORS, 200: {"content": {"application/octet-stream": {
                 "schema": {"type": "string", "format": "binary",
                            "description": "with Accept: application/octet-stream: float32 little-endian"}}}}})
async def embed(request: Request,
                task: Annotated[str | None, Query(description="a loaded task: its prompted image tower; "
                                                               "omitted: the unprompted backbone")] = None,
                ) -> Response:
    """The L2-normalised image embedding (for retrieval, caching): JSON floats, or with
    `Accept: application/octet-stream` the raw float32 little-endian vector (`x-embedding-dim` header)."""
    worker = await _worker(request)
    engine, settings, metrics = worker.engine, worker.settings, request.app.state.metrics
    with counted(metrics, task_label(task, engine) if task else EMBED_UNPROMPTED):
        check_params(request.query_params, frozenset({"task"}))
        check_serving(engine, task or None)
        with engine.incoming():
            upload = await read_upload(request, settings.max_upload_bytes, settings.body_timeout_s)
            pixels = await worker.pixels(upload.files[0])
        result: Embedded = await engine.infer(pixels, task or "", 0, settings.request_timeout_s, embed=True)
    dim = len(result.vector) // 4
    if "application/octet-stream" in request.headers.get("accept", ""):
        headers = {"x-embedding-dim": str(dim)} | ({"x-mmap-version": result.version} if result.version else {})
        return Response(result.vector, media_type="application/octet-stream", headers=headers)
    return Response(encode_json({"task": result.task or None, "version": result.version or None,
                                 "prompt_set": result.prompt_set or None, "dim": dim,
                                 "embedding": np.frombuffer(result.vector, "<f4").tolist()}),
                    media_type="application/json")


def _task_info(info: TaskInfo) -> TaskInfoModel:
    return TaskInfoModel(task=info.task, prompt_set=info.prompt_set, version=info.version, method=info.method,
                         group=info.group, classes=info.classes,
                         samples=[f"/samples/{info.task}/{name}" for name in info.samples], template=info.template,
                         evaluation=info.evaluation, trained=info.trained)


@router.get("/tasks", response_model=TaskList, responses=errors(422, 503), tags=["tasks"])
async def list_tasks(worker: WorkerDep,
                     limit: Annotated[int, Query(ge=1, le=MAX_TASKS_PAGE, description="tasks per page")] = 1000,
                     after: Annotated[str, Query(max_length=200, description="the `next` of the page before: "
                                                                             "tasks after this name")] = "",
                     prefix: Annotated[str, Query(max_length=200, description="only tasks whose names start "
                                                                              "with this")] = "") -> TaskList:
    """Served tasks in name order (classes, group, prompt set, version, method), `limit` a page; `next` names
    the task to ask `after` for the next page (null on the last)."""
    tasks, more = worker.engine.catalog.page(limit, after, prefix)
    return TaskList(tasks=[_task_info(t) for t in tasks], next=more)


@router.get("/tasks/{task}", response_model=TaskInfoModel, responses=errors(404, 503), tags=["tasks"])
async def get_task(task: str, worker: WorkerDep) -> TaskInfoModel:
    tasks = worker.engine.tasks
    if task not in tasks:
        raise worker.engine.catalog.unknown(task)
    return _task_info(tasks[task])


@router.get("/samples/{task}/{filename}", responses=errors(404, 503, 504), tags=["tasks"], response_class=Response)
async def get_sample(task: str, filename: str, worker: WorkerDep) -> Response:
    """A sample image shipped with the task's prompt set (`<set>/samples/<task>/`)."""
    if task not in worker.engine.tasks:
        raise worker.engine.catalog.unknown(task)
    reply = await worker.engine.call("sample", task=task, filename=filename)
    return Response(reply.body["data"], media_type=reply.body["media_type"])


@router.get("/version", response_model=VersionResponse, responses=errors(503), tags=["ops"])
async def version(worker: WorkerDep) -> VersionResponse:
    """What is served: the package version and the backbone (name, pretrained tag, fingerprint), device,
    precision and image-tower backend."""
    info = worker.engine.info
    return VersionResponse(version=PACKAGE_VERSION, model=info.model, pretrained=info.pretrained,
                           fingerprint=info.fingerprint, device=info.device, precision=info.precision,
                           backend=info.backend)


@router.api_route("/healthz", methods=["GET", "HEAD"], tags=["ops"],
                  responses={503: {"description": "the engine process is not running"}})
async def healthz(request: Request) -> JSONResponse:
    """The worker answers, and its engine is running."""
    worker: Worker | None = getattr(request.app.state, "worker", None)
    engine_up = worker is not None and not worker.engine.down
    return JSONResponse({"status": "alive", "engine": "up" if engine_up else "down"},
                        status_code=200 if engine_up else 503)


@router.api_route("/readyz", methods=["GET", "HEAD"], tags=["ops"],
                  responses={503: {"description": "not ready; `reason` says why"}})
async def readyz(request: Request) -> JSONResponse:
    """200 only when the engine runs, its prompt sets and warm-up are done, and a task is served; `workers`: the
    HTTP workers taking connections now (one is enough to serve; all of them once start-up is over)."""
    worker: Worker | None = getattr(request.app.state, "worker", None)
    if worker is None:
        reason, tasks = "starting: connecting to the engine", 0
    else:
        catalog = worker.engine.catalog
        reason = catalog.reason if worker.engine.down or not catalog.ready else None
        reason = "the engine is not running" if worker.engine.down else reason
        tasks = len(catalog.tasks)
    body: dict[str, Any] = {"ready": reason is None, "reason": reason, "tasks": tasks}
    serving = request.app.state.workers_serving
    if serving is not None:  # HTTP workers taking connections now, of those configured (balancer.py)
        body["workers"] = {"serving": serving(), "configured": request.app.state.settings.workers}
    return JSONResponse(body, status_code=200 if reason is None else 503)


@router.get("/metrics", tags=["ops"], response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html")


@router.api_route("/favicon.ico", methods=["GET", "HEAD"], include_in_schema=False)
async def favicon() -> FileResponse:
    return FileResponse(STATIC_DIR / "favicon.png", media_type="image/png")


# ---- admin ----

BEARER = HTTPBearer(auto_error=False, description="the admin token (MMAP_ADMIN_TOKEN)")


def _require_admin(request: Request, _bearer: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)]) -> None:
    """The admin token's check (BEARER only puts the scheme into the OpenAPI, for Swagger's Authorize)."""
    token = request.app.state.settings.admin_token.get_secret_value()
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise ServiceError(401, "unauthorized", "the admin API needs 'Authorization: Bearer <token>'",
                           {"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise ServiceError(403, "forbidden", "wrong admin token")


admin = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(_require_admin)],
                  responses=errors(401, 403, 503))


@admin.get("/promptsets")
async def list_prompt_sets(worker: WorkerDep) -> dict[str, Any]:
    """Loaded, failed (with the last error) and available prompt sets of the prompt directory."""
    return (await worker.engine.call("admin.list")).body


@admin.post("/promptsets/{name}", responses=errors(404, 422))
async def load_prompt_set(name: str, worker: WorkerDep) -> dict[str, Any]:
    """Load `<prompts>/<name>`, or reload it if loaded; on failure the old version keeps serving (422)."""
    return (await worker.engine.call("admin.load", name=name)).body


@admin.delete("/promptsets/{name}", responses=errors(404))
async def unload_prompt_set(name: str, worker: WorkerDep) -> dict[str, Any]:
    """Stop serving a prompt set (its directory stays; the watcher reloads it only if it changes)."""
    return (await worker.engine.call("admin.unload", name=name)).body


# ---- the app ----

def error_response(exc: ServiceError) -> JSONResponse:
    """A ServiceError as the service's one error shape."""
    return JSONResponse({"error": exc.error, "detail": exc.detail}, status_code=exc.status, headers=exc.headers)


class ClassifyFastPath:
    """`POST /classify` straight to its handler, past FastAPI's routing and endpoint machinery, which cost a
    quarter of an HTTP worker's CPU a request (docs/benchmarks.md, "FastAPI's share"). Every other request, and
    the route's OpenAPI entry, stay FastAPI's; this sits inside the app's error and CORS middleware, so both
    apply as before."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/classify":
            await self.app(scope, receive, send)
            return
        try:
            response = await classify(Request(scope, receive, send))
        except ServiceError as e:
            response = error_response(e)
        await response(scope, receive, send)


def create_app(settings: Settings, connect: Callable[[], Awaitable[EngineClient]],
               workers_serving: Callable[[], int] | None = None) -> FastAPI:
    """One worker's ASGI app; `connect()` runs when the app starts and returns the started engine client;
    `workers_serving()`, where the launcher balances connections, counts the HTTP workers taking them."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        set_pillow_pixel_limit(settings.max_image_pixels)
        app.state.worker = Worker(settings, await connect())
        gc.collect()
        gc.freeze()  # the app's start-up objects never need a full collection again
        try:
            yield
        finally:
            worker, app.state.worker = app.state.worker, None
            await worker.close()

    app = FastAPI(title="mmap-serve", summary="MmAP-prompted CLIP: classify images for any loaded task",
                  version=PACKAGE_VERSION, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.worker = None
    app.state.workers_serving = workers_serving
    app.include_router(router)
    if settings.admin_token is not None:
        app.include_router(admin)
    app.add_middleware(ClassifyFastPath)  # first: the middleware added after it (CORS) wraps it
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "HEAD", "POST", "DELETE"],
                           allow_headers=["authorization", "content-type", "x-request-id"], max_age=600,
                           expose_headers=["x-request-id", WORKER_HEADER, "x-embedding-dim", "x-mmap-version",
                                           "retry-after"])
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.mount("/docs-assets", StaticFiles(directory=DOCS_ASSETS), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def _swagger() -> Response:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} - API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon.png")

    @app.get("/redoc", include_in_schema=False)
    async def _redoc() -> Response:
        return get_redoc_html(openapi_url=app.openapi_url, title=f"{app.title} - API",
                              redoc_js_url="/docs-assets/redoc.standalone.js",
                              redoc_favicon_url="/docs-assets/favicon.png", with_google_fonts=False)

    generate_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        """FastAPI's schema less its generic 422 (`HTTPValidationError`): this service's errors have one shape,
        and each route that can refuse a parameter lists that 422 itself."""
        if app.openapi_schema is None:
            schema = generate_openapi()
            for operation in (op for path in schema["paths"].values() for op in path.values()):
                answer = operation.get("responses", {}).get("422", {})
                if "HTTPValidationError" in str(answer):
                    del operation["responses"]["422"]
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": "invalid_request", "detail": detail}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else "http_error"
        return JSONResponse({"error": code, "detail": str(exc.detail)}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    return app
