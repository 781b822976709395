"""The FastAPI app: `create_app(settings)` and the HTTP surface of ARCHITECTURE.md.

Start-up (lifespan): the backbone loads first and a failure stops the process with the reason
(the service never substitutes random weights on its own). Then the server accepts connections
(`/healthz` answers) while the prompt sets load and a warm-up forward runs in the background;
`/readyz` turns 200 once that is done and at least one task is served.

Errors are JSON `{"error": <code>, "detail": <why>}` with the right status. The admin API
(`/admin/promptsets`) exists only when `admin_token` is set: without one its routes answer 404,
as if absent, so an unconfigured deployment does not even reveal it. With one, a missing bearer
token is 401 and a wrong one 403.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import importlib.resources
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Annotated, Any

import torch
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from torch import Tensor

from mmap_model import Backbone, PromptedCLIP, PromptSetError, load_backbone
from mmap_model.prompts import check_name
from mmap_model.promptset import read_file_within

from .backends import make_image_tower
from .batcher import Batcher
from .errors import ServiceError
from .images import ImageRejected, decode_image, set_pillow_pixel_limit
from .metrics import UNKNOWN_TASK, Metrics
from .registry import MAX_SAMPLE_BYTES, SAMPLE_TYPES, Registry, TaskHandle, watch_directory
from .settings import Settings

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
# Swagger UI and ReDoc as files in an installed package: FastAPI's default pages load them from a CDN,
# which leaves /docs blank on an air-gapped host.
DOCS_ASSETS = Path(str(importlib.resources.files("fastapi_offline") / "static"))
MULTIPART_OVERHEAD = 64 << 10  # boundary and part headers around the file in a multipart body
RAW_TYPES = ("image/", "application/octet-stream")


def load_configured_backbone(settings: Settings) -> Backbone:
    """The backbone the settings name; seeded random weights only when asked for explicitly."""
    seed = settings.random_seed
    try:
        if seed is None:
            if settings.pretrained is None:
                log.warning("serving RANDOM weights (pretrained=none): predictions are meaningless")
            return load_backbone(settings.model, settings.pretrained, settings.device, settings.precision)
        log.warning("serving RANDOM weights (seed %d): for tests and benchmarks only", seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return load_backbone(settings.model, None, settings.device, settings.precision)
    except FileNotFoundError as e:
        raise RuntimeError(f"cannot load the backbone: {e}. Or serve another one with --model/--pretrained "
                           "(MMAP_MODEL/MMAP_PRETRAINED); the service does not fall back to random weights") from e


class Service:
    """What one running app owns: backbone, registry, batcher, thread pools and background tasks."""

    def __init__(self, settings: Settings, metrics: Metrics, backbone: Backbone):
        self.settings = settings
        self.metrics = metrics
        self.backbone = backbone
        self.registry = Registry(backbone, settings.prompts, metrics, settings.watch_debounce_s)
        self.batcher = Batcher(make_image_tower(settings.backend, backbone, settings), float(PromptedCLIP(backbone.model).logit_scale),
                               metrics, settings.max_batch_size, settings.max_wait_ms / 1000, settings.queue_size,
                               settings.request_timeout_s)
        self.loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="promptsets")  # serialises registry changes
        self.warmed_up = False
        self.failure: str | None = None
        self._decode_pool = ThreadPoolExecutor(max_workers=settings.decode_workers, thread_name_prefix="decode")
        self._background: list[asyncio.Task] = []

    @classmethod
    async def start(cls, settings: Settings, metrics: Metrics) -> Service:
        """Load the backbone (raises with the reason), then load prompt sets and warm up in the background."""
        set_pillow_pixel_limit(settings.max_image_pixels)
        try:
            backbone = await asyncio.to_thread(load_configured_backbone, settings)
        except Exception as e:
            log.error("%s", e)
            raise
        service = cls(settings, metrics, backbone)
        service.batcher.start()
        service._background.append(asyncio.create_task(service._load_and_warm_up(), name="load-and-warm-up"))
        return service

    async def stop(self) -> None:
        for task in self._background:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
        await self.batcher.stop()
        self.loader.shutdown(wait=False, cancel_futures=True)
        self._decode_pool.shutdown(wait=False, cancel_futures=True)

    def not_ready_reason(self) -> str | None:
        """None when ready: backbone loaded, prompt sets loaded, warm-up done, at least one task served."""
        if self.failure:
            return f"start-up failed: {self.failure}"
        if not self.warmed_up:
            return "loading prompt sets and warming up"
        if not self.registry.snapshot.tasks:
            failed = [s.name for s in self.registry.status() if s.state == "failed"]
            return f"no prompt set loaded from {self.settings.prompts}" + (
                f"; failed: {', '.join(failed)} (see the log or /admin/promptsets)" if failed else "")
        return None

    async def prepare_image(self, data: bytes) -> Tensor:
        """Decode and preprocess (open_clip's own eval transform) on the decode pool."""
        return await asyncio.get_running_loop().run_in_executor(self._decode_pool, self._prepare, data)

    def _prepare(self, data: bytes) -> Tensor:
        return self.backbone.preprocess(decode_image(data, self.settings.max_image_pixels))

    async def _load_and_warm_up(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self.loader, self.registry.scan)
            await self.batcher.warm_up(self.registry.snapshot, self.backbone.image_size)
        except Exception as e:  # surfaced by /readyz; the process stays up for inspection
            log.exception("start-up failed")
            self.failure = f"{type(e).__name__}: {e}"
            return
        self.warmed_up = True
        log.info("ready: %d tasks from %d prompt sets", len(self.registry.snapshot.tasks),
                 len(self.registry.snapshot.sets))
        if self.settings.watch_interval_s > 0:
            self._background.append(asyncio.create_task(
                watch_directory(self.registry, self.loader, self.settings.watch_interval_s), name="watch-prompts"))


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


class TaskInfo(BaseModel):
    task: str
    prompt_set: str
    version: str
    method: str
    group: str | None
    classes: list[str]
    samples: list[str]  # URLs of sample images for the web page


class TaskList(BaseModel):
    tasks: list[TaskInfo]


class ErrorResponse(BaseModel):
    error: str
    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (404, 413, 415, 422, 503, 504)}
UPLOAD_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                       "properties": {"file": {"type": "string", "format": "binary"}}}},
    "image/*": {"schema": {"type": "string", "format": "binary"}},
}}}


def _service(request: Request) -> Service:
    service = getattr(request.app.state, "service", None)
    if service is None:
        raise ServiceError(503, "not_running", "the service is starting or stopping", {"Retry-After": "1"})
    return service


ServiceDep = Annotated[Service, Depends(_service)]
router = APIRouter()


async def read_upload(request: Request, max_bytes: int) -> bytes:
    """The image bytes of a multipart field `file` or a raw image/* body, refusing more than `max_bytes`
    before reading it where the client declares its length, and as soon as it is exceeded otherwise."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    is_form = media == "multipart/form-data"
    if not is_form and not media.startswith(RAW_TYPES):
        raise ImageRejected(415, "unsupported_type", "send the image as multipart/form-data field 'file' or as a raw "
                                                     f"image/* body (content-type was {media or 'missing'!r})")
    allowed = max_bytes + (MULTIPART_OVERHEAD if is_form else 0)
    too_large = ImageRejected(413, "upload_too_large", f"upload larger than the limit of {max_bytes} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > allowed:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > allowed:
            raise too_large
    data = await _form_file(request, bytes(body)) if is_form else bytes(body)
    if len(data) > max_bytes:
        raise too_large
    return data


async def _form_file(request: Request, body: bytes) -> bytes:
    async def chunks() -> AsyncIterator[bytes]:
        yield body

    try:
        form = await MultiPartParser(request.headers, chunks(), max_files=1, max_fields=16).parse()
    except MultiPartException as e:
        raise ImageRejected(422, "corrupt", f"malformed multipart body: {e}") from e
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ImageRejected(422, "missing_file", "the multipart body has no file field named 'file'")
        return await upload.read()
    finally:
        await form.close()


@router.post("/classify", response_model=ClassifyResponse, responses=ERRORS, openapi_extra=UPLOAD_BODY,
             tags=["classify"])
async def classify(request: Request, service: ServiceDep,
                   task: Annotated[str, Query(description="a loaded task (GET /tasks)")],
                   top_k: Annotated[int, Query(ge=1, description="predictions to return (at most the task's classes)")] = 5,
                   ) -> ClassifyResponse:
    """Classify one image for one task: the image as multipart field `file` or as a raw image/* body."""
    start = time.perf_counter()
    snapshot = service.registry.snapshot  # held to the end: a hot swap never breaks this request
    handle = snapshot.tasks.get(task)
    label = UNKNOWN_TASK if handle is None else task
    status = 500
    try:
        if handle is None:
            loaded = ", ".join(sorted(snapshot.tasks)) or "none"
            raise ServiceError(404, "unknown_task", f"unknown task {task!r}; loaded tasks: {loaded}")
        if not service.warmed_up:
            raise ServiceError(503, "not_ready", service.not_ready_reason() or "", {"Retry-After": "1"})
        with service.batcher.incoming():
            image = await service.prepare_image(await read_upload(request, service.settings.max_upload_bytes))
        probs = await service.batcher.classify(image, handle, snapshot.slots[task])
        status = 200
    except ServiceError as e:
        status = e.status
        if isinstance(e, ImageRejected):
            service.metrics.images_rejected.labels(e.error).inc()
        raise
    finally:
        service.metrics.requests.labels(label, str(status)).inc()
        service.metrics.request_duration.labels(label).observe(time.perf_counter() - start)
    scores, indices = probs.topk(min(top_k, len(handle.classnames)))
    return ClassifyResponse(task=task, version=handle.version, prompt_set=handle.prompt_set, method=handle.method,
                            predictions=[Prediction(label=handle.classnames[i], score=s)
                                         for s, i in zip(scores.tolist(), indices.tolist(), strict=True)])


def _task_info(handle: TaskHandle) -> TaskInfo:
    return TaskInfo(task=handle.task, prompt_set=handle.prompt_set, version=handle.version, method=handle.method,
                    group=handle.group, classes=list(handle.classnames),
                    samples=[f"/samples/{handle.task}/{name}" for name in handle.samples])


def _handle(service: Service, task: str) -> TaskHandle:
    tasks = service.registry.snapshot.tasks
    if task not in tasks:
        raise ServiceError(404, "unknown_task", f"unknown task {task!r}; loaded tasks: {', '.join(sorted(tasks)) or 'none'}")
    return tasks[task]


@router.get("/tasks", response_model=TaskList, tags=["tasks"])
async def list_tasks(service: ServiceDep) -> TaskList:
    """Every served task: classes, group, prompt set, version, method."""
    snapshot = service.registry.snapshot
    return TaskList(tasks=[_task_info(snapshot.tasks[t]) for t in sorted(snapshot.tasks)])


@router.get("/tasks/{task}", response_model=TaskInfo, responses=ERRORS, tags=["tasks"])
async def get_task(task: str, service: ServiceDep) -> TaskInfo:
    return _task_info(_handle(service, task))


@router.get("/samples/{task}/{filename}", responses=ERRORS, tags=["tasks"], response_class=Response)
async def get_sample(task: str, filename: str, service: ServiceDep) -> Response:
    """A sample image shipped with the task's prompt set (`<set>/samples/<task>/`)."""
    handle = _handle(service, task)
    missing = ServiceError(404, "unknown_sample", f"task {task!r} has no sample {filename!r}")
    if filename not in handle.samples:  # only listed names: no path ever comes from the client
        raise missing
    # Read now, judged on the opened file: it may have been removed since the load, or replaced by a
    # symlink out of the prompt directory (even for just the moment of the open).
    try:
        data = await asyncio.to_thread(read_file_within, handle.sample_dir / filename, MAX_SAMPLE_BYTES,
                                       service.registry.directory.resolve())
    except PromptSetError:
        raise missing from None
    return Response(data, media_type=SAMPLE_TYPES[Path(filename).suffix.lower()])


@router.get("/healthz", tags=["ops"])
async def healthz() -> dict[str, str]:
    """The process is alive and answering."""
    return {"status": "alive"}


@router.get("/readyz", tags=["ops"], responses={503: {"description": "not ready; `reason` says why"}})
async def readyz(request: Request) -> JSONResponse:
    """200 only when the backbone, the prompt sets and the warm-up are done and a task is served."""
    service: Service | None = getattr(request.app.state, "service", None)
    reason = "starting: loading the backbone" if service is None else service.not_ready_reason()
    tasks = 0 if service is None else len(service.registry.snapshot.tasks)
    return JSONResponse({"ready": reason is None, "reason": reason, "tasks": tasks},
                        status_code=200 if reason is None else 503)


@router.get("/metrics", tags=["ops"], response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html")


# ---- admin ----

def _require_admin(request: Request) -> None:
    token = request.app.state.settings.admin_token.get_secret_value()
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise ServiceError(401, "unauthorized", "the admin API needs 'Authorization: Bearer <token>'",
                           {"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise ServiceError(403, "forbidden", "wrong admin token")


admin = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(_require_admin)],
                  responses={401: {"model": ErrorResponse}, 403: {"model": ErrorResponse}})


def _listing(service: Service) -> dict[str, Any]:
    return {"directory": str(service.registry.directory), "directory_error": service.registry.directory_error,
            "prompt_sets": [dataclasses.asdict(s) for s in service.registry.status()]}


@admin.get("/promptsets")
async def list_prompt_sets(service: ServiceDep) -> dict[str, Any]:
    """Loaded, failed (with the last error) and available prompt sets of the prompt directory."""
    return _listing(service)


@admin.post("/promptsets/{name}", responses={404: {"model": ErrorResponse}, 422: {"model": ErrorResponse}})
async def load_prompt_set(name: str, service: ServiceDep) -> dict[str, Any]:
    """Load `<prompts>/<name>`, or reload it if loaded; on failure the old version keeps serving (422)."""
    try:
        check_name(name)
    except ValueError as e:
        raise ServiceError(422, "invalid_name", str(e)) from e
    if not (service.registry.directory / name).is_dir():
        raise ServiceError(404, "not_found", f"no prompt-set directory {name!r} in {service.registry.directory}")
    try:
        await asyncio.get_running_loop().run_in_executor(service.loader, service.registry.load, name)
    except PromptSetError as e:
        serving = service.registry.snapshot.sets.get(name)
        keeps = f"; version {serving.version} keeps serving" if serving else ""
        raise ServiceError(422, "load_failed", f"{e}{keeps}") from e
    return _listing(service)


@admin.delete("/promptsets/{name}", responses={404: {"model": ErrorResponse}})
async def unload_prompt_set(name: str, service: ServiceDep) -> dict[str, Any]:
    """Stop serving a prompt set (its directory stays; the watcher reloads it only if it changes)."""
    unloaded = await asyncio.get_running_loop().run_in_executor(service.loader, service.registry.unload, name)
    if not unloaded:
        raise ServiceError(404, "not_loaded", f"prompt set {name!r} is not loaded")
    return _listing(service)


# ---- the app ----

def create_app(settings: Settings | None = None) -> FastAPI:
    """The service as an ASGI app; the model loads when the app starts (lifespan), not here."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.service = await Service.start(settings, app.state.metrics)
        try:
            yield
        finally:
            service, app.state.service = app.state.service, None
            await service.stop()

    app = FastAPI(title="mmap-serve", summary="MmAP-prompted CLIP: classify images for any loaded task",
                  version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.service = None
    app.include_router(router)
    if settings.admin_token is not None:
        app.include_router(admin)
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

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse({"error": exc.error, "detail": exc.detail}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        if request.scope.get("endpoint") is classify:  # refused before the handler ran; still a classify request
            service: Service | None = app.state.service
            tasks = service.registry.snapshot.tasks if service is not None else {}
            task = request.query_params.get("task", "")
            app.state.metrics.requests.labels(task if task in tasks else UNKNOWN_TASK, "422").inc()
        return JSONResponse({"error": "invalid_request", "detail": detail}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else "http_error"
        return JSONResponse({"error": code, "detail": str(exc.detail)}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    return app
