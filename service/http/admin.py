"""The admin API (`/admin/promptsets`, `/admin/rollouts`): present only when `admin_token` is set. Without one its
routes answer 404, as if absent, so an unconfigured deployment does not even reveal it. With one, a missing bearer
token is 401 and a wrong one 403. Its operations run in the engine, whichever worker took them."""

from __future__ import annotations

import hmac
from typing import Annotated

import msgspec
from fastapi import APIRouter, Depends, Request, Security
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.errors import ServiceError
from service.schema import PromptSetListing, RolloutListing, RolloutRequest, encode
from service.transport import EndRollout, ListRollouts, ListSets, LoadSet, Operation, StartRollout, UnloadSet

from .openapi import answers
from .state import worker_of

MAX_ADMIN_BODY = 64 << 10
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


router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(_require_admin)])


async def _listing(request: Request, op: Operation) -> Response:
    reply = await worker_of(request).engine.call(op)
    return Response(encode(reply.listing), media_type="application/json")


@router.get("/promptsets", response_class=Response, responses=answers(PromptSetListing, 401, 403, 503))
async def list_prompt_sets(request: Request) -> Response:
    """Loaded, failed (with the last error) and available prompt sets of the prompt directory."""
    return await _listing(request, ListSets())


@router.post("/promptsets/{name}", response_class=Response,
             responses=answers(PromptSetListing, 401, 403, 404, 422, 503))
async def load_prompt_set(name: str, request: Request) -> Response:
    """Load `<prompts>/<name>`, or reload it if loaded; on failure the old version keeps serving (422)."""
    return await _listing(request, LoadSet(name))


@router.delete("/promptsets/{name}", response_class=Response, responses=answers(PromptSetListing, 401, 403, 404, 503))
async def unload_prompt_set(name: str, request: Request) -> Response:
    """Stop serving a prompt set (its directory stays; the watcher reloads it only if it changes)."""
    return await _listing(request, UnloadSet(name))


async def _rollouts(request: Request, op: Operation) -> Response:
    reply = await worker_of(request).engine.call(op)
    return Response(encode(reply.rollouts), media_type="application/json")


@router.get("/rollouts", response_class=Response, responses=answers(RolloutListing, 401, 403, 503))
async def list_rollouts(request: Request) -> Response:
    """Every rollout record of the prompt directory (`_rollouts/<task>.json`; refused ones with their `error`),
    how it resolves now, and this engine's evidence: requests and mean top-1 score per version, shadow agreement."""
    return await _rollouts(request, ListRollouts())


@router.get("/rollouts/{task}", response_class=Response, responses=answers(RolloutListing, 401, 403, 404, 503))
async def get_rollout(task: str, request: Request) -> Response:
    """The task's rollout and its evidence (404 `no_rollout` without one)."""
    return await _rollouts(request, ListRollouts(task))


@router.put("/rollouts/{task}", response_class=Response,
            responses=answers(RolloutListing, 401, 403, 409, 413, 422, 503),
            openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/RolloutRequest"}}}}})
async def start_rollout(task: str, request: Request) -> Response:
    """Start (or replace) the task's rollout: `candidate`, a loaded prompt set defining the task, answers (`canary`)
    or also scores (`shadow`) `share` % of its requests; another set must serve the task. Written to the prompt
    directory, so every worker, pod and replica follows it."""
    body = bytearray()
    async for chunk in request.stream():  # an authenticated caller; still bounded
        body += chunk
        if len(body) > MAX_ADMIN_BODY:
            raise ServiceError(413, "upload_too_large", f"a rollout request is at most {MAX_ADMIN_BODY} bytes")
    try:
        wanted = msgspec.json.decode(bytes(body), type=RolloutRequest)
    except msgspec.ValidationError as e:
        raise ServiceError(422, "invalid_body", f"rollout request: {e}") from None
    except msgspec.DecodeError as e:
        raise ServiceError(422, "invalid_json", f"rollout request: {e}") from None
    return await _rollouts(request, StartRollout(task, wanted))


@router.post("/rollouts/{task}/promote", response_class=Response,
             responses=answers(RolloutListing, 401, 403, 404, 409, 422, 503))
async def promote_rollout(task: str, request: Request) -> Response:
    """The candidate takes the task (its publication becomes the newest) and the record goes."""
    return await _rollouts(request, EndRollout(task, "promote"))


@router.post("/rollouts/{task}/abort", response_class=Response,
             responses=answers(RolloutListing, 401, 403, 404, 409, 503))
async def abort_rollout(task: str, request: Request) -> Response:
    """The candidate gets no more of the task's traffic, and stays out of it until a new rollout replaces the
    record."""
    return await _rollouts(request, EndRollout(task, "abort"))
