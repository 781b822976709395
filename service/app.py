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
import importlib.resources
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from msgspec.json import encode as encode_json
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine_client import EngineClient, EngineUnavailable
from .errors import ServiceError
from .images import ImageRejected, set_pillow_pixel_limit
from .metrics import UNKNOWN_TASK, Metrics
from .settings import Settings
from .transport import TaskInfo
from .uploads import Preprocessor, read_upload

STATIC_DIR = Path(__file__).parent / "static"
# Swagger UI and ReDoc as files in an installed package: FastAPI's default pages load them from a CDN,
# which leaves /docs blank on an air-gapped host.
DOCS_ASSETS = Path(str(importlib.resources.files("fastapi_offline") / "static"))
WORKER_HEADER = "x-mmap-worker"  # which HTTP worker answered a classify request (its index)
INLINE_DECODE_PIXELS = 256 * 256  # decoded on the event loop up to this size (about a millisecond at most)


class Worker:
    """What one HTTP worker owns: the engine client, the preprocessing and the decode threads."""

    def __init__(self, settings: Settings, engine: EngineClient):
        self.settings = settings
        self.engine = engine
        self.preprocess = Preprocessor(engine.info.preprocess, settings.max_image_pixels)
        self._decode_pool = ThreadPoolExecutor(max_workers=settings.decode_workers, thread_name_prefix="decode")

    async def pixels(self, data: bytes) -> np.ndarray:
        """Decode and preprocess one upload: small images right here (a hand-off to a thread costs more
        than their decoding), larger ones on the decode threads (Pillow releases the GIL there)."""
        image = self.preprocess.open(data)
        if image.width * image.height <= INLINE_DECODE_PIXELS:
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


class TaskList(BaseModel):
    tasks: list[TaskInfoModel]


class ErrorResponse(BaseModel):
    error: str
    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (404, 413, 415, 422, 503, 504)}
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


def unknown_task(task: str, tasks: dict[str, TaskInfo]) -> ServiceError:
    return ServiceError(404, "unknown_task", f"unknown task {task!r}; loaded tasks: {', '.join(sorted(tasks)) or 'none'}")


@router.post("/classify", response_model=ClassifyResponse, responses=ERRORS, openapi_extra=UPLOAD_BODY,
             tags=["classify"])
async def classify(request: Request,
                   task: Annotated[str, Query(description="a loaded task (GET /tasks)")],
                   top_k: Annotated[int, Query(ge=1, description="predictions to return (at most the task's classes)")] = 5,
                   ) -> Response:
    """Classify one image for one task: the image as multipart field `file` or as a raw image/* body."""
    start = time.perf_counter()
    worker = await _worker(request)  # not a dependency: resolving one costs more than this whole handler's own work
    engine, settings, metrics = worker.engine, worker.settings, request.app.state.metrics
    label = task if task in engine.tasks else UNKNOWN_TASK
    status = 500
    try:
        if engine.down:
            raise EngineUnavailable()
        if task not in engine.tasks:
            raise unknown_task(task, engine.tasks)
        if not engine.catalog.ready:
            raise ServiceError(503, "not_ready", engine.catalog.reason or "", {"Retry-After": "1"})
        with engine.incoming():
            pixels = await worker.pixels(await read_upload(request, settings.max_upload_bytes, settings.body_timeout_s))
        result = await engine.infer(pixels, task, top_k, settings.request_timeout_s)
        status = 200
    except ServiceError as e:
        status = e.status
        if isinstance(e, ImageRejected):
            metrics.images_rejected.labels(e.error).inc()
        raise
    except asyncio.CancelledError:  # cut at the drain deadline: DrainDeadline answers 503
        status = 503
        raise
    finally:
        metrics.requests.labels(label, str(status)).inc()
        metrics.request_duration.labels(label).observe(time.perf_counter() - start)
    # Encoded here (ClassifyResponse documents it): FastAPI's validation of the model would cost more than the rest
    return Response(encode_json({"task": task, "version": result.version, "prompt_set": result.prompt_set,
                                 "method": result.method, "predictions": [
                                     {"label": label, "score": score}
                                     for label, score in zip(result.labels, result.scores, strict=True)]}),
                    media_type="application/json", headers={WORKER_HEADER: str(engine.worker)})


def _task_info(info: TaskInfo) -> TaskInfoModel:
    return TaskInfoModel(task=info.task, prompt_set=info.prompt_set, version=info.version, method=info.method,
                         group=info.group, classes=info.classes,
                         samples=[f"/samples/{info.task}/{name}" for name in info.samples])


@router.get("/tasks", response_model=TaskList, tags=["tasks"])
async def list_tasks(worker: WorkerDep) -> TaskList:
    """Every served task: classes, group, prompt set, version, method."""
    return TaskList(tasks=[_task_info(t) for t in worker.engine.catalog.tasks])


@router.get("/tasks/{task}", response_model=TaskInfoModel, responses=ERRORS, tags=["tasks"])
async def get_task(task: str, worker: WorkerDep) -> TaskInfoModel:
    tasks = worker.engine.tasks
    if task not in tasks:
        raise unknown_task(task, tasks)
    return _task_info(tasks[task])


@router.get("/samples/{task}/{filename}", responses=ERRORS, tags=["tasks"], response_class=Response)
async def get_sample(task: str, filename: str, worker: WorkerDep) -> Response:
    """A sample image shipped with the task's prompt set (`<set>/samples/<task>/`)."""
    if task not in worker.engine.tasks:
        raise unknown_task(task, worker.engine.tasks)
    reply = await worker.engine.call("sample", task=task, filename=filename)
    return Response(reply.body["data"], media_type=reply.body["media_type"])


@router.get("/healthz", tags=["ops"], responses={503: {"description": "the engine process is not running"}})
async def healthz(request: Request) -> JSONResponse:
    """The worker answers, and its engine is running."""
    worker: Worker | None = getattr(request.app.state, "worker", None)
    engine_up = worker is not None and not worker.engine.down
    return JSONResponse({"status": "alive", "engine": "up" if engine_up else "down"},
                        status_code=200 if engine_up else 503)


@router.get("/readyz", tags=["ops"], responses={503: {"description": "not ready; `reason` says why"}})
async def readyz(request: Request) -> JSONResponse:
    """200 only when the engine runs, its prompt sets and warm-up are done, and a task is served."""
    worker: Worker | None = getattr(request.app.state, "worker", None)
    if worker is None:
        reason, tasks = "starting: connecting to the engine", 0
    else:
        catalog = worker.engine.catalog
        reason = catalog.reason if worker.engine.down or not catalog.ready else None
        reason = "the engine is not running" if worker.engine.down else reason
        tasks = len(catalog.tasks)
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


@admin.get("/promptsets")
async def list_prompt_sets(worker: WorkerDep) -> dict[str, Any]:
    """Loaded, failed (with the last error) and available prompt sets of the prompt directory."""
    return (await worker.engine.call("admin.list")).body


@admin.post("/promptsets/{name}", responses={404: {"model": ErrorResponse}, 422: {"model": ErrorResponse}})
async def load_prompt_set(name: str, worker: WorkerDep) -> dict[str, Any]:
    """Load `<prompts>/<name>`, or reload it if loaded; on failure the old version keeps serving (422)."""
    return (await worker.engine.call("admin.load", name=name)).body


@admin.delete("/promptsets/{name}", responses={404: {"model": ErrorResponse}})
async def unload_prompt_set(name: str, worker: WorkerDep) -> dict[str, Any]:
    """Stop serving a prompt set (its directory stays; the watcher reloads it only if it changes)."""
    return (await worker.engine.call("admin.unload", name=name)).body


# ---- the app ----

def create_app(settings: Settings, connect: Callable[[], Awaitable[EngineClient]]) -> FastAPI:
    """One worker's ASGI app; `connect()` runs when the app starts and returns the started engine client."""

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
                  version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.worker = None
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
            worker: Worker | None = app.state.worker
            tasks = worker.engine.tasks if worker is not None else {}
            task = request.query_params.get("task", "")
            app.state.metrics.requests.labels(task if task in tasks else UNKNOWN_TASK, "422").inc()
        return JSONResponse({"error": "invalid_request", "detail": detail}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else "http_error"
        return JSONResponse({"error": code, "detail": str(exc.detail)}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    return app
