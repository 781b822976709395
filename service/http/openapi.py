"""The OpenAPI document: the answers' schemas come from the wire schema (service/schema.py), and this
module says which answers and errors each route has, and documents the parameters the routes parse
themselves."""

from __future__ import annotations

from typing import Any

import msgspec
from fastapi import FastAPI

from service.schema import ErrorBody, ImageBody, openapi_components, ref

RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}
WHY = {401: "no bearer token", 403: "wrong token; an image URL this service does not fetch (or fetch_urls off)",
       404: "unknown task (or sample, or set)",
       408: "the body stalled for body_timeout_s (`body_timeout`)",
       409: "a pinned `version` the task does not serve (the answer names those it does), or a rollout refused",
       413: "upload, image or image count over its limit", 415: "not a supported image type",
       422: "invalid parameters, labels, multipart or JSON body, base64, image URL or image",
       502: "an image URL could not be fetched (its host's answer, a connection failure, too many redirects)",
       503: "not ready, overloaded, busy, the engine is down, or stopping; `Retry-After` when retrying helps",
       504: "no result within request_timeout_s, or an image URL not fetched within fetch_timeout_s"}


def answers(answer: type[msgspec.Struct] | None, *codes: int, description: str = "success",
            media_type: str = "application/json") -> dict[int | str, dict[str, Any]]:
    """The OpenAPI responses of a route: 200 with `answer` (a wire-schema struct), and the errors `codes`."""
    ok: dict[str, Any] = {"description": description}
    if answer is not None:
        ok["content"] = {media_type: {"schema": ref(answer)}}
    return {200: ok, **{code: {"description": WHY[code], "content": {"application/json": {"schema": ref(ErrorBody)}},
                               **({"headers": RETRY_AFTER} if code == 503 else {})}
                        for code in codes}}


def query(name: str, schema: dict[str, Any], description: str, required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "schema": schema, "description": description}


UPLOAD_ERRORS = (403, 404, 408, 413, 415, 422, 502, 503, 504)
CLASSIFY_ERRORS = (*UPLOAD_ERRORS, 409)  # and a pinned version not served
UPLOAD_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                       "properties": {"file": {"type": "string", "format": "binary"}}}},
    "image/*": {"schema": {"type": "string", "format": "binary"}},
    "application/json": {"schema": ref(ImageBody)},
}}}
TASK = query("task", {"type": "string"}, "a loaded task (GET /tasks)", required=True)
TOP_K = query("top_k", {"type": "integer", "minimum": 1, "default": 5},
              "predictions to return per image; more than the task's classes: all of them")
LABELS = query("labels", {"type": "string"}, "score against these class names (comma-separated) with the task's "
                                             "prompts and template; or the form field `labels`, a JSON array")
VERSION = query("version", {"type": "string"}, "pin the task's version (its live one, or a rollout candidate's: "
                                              "GET /tasks/{task}); another is 409 `version_not_served`")
CLIENT_ID = {"name": "X-Client-ID", "in": "header", "required": False, "schema": {"type": "string", "maxLength": 256},
             "description": "during a canary rollout, the same client id always gets the same version"}
MIN_SCORE = query("min_score", {"type": "number", "minimum": 0, "maximum": 1},
                  "abstain (`abstained: true`) when the best score is below this; default: the task's `min_score` "
                  "(GET /tasks/{task}), none with `labels`")
CLASSIFY_REQUEST = {"parameters": [TASK, TOP_K, LABELS, VERSION, MIN_SCORE, CLIENT_ID], **UPLOAD_BODY}


def install(app: FastAPI) -> None:
    """Make `app.openapi()` FastAPI's document with the wire schema's components, less FastAPI's generic 422
    (`HTTPValidationError`): this service's errors have one shape, and each route that can refuse a parameter
    lists that 422 itself."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            for operation in (op for path in schema["paths"].values() for op in path.values()):
                answer = operation.get("responses", {}).get("422", {})
                if "HTTPValidationError" in str(answer):
                    del operation["responses"]["422"]
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            components.update(openapi_components())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
