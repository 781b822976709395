"""What users expect beyond one image and one task, through one real `python -m service` (module-scoped):
open-vocabulary `labels=`, several images per request, embeddings, the model card and /version, unknown query
parameters refused, request ids, JSON logs, CORS, HEAD and the favicon."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from helpers.reliability import assert_json_error
from helpers.service import (
    DOODLES,
    OFFICE,
    image_bytes,
    make_set,
    metric,
    open_clip_preprocess,
    publish,
    reference_scores,
    service_process,
    settings,
    settings_env,
)
from PIL import Image

from mmap_client import AsyncClient, Classification, Client, MmapError
from mmap_model import PromptedCLIP, PromptSet

pytestmark = pytest.mark.slow  # one process start (imports torch)

MAX_LABELS, MAX_IMAGES = 8, 3
ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def office(tiny) -> PromptSet:
    ps = make_set(tiny, "office", OFFICE, 1)
    ps.evaluation = {"split": "test", "accuracy": {"clipart": 0.75, "product": 0.5}, "zero_shot": {"clipart": 0.25},
                     "test_images": {"clipart": 40, "product": 30}}
    ps.provenance = {"created": "2026-11-30T10:00:00+00:00", "command": "python -m training.fit ...", "seed": 3,
                     "data": {"split": {"test_fraction": 0.3},
                              "tasks": {"clipart": {"test": 40, "test_digest": "ab12"}}}}
    return ps


@pytest.fixture(scope="module")
def server(tiny, office, tmp_path_factory) -> Iterator[tuple[str, Path]]:
    root: Path = tmp_path_factory.mktemp("features")
    publish(office, root / "prompts")
    publish(make_set(tiny, "doodles", DOODLES, 2), root / "prompts")
    config = settings(root / "prompts", max_labels=MAX_LABELS, max_label_chars=20, max_images=MAX_IMAGES,
                      cors_origins=ORIGIN, log_format="json", access_log=True, admin_token="features-t0ken")
    with service_process(root / "service.log", [], settings_env(config)) as (base, _):
        yield base, root / "service.log"


@pytest.fixture
def client(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server[0], timeout=60) as c:
        yield c


def _post(client: httpx.Client, path: str, data: bytes, **params: object) -> httpx.Response:
    return client.post(path, params=params, files={"file": ("image.png", data, "image/png")})


def _scores(response: httpx.Response) -> dict[str, float]:
    assert response.status_code == 200, response.text
    return {p["label"]: p["score"] for p in response.json()["predictions"]}


# ---- labels= ----

def test_the_tasks_own_classes_as_labels_give_the_tasks_own_scores(client, office, tiny):
    data = image_bytes(4)
    classes = OFFICE["clipart"].classnames
    own = _scores(_post(client, "/classify", data, task="clipart", top_k=100))
    by_query = _scores(_post(client, "/classify", data, task="clipart", top_k=100, labels=",".join(classes)))
    by_form = _scores(client.post("/classify", params={"task": "clipart", "top_k": 100},
                                  files={"file": ("i.png", data, "image/png")},
                                  data={"labels": json.dumps(list(reversed(classes)))}))
    reference = reference_scores(tiny, office, "clipart", data)
    for got in (by_query, by_form):
        assert got.keys() == own.keys() and max(abs(got[c] - own[c]) for c in classes) <= 1e-5
    assert max(abs(own[c] - reference[c]) for c in classes) <= 1e-5
    # Other names: scored over those, with the task's prompts (a name with a comma comes through the form).
    other = _scores(client.post("/classify", params={"task": "clipart"}, files={"file": ("i.png", data, "image/png")},
                                data={"labels": json.dumps(["dog", "hot dog, spicy"])}))
    assert set(other) == {"dog", "hot dog, spicy"} and abs(sum(other.values()) - 1) < 1e-5


def test_label_sets_and_tasks_share_batches_and_keep_their_scores(server):
    """A burst mixing tasks and label sets is batched together (mean batch above 1) and every answer equals the
    same request sent alone."""
    kinds = [("clipart", None), ("clipart", "kettle,dog,owl"), ("product", "mug,lamp"), ("sketch", None)]

    async def burst(client: httpx.AsyncClient) -> list[dict[str, float]]:
        async def one(k: int) -> dict[str, float]:
            task, labels = kinds[k % len(kinds)]
            params = {"task": task, "top_k": 100, **({"labels": labels} if labels else {})}
            return _scores(await client.post("/classify", params=params,
                                             files={"file": ("i.png", image_bytes(k % 5), "image/png")}))
        return await asyncio.gather(*(one(k) for k in range(32)))

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=server[0], timeout=60) as client:
            before = (await client.get("/metrics")).text
            together = await burst(client)
            after = (await client.get("/metrics")).text
            images = metric(after, "mmap_batch_size_sum") - metric(before, "mmap_batch_size_sum")
            batches = metric(after, "mmap_batch_size_count") - metric(before, "mmap_batch_size_count")
            assert images == 32 and batches < 32, (images, batches)
            for k, got in enumerate(together):
                task, labels = kinds[k % len(kinds)]
                params = {"task": task, "top_k": 100, **({"labels": labels} if labels else {})}
                alone = _scores(await client.post("/classify", params=params,
                                                  files={"file": ("i.png", image_bytes(k % 5), "image/png")}))
                assert got.keys() == alone.keys() and max(abs(got[c] - alone[c]) for c in got) <= 1e-5

    asyncio.run(scenario())


def test_label_sets_are_cached_on_the_engine(client):
    before = client.get("/metrics").text
    for _ in range(3):
        assert _post(client, "/classify", image_bytes(1), task="product", labels="kettle,toaster").status_code == 200
    after = client.get("/metrics").text
    assert (metric(after, "mmap_label_cache_total", result="miss")
            - metric(before, "mmap_label_cache_total", result="miss") == 1)
    assert (metric(after, "mmap_label_cache_total", result="hit")
            - metric(before, "mmap_label_cache_total", result="hit") == 2)


@pytest.mark.parametrize("labels, why", [
    (",".join(f"c{i}" for i in range(MAX_LABELS + 1)), "give 1 to 8 labels"),
    ("cat,x" + "y" * 20, "longer than 20"),
    ("cat,dog\x07", "control character"),
    ("cat,cat", "distinct"),
    ("cat,,dog", "empty"),
])
def test_bad_label_lists_are_refused(client, labels, why):
    response = _post(client, "/classify", image_bytes(1), task="clipart", labels=labels)
    assert_json_error(response, 422, "invalid_labels")
    assert why in response.json()["detail"]


def test_labels_given_twice_or_malformed_are_refused(client):
    both = client.post("/classify", params={"task": "clipart", "labels": "a,b"},
                       files={"file": ("i.png", image_bytes(1), "image/png")}, data={"labels": '["c"]'})
    assert_json_error(both, 422, "invalid_labels")
    not_json = client.post("/classify", params={"task": "clipart"},
                           files={"file": ("i.png", image_bytes(1), "image/png")},
                           data={"labels": "a,b"})
    assert_json_error(not_json, 422, "invalid_labels")


def test_unknown_query_parameters_are_refused(client):
    for path, params in [("/classify", {"task": "clipart", "topk": 3}),
                         ("/classify/batch", {"task": "clipart", "lables": "a"}),
                         ("/embed", {"task": "clipart", "normalize": 0})]:
        response = _post(client, path, image_bytes(1), **params)
        assert_json_error(response, 422, "unknown_parameter")
        assert list(params)[1] in response.json()["detail"]


# ---- several images ----

def test_a_batch_answers_each_image_in_order_with_its_own_errors(client):
    good = [image_bytes(k) for k in (1, 2)]
    files = [("file", ("a.png", good[0], "image/png")), ("file", ("b.txt", b"not an image", "text/plain")),
             ("file", ("c.png", good[1], "image/png"))]
    response = client.post("/classify/batch", params={"task": "clipart", "top_k": 2}, files=files)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["status"] for r in results] == [200, 415, 200]
    assert results[1]["error"] == "unsupported_type" and results[1]["detail"]
    for result, data in zip((results[0], results[2]), good, strict=True):
        single = _post(client, "/classify", data, task="clipart", top_k=2).json()
        assert [p["label"] for p in result["predictions"]] == [p["label"] for p in single["predictions"]]
        assert np.allclose([p["score"] for p in result["predictions"]], [p["score"] for p in single["predictions"]],
                           atol=1e-5)
    too_many = client.post("/classify/batch", params={"task": "clipart"},
                           files=[("file", ("x.png", good[0], "image/png"))] * (MAX_IMAGES + 1))
    assert_json_error(too_many, 413, "too_many_images")
    raw = client.post("/classify/batch", params={"task": "clipart"}, content=good[0],
                      headers={"content-type": "image/png"})
    assert [r["status"] for r in raw.json()["results"]] == [200]


def test_two_images_on_classify_are_refused_clearly(client):
    response = client.post("/classify", params={"task": "clipart"},
                           files=[("file", ("a.png", image_bytes(1), "image/png"))] * 2)
    assert_json_error(response, 422, "too_many_images")
    assert "/classify/batch" in response.json()["detail"]


# ---- embeddings ----

def _reference_embedding(tiny, ps: PromptSet | None, task: str | None, data: bytes) -> np.ndarray:
    image = open_clip_preprocess(tiny)(Image.open(io.BytesIO(data)))
    visual = ps.prompts(task).visual if ps is not None else None
    with torch.inference_mode():
        return PromptedCLIP(tiny.model).encode_image(image[None], visual, normalize=True)[0].numpy()


def test_embeddings_are_the_prompted_normalised_image_features(client, office, tiny):
    data = image_bytes(5)
    prompted = client.post("/embed", params={"task": "clipart"}, files={"file": ("i.png", data, "image/png")})
    assert prompted.status_code == 200, prompted.text
    body = prompted.json()
    vector = np.array(body["embedding"], dtype=np.float32)
    assert body["task"] == "clipart" and body["version"] == office.version and body["dim"] == vector.size
    assert abs(np.linalg.norm(vector) - 1) < 1e-5
    assert np.abs(vector - _reference_embedding(tiny, office, "clipart", data)).max() < 1e-5
    binary = client.post("/embed", params={"task": "clipart"}, files={"file": ("i.png", data, "image/png")},
                         headers={"accept": "application/octet-stream"})
    assert binary.headers["content-type"] == "application/octet-stream"
    assert int(binary.headers["x-embedding-dim"]) == vector.size
    assert np.array_equal(np.frombuffer(binary.content, "<f4"), vector)
    bare = client.post("/embed", files={"file": ("i.png", data, "image/png")}).json()
    assert bare["task"] is None and bare["version"] is None
    assert np.abs(np.array(bare["embedding"]) - _reference_embedding(tiny, None, None, data)).max() < 1e-5
    assert_json_error(client.post("/embed", params={"task": "nope"}, files={"file": ("i.png", data, "image/png")}),
                      404, "unknown_task")


# ---- model card, version ----

def test_the_task_card_shows_the_recorded_evaluation_and_training(client, office):
    card = client.get("/tasks/clipart").json()
    assert card["template"] == OFFICE["clipart"].template
    assert card["evaluation"] == {"split": "test", "accuracy": 0.75, "zero_shot": 0.25, "test_images": 40}
    assert card["trained"]["created"] == "2026-11-30T10:00:00+00:00" and card["trained"]["seed"] == 3
    assert card["trained"]["data"] == {"split": {"test_fraction": 0.3}, "test": 40, "test_digest": "ab12"}
    assert client.get("/tasks/product").json()["evaluation"] == {"split": "test", "accuracy": 0.5, "test_images": 30}


def test_version_names_what_is_served(client, tiny):
    body = client.get("/version").json()
    assert body["model"] == "mmap-tiny" and body["pretrained"] == "random:0" and body["fingerprint"] == tiny.fingerprint
    assert (body["device"], body["precision"], body["backend"]) == ("cpu", "fp32", "torch")
    assert body["version"]


# ---- integration ----

def test_request_ids_are_echoed_or_made_and_logged(client, server):
    given = client.get("/healthz", headers={"x-request-id": "trace-42.a"})
    assert given.headers["x-request-id"] == "trace-42.a"
    made = client.get("/healthz", headers={"x-request-id": "no spaces allowed"}).headers["x-request-id"]
    assert made != "no spaces allowed" and len(made) == 16
    response = _post(client, "/classify", image_bytes(1), task="clipart")
    request_id = response.headers["x-request-id"]
    lines = [json.loads(line) for line in server[1].read_text().splitlines() if line.strip()]  # every line is JSON
    assert {"time", "level", "process", "logger", "message", "request_id"} <= set(lines[-1])
    assert any(line["request_id"] == request_id and "/classify" in line["message"] for line in lines), lines[-3:]


def test_cors_answers_the_configured_origin_only(client):
    allowed = client.options("/classify", headers={"origin": ORIGIN, "access-control-request-method": "POST"})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ORIGIN
    other = client.get("/tasks", headers={"origin": "https://elsewhere.example"})
    assert "access-control-allow-origin" not in other.headers
    assert client.get("/tasks", headers={"origin": ORIGIN}).headers["access-control-allow-origin"] == ORIGIN
    for task, status in (("clipart", 200), ("nope", 404)):  # /classify's own path (app.ClassifyFastPath) too
        posted = client.post(f"/classify?task={task}", content=image_bytes(3),
                             headers={"origin": ORIGIN, "content-type": "image/png"})
        assert posted.status_code == status and posted.headers["access-control-allow-origin"] == ORIGIN, task


def test_head_and_favicon(client):
    for path in ("/", "/healthz", "/readyz"):
        response = client.head(path)
        assert response.status_code == 200 and response.content == b"", path
    icon = client.get("/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(icon.content)).size == (32, 32)



def test_the_openapi_lists_each_routes_own_errors_and_the_admin_scheme(client):
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    assert {"/classify", "/classify/batch", "/embed", "/version"} <= set(paths)
    upload_errors = {"403", "404", "408", "413", "415", "422", "502", "503", "504"}  # 403, 502: image URLs
    for path in ("/classify", "/classify/batch", "/embed"):  # 409: a pinned version the task does not serve
        assert set(paths[path]["post"]["responses"]) == {"200"} | upload_errors | (
            {"409"} if path != "/embed" else set()), path
    assert set(paths["/tasks/{task}"]["get"]["responses"]) == {"200", "404", "503"}
    assert "Retry-After" in paths["/classify"]["post"]["responses"]["503"]["headers"]
    codes = spec["components"]["schemas"]["ErrorBody"]["properties"]["error"]["enum"]
    assert {"unknown_task", "invalid_labels", "too_many_images", "body_timeout", "shutting_down", "busy",
            "unknown_operation"} <= set(codes)
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert paths["/admin/promptsets"]["get"]["security"] == [{"HTTPBearer": []}]
    assert "security" not in paths["/classify"]["post"]


# ---- the Python client ----

def test_the_python_client_covers_the_api(server, tmp_path):
    path = tmp_path / "image.png"
    path.write_bytes(image_bytes(6))
    with Client(server[0]) as mmap:
        assert mmap.ready()
        result = mmap.classify("clipart", path, top_k=2)
        assert isinstance(result, Classification) and len(result.predictions) == 2
        assert result.label == result.predictions[0].label and result.version
        own = mmap.classify("clipart", path.read_bytes(), labels=["kettle", "dog, brown"])
        assert {p.label for p in own.predictions} == {"kettle", "dog, brown"}
        with path.open("rb") as f:
            batch = mmap.classify_batch("clipart", [path, b"not an image", f])
        assert isinstance(batch[0], Classification) and isinstance(batch[2], Classification)
        assert isinstance(batch[1], MmapError) and batch[1].status == 415
        binary, as_json = mmap.embed(path, task="clipart"), mmap.embed(path, task="clipart", binary=False)
        assert np.allclose(np.asarray(binary.vector), as_json.vector, atol=1e-7) and as_json.task == "clipart"
        assert [t["task"] for t in mmap.tasks()] == sorted([*OFFICE, *DOODLES])
        assert [t["task"] for t in mmap.tasks(after="product", limit=1)] == ["quickdraw"]
        assert [t["task"] for t in mmap.tasks(prefix="s")] == ["sketch"]
        assert mmap.task("sketch")["classes"] == DOODLES["sketch"].classnames
        assert mmap.version()["model"] == "mmap-tiny"
        with pytest.raises(MmapError) as refused:
            mmap.classify("nope", path)
        assert (refused.value.status, refused.value.error) == (404, "unknown_task")
        with pytest.raises(MmapError) as refused:
            mmap.rollout("sketch")
        assert (refused.value.status, refused.value.error) == (404, "no_rollout")
        unsure = mmap.classify("clipart", path, min_score=1.0)
        assert unsure.abstained and unsure.predictions == mmap.classify("clipart", path, min_score=0).predictions
        version = mmap.task("clipart")["version"]
        assert mmap.classify("clipart", path, version=version).version == version
        with pytest.raises(MmapError) as refused:
            mmap.classify("clipart", path, version="0" * 12)
        assert (refused.value.status, refused.value.error) == (409, "version_not_served")


def test_the_async_client_is_the_same_api(server):
    async def scenario() -> None:
        async with AsyncClient(server[0]) as mmap:
            results = await asyncio.gather(*(mmap.classify("sketch", image_bytes(k)) for k in range(4)))
            assert all(r.task == "sketch" for r in results)
            binary, as_json = await mmap.embed(image_bytes(1)), await mmap.embed(image_bytes(1), binary=False)
            assert len(binary.vector) == len(as_json.vector) > 0 and as_json.task is None

    asyncio.run(scenario())
