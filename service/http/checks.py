"""What the upload routes check before and while they read a body, and how each request is counted."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from starlette.requests import Request

from service.errors import ServiceError, version_not_served_detail
from service.metrics import OTHER_TASKS, UNKNOWN_TASK, Metrics
from service.schema import TaskInfo
from service.settings import Settings

from .contract import EngineConnection
from .engine_client import MAX_TOP_K, EngineUnavailable
from .images import ImageRejected
from .labels import parse_labels
from .uploads import Upload

CLASSIFY_PARAMS = frozenset({"task", "top_k", "labels", "version", "min_score"})
CLIENT_ID = "x-client-id"  # a rollout's assignment key: the same client, the same version
MAX_CLIENT_ID = 256


def classify_query(request: Request) -> tuple[str, int]:
    """`task` and `top_k` of an upload route, parsed here, not by FastAPI (its parameter machinery cost a
    tenth of a request's CPU); an unknown parameter is refused, so that a typo is not silently ignored.
    A `top_k` above the task's classes means all of them."""
    params = request.query_params
    check_params(params, CLASSIFY_PARAMS)
    task = params.get("task")
    if task is None:
        raise ServiceError(422, "invalid_request", "query.task: Field required")
    text = params.get("top_k", "5")
    digits = text.strip()  # ASCII digits only: "²".isdigit() holds, and int() refuses it
    value = digits.lstrip("0")
    if not (digits.isascii() and digits.isdigit()) or not value:
        raise ServiceError(422, "invalid_request", f"query.top_k: must be an integer of at least 1, not {text[:20]!r}")
    return task, int(value) if len(value) < 10 else MAX_TOP_K


def min_score_of(request: Request, engine: EngineConnection, task: str, labels: list[str] | None) -> float | None:
    """The abstention threshold of a request: its `min_score` (0 to 1), else the task's default (`TaskInfo.min_score`,
    chosen on validation for the task's classes, so not for a caller's `labels`), else None (always answer)."""
    text = request.query_params.get("min_score")
    if text is None:
        return task_min_score(engine, task, labels)
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value <= 1:
        raise ServiceError(422, "invalid_request", f"query.min_score: a number from 0 to 1, not {text[:20]!r}")
    return value


def task_min_score(engine: EngineConnection, task: str, labels: list[str] | None) -> float | None:
    """The task's default abstention threshold: chosen for its own classes, so none for a caller's `labels`."""
    return engine.tasks[task].min_score if labels is None and task in engine.tasks else None


def check_params(params: Mapping[str, str], allowed: frozenset[str]) -> None:
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ServiceError(422, "unknown_parameter", f"unknown query parameter {', '.join(map(repr, unknown))}; "
                                                     f"this route takes {', '.join(sorted(allowed))}")


def check_serving(engine: EngineConnection, task: str | None) -> None:
    """Refusals known before the body is read: the engine down, an unknown task (None: no task asked), not ready."""
    if engine.down:
        raise EngineUnavailable()
    if task is not None and task not in engine.tasks:
        raise engine.catalog.unknown(task)
    if not engine.catalog.ready:
        raise ServiceError(503, "not_ready", engine.catalog.reason or "", {"Retry-After": "1"})


def routing(request: Request, engine: EngineConnection, task: str, per_request: bool = False
            ) -> tuple[str | None, str | None]:
    """The pinned `version` (409 now if the task does not serve it) and the rollout key of a request: X-Client-ID,
    else with `per_request` a key of its own (so that every image of one request gets the same version)."""
    version = request.query_params.get("version")
    if version is not None:
        check_version(engine, task, version)
    key = request.headers.get(CLIENT_ID)
    if key is not None and len(key) > MAX_CLIENT_ID:
        raise ServiceError(422, "invalid_request", f"X-Client-ID: at most {MAX_CLIENT_ID} characters")
    return version, key if key is not None or not per_request else os.urandom(8).hex()


def served_versions(info: TaskInfo) -> list[str]:
    """The live version of a task, and its rollout candidate's while it gets traffic."""
    candidate = info.rollout.version if info.rollout is not None else None
    return [info.version, *([candidate] if candidate else [])]


def check_version(engine: EngineConnection, task: str, version: str) -> None:
    served = served_versions(engine.tasks[task])
    if version not in served:
        raise ServiceError(409, "version_not_served", version_not_served_detail(task, served, version))


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


def task_label(task: str | None, engine: EngineConnection) -> str:
    """The metrics' label of a request's task (bounded label values, metrics.py): a loaded task with metrics of
    its own, OTHER_TASKS for the other loaded tasks, else UNKNOWN_TASK."""
    info = engine.tasks.get(task) if task is not None else None
    return UNKNOWN_TASK if info is None else task if info.metered else OTHER_TASKS
