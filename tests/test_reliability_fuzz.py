"""Schema-driven fuzzing (schemathesis) of every operation of the app's own OpenAPI document, against a real
uvicorn server on loopback: no 5xx, every refusal is the documented JSON error, and the service still answers
normally afterwards. Bounded: about 30 examples per strategy, 2 to 4 strategies per operation."""

from __future__ import annotations

import contextlib
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from helpers.reliability import ADMIN, ADMIN_TOKEN
from helpers.service import DOODLES, OFFICE, image_bytes, make_set, metric, publish, served, settings
from hypothesis import HealthCheck, given, seed
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

UPLOADS = ["POST /classify", "POST /classify/batch", "POST /embed"]
OPERATIONS = [*UPLOADS, "GET /tasks", "GET /tasks/{task}", "GET /samples/{task}/{filename}", "GET /healthz",
              "HEAD /healthz", "GET /readyz", "HEAD /readyz", "GET /metrics", "GET /version", "GET /admin/promptsets",
              "POST /admin/promptsets/{name}", "DELETE /admin/promptsets/{name}",
              # rollouts: every candidate here is its task's only set, so a fuzzed record is refused unwritten
              "GET /tasks/{task}/rollout", "GET /admin/rollouts", "GET /admin/rollouts/{task}",
              "PUT /admin/rollouts/{task}", "POST /admin/rollouts/{task}/promote", "POST /admin/rollouts/{task}/abort",
              # the Open Inference Protocol (v2.py): its errors are the protocol's {"error": ...}
              "GET /v2", "GET /v2/health/live", "GET /v2/health/ready", "GET /v2/models/{task}",
              "GET /v2/models/{task}/versions/{version}", "GET /v2/models/{task}/ready",
              "GET /v2/models/{task}/versions/{version}/ready", "POST /v2/models/{task}/infer",
              "POST /v2/models/{task}/versions/{version}/infer"]
EXAMPLES = 30
FUZZ = hypothesis_settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
                           suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def fuzzed(tiny, tmp_path_factory) -> Iterator[tuple[str, schemathesis.BaseSchema, dict[str, str]]]:
    prompts: Path = tmp_path_factory.mktemp("prompts")
    office = make_set(tiny, "office", OFFICE, 1)
    publish(office, prompts)
    publish(make_set(tiny, "doodles", DOODLES, 2), prompts)
    sample_dir = prompts / "office" / "samples" / "clipart"
    sample_dir.mkdir(parents=True)
    (sample_dir / "dog.png").write_bytes(image_bytes(1))
    with served(settings(prompts, admin_token=ADMIN_TOKEN, max_upload_bytes=1 << 20)) as base:
        yield base, schemathesis.openapi.from_url(f"{base}/openapi.json"), {"office": office.version}


def _strategies(operation, png: bytes) -> list:
    """Random inputs, plus inputs that reach past the first refusal (a served task, a real image, a real set)."""
    key = f"{operation.method.upper()} {operation.path}"
    plain = operation.as_strategy()
    if key in UPLOADS:
        return [plain, operation.as_strategy(query={"task": "clipart"}),
                operation.as_strategy(query={"task": "sketch"}, body=png, media_type="image/png")]
    if key in ("GET /tasks/{task}", "GET /v2/models/{task}", "POST /v2/models/{task}/infer",
               "GET /tasks/{task}/rollout", "PUT /admin/rollouts/{task}", "GET /admin/rollouts/{task}",
               "POST /admin/rollouts/{task}/abort"):
        return [plain, operation.as_strategy(path_parameters={"task": "clipart"})]
    if key == "GET /samples/{task}/{filename}":
        return [plain, operation.as_strategy(path_parameters={"task": "clipart"}),
                operation.as_strategy(path_parameters={"task": "clipart", "filename": "dog.png"})]
    if key == "POST /admin/promptsets/{name}":
        return [plain, operation.as_strategy(path_parameters={"name": "doodles"})]  # reloads under fuzz
    return [plain]  # DELETE stays random: unloading a served set would only turn later answers into 404s


def _check(key: str, response) -> None:
    assert response.status_code < 500 or (key.endswith(" /readyz") and response.status_code == 503), (
        f"{key}: {response.status_code} {response.text[:500]}")
    if response.status_code >= 400 and not key.endswith(" /readyz") and not key.startswith("HEAD "):
        content_type = response.headers.get("content-type") or [""]  # schemathesis: header -> list of values
        assert content_type[0] == "application/json", (key, response.headers)
        body = response.json()
        if key.split()[1].startswith("/v2"):  # the protocol's shape (a path no route matches: the service's 404)
            assert set(body) in ({"error"}, {"error", "detail"}) and isinstance(body["error"], str), (key, body)
        else:
            assert set(body) == {"error", "detail"} and isinstance(body["detail"], str), (key, body)


def test_schema_lists_every_operation(fuzzed):
    _, schema, _ = fuzzed
    found = sorted(f"{r.ok().method.upper()} {r.ok().path}" for r in schema.get_all_operations())
    assert found == sorted(OPERATIONS), "a new route must be added to OPERATIONS (and so to the fuzzing)"


@pytest.mark.parametrize("key", OPERATIONS)
def test_fuzzed_operation_never_answers_5xx(fuzzed, key):
    base, schema, _ = fuzzed
    operation = next(r.ok() for r in schema.get_all_operations() if f"{r.ok().method.upper()} {r.ok().path}" == key)
    headers = ADMIN if key.split()[1].startswith("/admin") else {}
    statuses: Counter[int] = Counter()

    def call(case) -> None:
        response = case.call(base_url=base, headers=headers, timeout=30)
        statuses[response.status_code] += 1
        _check(key, response)

    positive = given(case=st.one_of(*_strategies(operation, image_bytes(3))))(call)
    seed(zlib.crc32(key.encode()))(FUZZ(positive))()
    negative = given(case=operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))(call)
    # Schema-violating inputs: wrong types, missing required parameters, out-of-range numbers. Unsatisfiable:
    # nothing about this operation's inputs can be invalid (no parameters, or free-form strings only).
    with contextlib.suppress(Unsatisfiable):
        seed(zlib.crc32(key.encode()) + 1)(FUZZ(negative))()
    print(key, dict(sorted(statuses.items())))  # shown with -s: what the fuzzing got back
    has_inputs = "{" in key or key in UPLOADS  # the others have exactly one possible request
    assert sum(statuses.values()) >= (EXAMPLES if has_inputs else 1), statuses
    if key in UPLOADS:  # the fuzzing reached the model, not only the first refusal
        assert statuses[200] >= 1 and statuses[404] >= 1 and statuses[422] >= 1, statuses
    if key == "GET /samples/{task}/{filename}":
        assert statuses[200] >= 1, statuses


def test_service_answers_normally_after_the_fuzzing(fuzzed):
    """Runs after the fuzzing (file order): every task classifies, nothing was answered with a 5xx."""
    base, _, versions = fuzzed
    with httpx.Client(base_url=base, timeout=30) as client:
        assert client.get("/readyz").status_code == 200
        reload = client.post("/admin/promptsets/office", headers=ADMIN)  # in case the fuzzing unloaded it
        assert reload.status_code == 200, reload.text
        for task in (*OFFICE, *DOODLES):
            response = client.post(f"/classify?task={task}", content=image_bytes(4),
                                   headers={"content-type": "image/png"})
            assert response.status_code == 200, response.text
        assert client.get("/tasks/clipart").json()["version"] == versions["office"]
        text = client.get("/metrics").text
    served = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("mmap_requests_total{") and 'status="5' in line]
    assert sum(served) == 0, "some classify request was answered with a 5xx"
    assert metric(text, "mmap_prompt_set_loads_total", result="failure") == 0
