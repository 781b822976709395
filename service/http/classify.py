"""The upload routes: POST /classify, /classify/batch and /embed."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from service.errors import ServiceError
from service.schema import BatchAnswer, BatchItem, Classification, Embedding, Prediction, encode
from service.transport import Embedded, Scored

from .bodies import read_images
from .checks import (
    check_params,
    check_serving,
    classify_query,
    counted,
    labels_of,
    min_score_of,
    routing,
    task_label,
)
from .images import ImageRejected
from .openapi import CLASSIFY_ERRORS, CLASSIFY_REQUEST, UPLOAD_BODY, UPLOAD_ERRORS, answers
from .state import worker_of

WORKER_HEADER = "x-mmap-worker"  # which HTTP worker answered a classify request (its index)
EMBED_UNPROMPTED = "_unprompted"  # the metrics' task label of /embed without a task
JSON = "application/json"
router = APIRouter(tags=["classify"])


def classification(result: Scored, min_score: float | None = None) -> Classification:
    """The answer; it abstains when its best score is below `min_score`."""
    return Classification(result.task, result.version, result.prompt_set, result.method,
                          [Prediction(label, score) for label, score in zip(result.labels, result.scores, strict=True)],
                          min_score is not None and result.scores[0] < min_score)


@router.post("/classify", response_class=Response, responses=answers(Classification, *CLASSIFY_ERRORS),
             openapi_extra=CLASSIFY_REQUEST)
async def classify(request: Request) -> Response:
    """Classify one image for one task: the image as multipart field `file`, as a raw image/* body, or in a JSON
    body (`image`: base64; `url`: fetched, with fetch_urls)."""
    start = time.perf_counter()
    worker = worker_of(request)
    engine, settings, metrics = worker.engine, worker.settings, request.app.state.metrics
    with counted(metrics, task_label(request.query_params.get("task"), engine), start):
        task, top_k = classify_query(request)
        check_serving(engine, task)
        version, key = routing(request, engine, task)
        names = labels_of(request, None, settings)
        with engine.incoming(), worker.budget.hold() as held:
            upload = await read_images(request, held, settings)
            names = labels_of(request, upload, settings) if upload.fields else names
            pixels = await worker.pixels(upload.files[0])  # one image: its refusal was raised
        threshold = min_score_of(request, engine, task, names)
        result = await engine.infer(pixels, task, top_k, settings.request_timeout_s, names, version=version, key=key)
    return Response(encode(classification(result, threshold)), media_type=JSON,
                    headers={WORKER_HEADER: str(engine.worker)})


@router.post("/classify/batch", response_class=Response, responses=answers(BatchAnswer, *CLASSIFY_ERRORS),
             openapi_extra=CLASSIFY_REQUEST)
async def classify_batch(request: Request) -> Response:
    """Classify several images (multipart fields `file`, or a JSON body's `images` or `urls`; at most `max_images`)
    for one task. One result per image, in order: an image that cannot be used gets its own error (`status`, `error`,
    `detail`), the others their predictions. Each image counts as one request in the metrics; a request refused
    whole (before its images are known) counts as one."""
    worker = worker_of(request)
    engine, settings, metrics = worker.engine, worker.settings, request.app.state.metrics

    async def prepared(data: bytes | ServiceError) -> np.ndarray | bytes | ServiceError:
        if isinstance(data, ServiceError):  # a JSON body's image that could not be had
            return data
        try:
            if len(data) > settings.max_upload_bytes:
                raise ImageRejected(413, "upload_too_large", f"image larger than {settings.max_upload_bytes} bytes")
            return await worker.pixels(data)
        except ServiceError as e:  # this image's own answer
            return e

    async def one(pixels: np.ndarray | bytes | ServiceError) -> BatchItem:
        try:
            with counted(metrics, task_label(task, engine)):
                if isinstance(pixels, ServiceError):
                    raise pixels
                result = await engine.infer(pixels, task, top_k, settings.request_timeout_s, names, version=version,
                                            key=key)
        except ServiceError as e:
            return BatchItem(e.status, error=e.error, detail=e.detail)
        answer = classification(result, threshold)
        return BatchItem(200, result.task, result.version, result.prompt_set, result.method, answer.predictions,
                         answer.abstained)

    with counted(metrics, task_label(request.query_params.get("task"), engine), failures_only=True):
        task, top_k = classify_query(request)
        check_serving(engine, task)
        version, key = routing(request, engine, task, per_request=True)  # one version for all its images
        names = labels_of(request, None, settings)
        # decoded while the engine knows more images are on their way
        with engine.incoming(), worker.budget.hold() as held:
            upload = await read_images(request, held, settings, settings.max_images)
            names = labels_of(request, upload, settings) if upload.fields else names
            images = await asyncio.gather(*(prepared(data) for data in upload.files))
            del upload
        threshold = min_score_of(request, engine, task, names)
    results = await asyncio.gather(*(one(pixels) for pixels in images))
    return Response(encode(BatchAnswer(results)), media_type=JSON, headers={WORKER_HEADER: str(engine.worker)})


EMBED_ANSWERS = answers(Embedding, *UPLOAD_ERRORS, description="the embedding, as JSON or raw float32")
EMBED_ANSWERS[200]["content"]["application/octet-stream"] = {"schema": {
    "type": "string", "format": "binary",
    "description": "with Accept: application/octet-stream: float32 little-endian"}}


@router.post("/embed", response_class=Response, openapi_extra=UPLOAD_BODY, responses=EMBED_ANSWERS)
async def embed(request: Request,
                task: Annotated[str | None, Query(description="a loaded task: its prompted image tower; "
                                                               "omitted: the unprompted backbone")] = None,
                ) -> Response:
    """The L2-normalised image embedding (for retrieval, caching): JSON floats, or with
    `Accept: application/octet-stream` the raw float32 little-endian vector (headers `x-embedding-dim`,
    `x-mmap-task`, `x-mmap-version`)."""
    worker = worker_of(request)
    engine, settings, metrics = worker.engine, worker.settings, request.app.state.metrics
    with counted(metrics, task_label(task, engine) if task else EMBED_UNPROMPTED):
        check_params(request.query_params, frozenset({"task"}))
        check_serving(engine, task or None)
        with engine.incoming(), worker.budget.hold() as held:
            upload = await read_images(request, held, settings, labels=False)
            pixels = await worker.pixels(upload.files[0])
        result: Embedded = await engine.infer(pixels, task or "", 0, settings.request_timeout_s, embed=True)
    dim = len(result.vector) // 4
    if "application/octet-stream" in request.headers.get("accept", ""):
        headers = {"x-embedding-dim": str(dim)} | ({"x-mmap-task": result.task} if result.task else {}) | (
            {"x-mmap-version": result.version, "x-mmap-prompt-set": result.prompt_set} if result.version else {})
        return Response(result.vector, media_type="application/octet-stream", headers=headers)
    answer = Embedding(result.task or None, result.version or None, result.prompt_set or None, dim,
                       np.frombuffer(result.vector, "<f4").tolist())
    return Response(encode(answer), media_type=JSON)
