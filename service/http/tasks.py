"""The catalog routes: GET /tasks, /tasks/{task} and the tasks' sample images, answered from the worker's copy
of the engine's catalog (samples: read by the engine)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from service.schema import RolloutStatus, TaskInfo, TaskPage, encode
from service.transport import GetSample, ListRollouts

from .openapi import answers
from .state import worker_of

MAX_TASKS_PAGE = 10_000  # most tasks one GET /tasks answers
JSON = "application/json"
router = APIRouter(tags=["tasks"])


@router.get("/tasks", response_class=Response, responses=answers(TaskPage, 422, 503))
async def list_tasks(request: Request,
                     limit: Annotated[int, Query(ge=1, le=MAX_TASKS_PAGE, description="tasks per page")] = 1000,
                     after: Annotated[str, Query(max_length=200, description="the `next` of the page before: "
                                                                             "tasks after this name")] = "",
                     prefix: Annotated[str, Query(max_length=200, description="only tasks whose names start "
                                                                              "with this")] = "") -> Response:
    """Served tasks in name order (classes, group, prompt set, version, method), `limit` a page; `next` names
    the task to ask `after` for the next page (null on the last)."""
    tasks, more = worker_of(request).engine.catalog.page(limit, after, prefix)
    return Response(encode(TaskPage(tasks, more)), media_type=JSON)


@router.get("/tasks/{task}", response_class=Response, responses=answers(TaskInfo, 404, 503))
async def get_task(task: str, request: Request) -> Response:
    engine = worker_of(request).engine
    if task not in engine.tasks:
        raise engine.catalog.unknown(task)
    return Response(encode(engine.tasks[task]), media_type=JSON)


@router.get("/tasks/{task}/rollout", response_class=Response, responses=answers(RolloutStatus, 404, 503))
async def get_task_rollout(task: str, request: Request) -> Response:
    """The task's rollout (`rollout` in GET /tasks/{task}) with this engine's evidence: requests and mean top-1
    score per version, shadow agreement; 404 `no_rollout` without one. Read-only; the admin API changes it."""
    engine = worker_of(request).engine
    if task not in engine.tasks:
        raise engine.catalog.unknown(task)
    reply = await engine.call(ListRollouts(task))
    return Response(encode(reply.rollouts.rollouts[0]), media_type=JSON)


@router.get("/samples/{task}/{filename}", response_class=Response,
            responses=answers(None, 404, 503, 504, description="the image file"))
async def get_sample(task: str, filename: str, request: Request) -> Response:
    """A sample image shipped with the task's prompt set (`<set>/samples/<task>/`)."""
    engine = worker_of(request).engine
    if task not in engine.tasks:
        raise engine.catalog.unknown(task)
    sample = (await engine.call(GetSample(task, filename))).sample
    return Response(sample.data, media_type=sample.media_type)
