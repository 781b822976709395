"""The admin API (`/admin/promptsets`): present only when `admin_token` is set. Without one its routes answer
404, as if absent, so an unconfigured deployment does not even reveal it. With one, a missing bearer token is
401 and a wrong one 403. Its operations run in the engine, whichever worker took them."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Security
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.errors import ServiceError
from service.schema import PromptSetListing, encode
from service.transport import ListSets, LoadSet, Operation, UnloadSet

from .openapi import answers
from .state import worker_of

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
