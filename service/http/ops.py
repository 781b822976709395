"""The operators' routes: /healthz, /readyz, /version, /metrics, and the web page."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.schema import Health, Readiness, ServedModel, VersionInfo, WorkersServing, encode

from .openapi import answers
from .state import worker_of

STATIC_DIR = Path(__file__).parent / "static"
try:
    PACKAGE_VERSION = importlib.metadata.version("mmap-serve")
except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
    PACKAGE_VERSION = "0+unknown"
JSON = "application/json"
router = APIRouter(tags=["ops"])


def json(answer: object, status: int = 200) -> Response:
    return Response(encode(answer), status_code=status, media_type=JSON)


@router.get("/version", response_class=Response, responses=answers(VersionInfo, 503))
async def version(request: Request) -> Response:
    """What is served: the package version and the backbone (name, pretrained tag, fingerprint), device,
    precision and image-tower backend."""
    info = worker_of(request).engine.info
    served = {name: getattr(info, name) for name in ServedModel.__struct_fields__}
    return json(VersionInfo(**served, version=PACKAGE_VERSION))


HEALTH = answers(Health, description="alive, and the engine runs")
HEALTH[503] = {"description": "the engine process is not running", "content": HEALTH[200]["content"]}


# GET and HEAD are two routes (not one with two methods): each gets its own OpenAPI operation id.
@router.head("/healthz", response_class=Response, responses=HEALTH)
@router.get("/healthz", response_class=Response, responses=HEALTH)
async def healthz(request: Request) -> Response:
    """The worker answers, and its engine is running."""
    worker = request.app.state.worker
    up = worker is not None and not worker.engine.down
    return json(Health("alive", "up" if up else "down"), 200 if up else 503)


READY = answers(Readiness, description="ready to serve")
READY[503] = {"description": "not ready; `reason` says why", "content": READY[200]["content"]}


@router.head("/readyz", response_class=Response, responses=READY)
@router.get("/readyz", response_class=Response, responses=READY)
async def readyz(request: Request) -> Response:
    """200 only when the engine runs, its prompt sets and warm-up are done, and a task is served; `workers`: the
    HTTP workers taking connections now (one is enough to serve; all of them once start-up is over)."""
    worker = request.app.state.worker
    if worker is None:
        reason, tasks = "starting: connecting to the engine", 0
    else:
        catalog = worker.engine.catalog
        reason = catalog.reason if worker.engine.down or not catalog.ready else None
        reason = "the engine is not running" if worker.engine.down else reason
        tasks = len(catalog.tasks)
    serving = request.app.state.workers_serving  # HTTP workers taking connections now (balancer.py)
    workers = None if serving is None else WorkersServing(serving(), request.app.state.settings.workers)
    return json(Readiness(reason is None, reason, tasks, workers), 200 if reason is None else 503)


@router.get("/metrics", response_class=Response,
            responses={200: {"description": f"Prometheus text format ({CONTENT_TYPE_LATEST})",
                             "content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html")


@router.api_route("/favicon.ico", methods=["GET", "HEAD"], include_in_schema=False)
async def favicon() -> FileResponse:
    return FileResponse(STATIC_DIR / "favicon.png", media_type="image/png")
