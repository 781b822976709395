"""The published OpenAPI document is the contract: unique operation ids, and every route's live answers (its
successes and its errors) validate against the schema the document gives for that route and status."""

from __future__ import annotations

import base64
import dataclasses
import re
import typing
from pathlib import Path

import httpx
import jsonschema
import pytest
from helpers.service import DOODLES, OFFICE, image_bytes, make_set, publish, run, serve, settings

import mmap_client
from service.schema import Classification, Embedding, ErrorCode, Prediction

TOKEN = "schema-token"
ADMIN = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def prompts_dir(tiny, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("prompts")
    publish(make_set(tiny, "office", OFFICE, 1), directory)
    publish(make_set(tiny, "doodles", DOODLES, 2), directory)
    publish(make_set(tiny, "office2", OFFICE, 3), directory)  # newer: serves OFFICE; "office" is a rollout candidate
    return directory


def check(document: dict, response: httpx.Response, path: str, method: str) -> None:
    """`response` matches what the document says `method path` answers with its status."""
    answers = document["paths"][path][method]["responses"]
    status = str(response.status_code)
    assert status in answers, f"{method.upper()} {path} answered {status}, undocumented: {response.text[:300]}"
    media = response.headers.get("content-type", "").split(";")[0]
    content = answers[status].get("content", {})
    if media != "application/json":
        assert media in content or not content or any(m.endswith("/*") for m in content), (path, media, content)
        return
    schema = content["application/json"]["schema"]
    jsonschema.validate(response.json(), {**schema, "components": document["components"]},
                        cls=jsonschema.Draft202012Validator)


def test_every_route_answers_what_the_openapi_document_says(prompts_dir):
    png = image_bytes(1)
    form = {"file": ("a.png", png, "image/png")}
    b64 = base64.b64encode(png).decode()
    infer = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64]}]}

    async def scenario():
        async with serve(settings(prompts_dir, admin_token=TOKEN)) as c:
            document = (await c.get("/openapi.json")).json()
            ids = [op["operationId"] for item in document["paths"].values() for op in item.values()]
            assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
            sample = (await c.get("/tasks/clipart")).json()["samples"]
            version = (await c.get("/tasks/clipart")).json()["version"]
            calls = [
                ("post", "/classify", "/classify?task=clipart&top_k=2", {"files": form}),
                ("post", "/classify", "/classify?task=nope", {"files": form}),
                ("post", "/classify", "/classify?task=clipart&top_k=0", {"files": form}),
                ("post", "/classify", "/classify?task=clipart", {"content": b"x", "headers": {"content-type": "a/b"}}),
                ("post", "/classify", "/classify?task=clipart", {"files": {"file": ("a.png", b"junk")}}),
                ("post", "/classify/batch", "/classify/batch?task=sketch",
                 {"files": [("file", ("a.png", png)), ("file", ("b.png", b"junk"))]}),
                ("post", "/classify/batch", "/classify/batch?task=sketch&bogus=1", {"files": form}),
                ("post", "/embed", "/embed?task=clipart", {"files": form}),
                ("post", "/embed", "/embed", {"files": form}),
                ("post", "/embed", "/embed?task=nope", {"files": form}),
                ("post", "/classify", "/classify?task=clipart", {"json": {"image": b64}}),
                ("post", "/classify", "/classify?task=clipart", {"json": {"image": "not base64"}}),
                ("post", "/classify", "/classify?task=clipart", {"json": {"url": "https://127.0.0.1:9/a.png"}}),
                ("post", "/classify/batch", "/classify/batch?task=sketch", {"json": {"images": [b64, "%%"]}}),
                ("post", "/embed", "/embed?task=clipart", {"json": {"image": b64}}),
                ("get", "/v2", "/v2", {}),
                ("get", "/v2/health/live", "/v2/health/live", {}),
                ("get", "/v2/health/ready", "/v2/health/ready", {}),
                ("get", "/v2/models/{task}", "/v2/models/clipart", {}),
                ("get", "/v2/models/{task}", "/v2/models/nope", {}),
                ("get", "/v2/models/{task}/versions/{version}", f"/v2/models/clipart/versions/{version}", {}),
                ("get", "/v2/models/{task}/versions/{version}", "/v2/models/clipart/versions/0", {}),
                ("get", "/v2/models/{task}/ready", "/v2/models/clipart/ready", {}),
                ("get", "/v2/models/{task}/ready", "/v2/models/nope/ready", {}),
                ("get", "/v2/models/{task}/versions/{version}/ready", f"/v2/models/clipart/versions/{version}/ready",
                 {}),
                ("post", "/v2/models/{task}/infer", "/v2/models/clipart/infer", {"json": infer}),
                ("post", "/v2/models/{task}/infer", "/v2/models/clipart/infer",
                 {"json": {**infer, "parameters": {"binary_data_output": True}}}),
                ("post", "/v2/models/{task}/infer", "/v2/models/clipart/infer", {"json": {"inputs": []}}),
                ("post", "/v2/models/{task}/infer", "/v2/models/nope/infer", {"json": infer}),
                ("post", "/v2/models/{task}/versions/{version}/infer",
                 f"/v2/models/clipart/versions/{version}/infer", {"json": {**infer, "parameters": {"top_k": 2}}}),
                ("get", "/tasks", "/tasks?limit=1", {}),
                ("get", "/tasks", "/tasks?limit=0", {}),
                ("get", "/tasks/{task}", "/tasks/clipart", {}),
                ("get", "/tasks/{task}", "/tasks/nope", {}),
                ("get", "/samples/{task}/{filename}", "/samples/clipart/none.png", {}),
                ("get", "/version", "/version", {}),
                ("get", "/healthz", "/healthz", {}),
                ("head", "/healthz", "/healthz", {}),
                ("get", "/readyz", "/readyz", {}),
                ("head", "/readyz", "/readyz", {}),
                ("get", "/metrics", "/metrics", {}),
                ("post", "/classify", "/classify?task=clipart&version=0", {"files": form}),
                ("get", "/tasks/{task}/rollout", "/tasks/clipart/rollout", {}),
                ("put", "/admin/rollouts/{task}", "/admin/rollouts/clipart",
                 {"headers": ADMIN, "json": {"candidate": "office", "mode": "shadow", "share": 50}}),
                ("put", "/admin/rollouts/{task}", "/admin/rollouts/clipart",
                 {"headers": ADMIN, "json": {"candidate": "doodles", "mode": "canary"}}),
                ("put", "/admin/rollouts/{task}", "/admin/rollouts/clipart",
                 {"headers": ADMIN, "json": {"candidate": "office", "mode": "bogus"}}),
                ("put", "/admin/rollouts/{task}", "/admin/rollouts/clipart", {"headers": ADMIN, "content": b"{"}),
                ("post", "/classify", "/classify?task=clipart", {"files": form, "headers": {"x-client-id": "a"}}),
                ("get", "/tasks/{task}/rollout", "/tasks/clipart/rollout", {}),
                ("get", "/admin/rollouts", "/admin/rollouts", {"headers": ADMIN}),
                ("get", "/admin/rollouts/{task}", "/admin/rollouts/clipart", {"headers": ADMIN}),
                ("get", "/admin/rollouts/{task}", "/admin/rollouts/sketch", {"headers": ADMIN}),
                ("post", "/admin/rollouts/{task}/abort", "/admin/rollouts/clipart/abort", {"headers": ADMIN}),
                ("post", "/admin/rollouts/{task}/abort", "/admin/rollouts/sketch/abort", {"headers": ADMIN}),
                ("post", "/admin/rollouts/{task}/promote", "/admin/rollouts/clipart/promote", {"headers": ADMIN}),
                ("put", "/admin/rollouts/{task}", "/admin/rollouts/clipart",
                 {"headers": ADMIN, "json": {"candidate": "office", "mode": "canary", "share": 10}}),
                ("post", "/admin/rollouts/{task}/promote", "/admin/rollouts/clipart/promote", {"headers": ADMIN}),
                ("get", "/admin/promptsets", "/admin/promptsets", {"headers": ADMIN}),
                ("get", "/admin/promptsets", "/admin/promptsets", {}),
                ("get", "/admin/promptsets", "/admin/promptsets", {"headers": {"authorization": "Bearer wrong"}}),
                ("post", "/admin/promptsets/{name}", "/admin/promptsets/office", {"headers": ADMIN}),
                ("post", "/admin/promptsets/{name}", "/admin/promptsets/absent", {"headers": ADMIN}),
                ("post", "/admin/promptsets/{name}", "/admin/promptsets/..bad", {"headers": ADMIN}),
                ("delete", "/admin/promptsets/{name}", "/admin/promptsets/absent", {"headers": ADMIN}),
                ("delete", "/admin/promptsets/{name}", "/admin/promptsets/doodles", {"headers": ADMIN}),
            ]
            documented = {(m, p) for p, item in document["paths"].items() for m in item}
            assert documented == {(m, p) for m, p, _, _ in calls}, documented ^ {(m, p) for m, p, _, _ in calls}
            statuses = set()
            for method, path, url, kwargs in calls:
                response = await c.request(method.upper(), url, **kwargs)
                if method != "head":
                    check(document, response, path, method)
                statuses.add((path, response.status_code))
            assert sample == []  # the test sets ship no samples: the 404 above is the sample route's answer
            # Each route was seen succeeding (or, for samples, refusing) and refusing.
            assert {p for p, s in statuses if s == 200} >= {p for p in {p for _, p, _, _ in calls}} - {
                "/samples/{task}/{filename}"}
            assert {p for p, s in statuses if s >= 400} >= {"/classify", "/classify/batch", "/embed", "/tasks",
                                                            "/tasks/{task}", "/admin/promptsets", "/v2/models/{task}",
                                                            "/v2/models/{task}/infer"}

    run(scenario())


# mmap_client's answer types name the schema's fields; the client (which depends on no service module) gives an
# embedding as `vector` (its length is the schema's `dim`).
CLIENT_NAMES = {"embedding": "vector", "dim": None}


@pytest.mark.parametrize(("struct", "client_type"), [(Classification, mmap_client.Classification),
                                                      (Prediction, mmap_client.Prediction),
                                                      (Embedding, mmap_client.Embedding)])
def test_the_python_client_reads_every_field_of_the_wire_schema(struct, client_type):
    expected = {CLIENT_NAMES.get(name, name) for name in struct.__struct_fields__} - {None}
    assert {f.name for f in dataclasses.fields(client_type)} == expected


def test_every_error_code_raised_in_the_service_is_in_the_schema():
    codes = set(typing.get_args(ErrorCode))
    raised = set()
    for path in (Path(__file__).resolve().parents[1] / "service").rglob("*.py"):
        text = path.read_text()
        raised |= set(re.findall(r"(?:ServiceError|ImageRejected|CallRefused)\(\s*\w+,\s*\"([a-z_]+)\"", text))
        raised |= set(re.findall(r"ErrorBody\(\s*\"([a-z_]+)\"", text))
        raised |= set(re.findall(r"error=\"([a-z_]+)\"", text))
    assert raised and raised <= codes, sorted(raised - codes)
