"""One HTTP worker's FastAPI app: the routes (classify.py, tasks.py, ops.py, admin.py; v2.py: the Open Inference
Protocol), the error bodies, the offline API pages, and the fast path of POST /classify.

An HTTP worker imports no model. It reads and checks uploads, decodes and preprocesses them to
uint8 pixels (uploads.py, on a small thread pool), and hands each image to the engine process
through its `EngineClient` (shared memory + ZeroMQ); it answers /tasks, /readyz and 404s from the
catalog the engine pushes after every change. `create_app(settings, connect)` builds the app;
`connect` is awaited when the app starts and returns the started engine client.

Errors are JSON `{"error": <code>, "detail": <why>}` (`service.schema.ErrorBody`) with the right status.
"""

from __future__ import annotations

import gc
import importlib.resources
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import ServiceError
from service.metrics import Metrics
from service.schema import ErrorBody, encode
from service.settings import Settings

from . import admin, classify, openapi, ops, tasks, v2
from .contract import EngineConnection
from .fetch import Fetcher
from .images import set_pillow_pixel_limit
from .state import Worker

# Swagger UI and ReDoc as files in an installed package: FastAPI's default pages load them from a CDN,
# which leaves /docs blank on an air-gapped host.
DOCS_ASSETS = Path(str(importlib.resources.files("fastapi_offline") / "static"))


def error_response(status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> Response:
    """The service's one error shape."""
    return Response(encode(ErrorBody(error, detail)), status_code=status, media_type="application/json",
                    headers=headers)


def service_error(exc: ServiceError) -> Response:
    return error_response(exc.status, exc.error, exc.detail, exc.headers)


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
            response = await classify.classify(Request(scope, receive, send))
        except ServiceError as e:
            response = service_error(e)
        await response(scope, receive, send)


def create_app(settings: Settings, connect: Callable[[], Awaitable[EngineConnection]],
               workers_serving: Callable[[], int] | None = None) -> FastAPI:
    """One worker's ASGI app; `connect()` runs when the app starts and returns the started engine client;
    `workers_serving()`, where the launcher balances connections, counts the HTTP workers taking them."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        set_pillow_pixel_limit(settings.max_image_pixels)
        app.state.worker = Worker(settings, await connect())
        app.state.fetcher = Fetcher(settings) if settings.fetch_urls else None
        gc.collect()
        gc.freeze()  # the app's start-up objects never need a full collection again
        try:
            yield
        finally:
            worker, app.state.worker = app.state.worker, None
            fetcher, app.state.fetcher = app.state.fetcher, None
            await worker.close()
            if fetcher is not None:
                await fetcher.close()

    app = FastAPI(title="mmap-serve", summary="MmAP-prompted CLIP: classify images for any loaded task",
                  version=ops.PACKAGE_VERSION, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.worker = None
    app.state.fetcher = None  # image URLs of JSON bodies (fetch.py), with fetch_urls
    app.state.workers_serving = workers_serving
    for routes in (classify, tasks, ops, v2):
        app.include_router(routes.router)
    if settings.admin_token is not None:
        app.include_router(admin.router)
    app.add_middleware(ClassifyFastPath)  # first: the middleware added after it (CORS) wraps it
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "HEAD", "POST", "DELETE"],
                           allow_headers=["authorization", "content-type", "x-request-id", v2.HEADER_LENGTH],
                           max_age=600,
                           expose_headers=["x-request-id", classify.WORKER_HEADER, "x-embedding-dim",
                                           "x-mmap-task", "x-mmap-version", "x-mmap-prompt-set", "retry-after",
                                           v2.HEADER_LENGTH, v2.ERROR_HEADER])
    app.mount("/static", StaticFiles(directory=ops.STATIC_DIR), name="static")
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

    openapi.install(app)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> Response:
        return service_error(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return error_response(422, "invalid_request", detail)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return error_response(exc.status_code, "not_found" if exc.status_code == 404 else "http_error",
                              str(exc.detail), getattr(exc, "headers", None))

    return app
