"""The Open Inference Protocol (KServe v2) routes, driven by Triton's own Python client (tritonclient.http): health,
metadata, infer with encoded images and with uint8 pixels, scores equal to POST /classify's, errors in the
protocol's shape."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers.service import OFFICE, image_bytes, jpeg, make_set, publish, served, settings
from PIL import Image

httpclient = pytest.importorskip("tritonclient.http", reason="pip install 'tritonclient[http]' (the dev extra)")
from tritonclient.utils import InferenceServerException  # noqa: E402

SIZE = 48  # the served model's input size (mmap-tiny)


@pytest.fixture(scope="module")
def base(tiny, tmp_path_factory) -> Iterator[str]:
    directory: Path = tmp_path_factory.mktemp("prompts")
    publish(make_set(tiny, "office", OFFICE, 1), directory)
    with served(settings(directory)) as url:
        yield url


@pytest.fixture(scope="module")
def triton(base):
    with httpclient.InferenceServerClient(url=base.removeprefix("http://")) as c:
        yield c


def classified(base: str, data: bytes, **params: str) -> dict[str, float]:
    """POST /classify's scores of the image (multipart), every class."""
    answer = httpx.post(f"{base}/classify", params={"task": "clipart", "top_k": "100", **params},
                        files={"file": ("image", data)}, timeout=30)
    assert answer.status_code == 200, answer.text
    return {p["label"]: p["score"] for p in answer.json()["predictions"]}


def rows(result, n: int) -> list[dict[str, float]]:
    labels, scores = result.as_numpy("labels"), result.as_numpy("scores")
    assert labels.shape == scores.shape and labels.shape[0] == n and scores.dtype == np.float32
    text = [[label.decode() if isinstance(label, bytes) else label for label in row] for row in labels]
    return [dict(zip(text[i], scores[i].tolist(), strict=True)) for i in range(n)]


def assert_equal_scores(mine: dict[str, float], theirs: dict[str, float]) -> None:
    assert mine.keys() == theirs.keys()
    assert max(abs(mine[k] - theirs[k]) for k in mine) <= 1e-5


def test_server_and_model_health_and_metadata(base, triton):
    assert triton.is_server_live() and triton.is_server_ready()
    server = triton.get_server_metadata()
    assert server["name"] == "mmap-serve" and "binary_tensor_data" in server["extensions"]
    version = httpx.get(f"{base}/tasks/clipart").json()["version"]
    assert triton.is_model_ready("clipart") and triton.is_model_ready("clipart", version)
    assert not triton.is_model_ready("nope") and not triton.is_model_ready("clipart", "0")
    metadata = triton.get_model_metadata("clipart")
    assert metadata["name"] == "clipart" and metadata["versions"] == [version]
    assert metadata["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]},
                                  {"name": "pixels", "datatype": "UINT8", "shape": [-1, SIZE, SIZE, 3]}]
    assert [(o["name"], o["datatype"]) for o in metadata["outputs"]] == [("labels", "BYTES"), ("scores", "FP32"),
                                                                              ("abstained", "BOOL")]
    assert triton.get_model_metadata("clipart", version)["versions"] == [version]
    with pytest.raises(InferenceServerException) as caught:
        triton.get_model_metadata("nope")
    assert caught.value.status() == "404" and "unknown task 'nope'" in caught.value.message()


def test_infer_with_encoded_images_scores_as_classify_does(base, triton):
    images = [jpeg(1), jpeg(2, (64, 30)), image_bytes(3)]
    expected = [classified(base, data) for data in images]

    # tritonclient's default: binary tensors both ways
    tensor = httpclient.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    result = triton.infer("clipart", [tensor])
    for mine, theirs in zip(rows(result, len(images)), expected, strict=True):
        assert_equal_scores(mine, theirs)
    assert result.get_response()["model_version"] == triton.get_model_metadata("clipart")["versions"][0]

    # JSON both ways: base64 strings in, data arrays out; top_k and the version named
    tensor = httpclient.InferInput("image", [2], "BYTES")
    tensor.set_data_from_numpy(np.array([base64.b64encode(d) for d in images[:2]], dtype=np.object_),
                               binary_data=False)
    outputs = [httpclient.InferRequestedOutput(name, binary_data=False) for name in ("labels", "scores")]
    version = result.get_response()["model_version"]
    result = triton.infer("clipart", [tensor], model_version=version, outputs=outputs, parameters={"top_k": 2},
                          request_id="r-1")
    assert result.get_response()["id"] == "r-1" and "data" in result.get_output("scores")
    for mine, theirs in zip(rows(result, 2), expected[:2], strict=True):
        best = dict(sorted(theirs.items(), key=lambda item: -item[1])[:2])
        assert_equal_scores(mine, best)


def test_min_score_adds_the_abstained_output(base, triton):
    """`min_score` as /classify takes it: the BOOL output `abstained` [N], binary (tritonclient's default) or JSON; not
    among the default outputs without a threshold, and all false when asked for without one."""
    images = [jpeg(1), image_bytes(3)]
    tensor = httpclient.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    best = [max(classified(base, data).values()) for data in images]
    threshold = (best[0] + best[1]) / 2
    result = triton.infer("clipart", [tensor], parameters={"min_score": threshold})
    assert result.as_numpy("abstained").tolist() == [b < threshold for b in best] and len(set(
        result.as_numpy("abstained").tolist())) == 2
    assert result.as_numpy("scores").shape == (2, 4)
    assert triton.infer("clipart", [tensor]).as_numpy("abstained") is None  # no threshold: the two outputs
    asked = [httpclient.InferRequestedOutput("abstained", binary_data=False)]
    result = triton.infer("clipart", [tensor], outputs=asked)
    assert result.get_output("abstained")["data"] == [False, False]
    with pytest.raises(InferenceServerException) as caught:
        triton.infer("clipart", [tensor], parameters={"min_score": 2})
    assert caught.value.status() == "400" and "min_score" in caught.value.message()


def test_infer_with_uint8_pixels_at_the_input_size_scores_as_classify_does(base, triton):
    files = [image_bytes(4, (SIZE, SIZE)), image_bytes(5, (SIZE, SIZE))]  # PNGs at the input size: no resize or crop
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(f)).convert("RGB")) for f in files])
    tensor = httpclient.InferInput("pixels", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    for mine, data in zip(rows(triton.infer("clipart", [tensor]), 2), files, strict=True):
        assert_equal_scores(mine, classified(base, data))

    # the caller's labels, as /classify?labels= scores them
    tensor.set_shape([1, SIZE, SIZE, 3])
    tensor.set_data_from_numpy(pixels[:1], binary_data=False)
    result = triton.infer("clipart", [tensor], parameters={"labels": ["cat", "lynx", "teapot"]})
    assert_equal_scores(rows(result, 1)[0], classified(base, files[0], labels="cat,lynx,teapot"))


def test_a_bad_input_gets_the_protocols_error(base, triton):
    wrong = httpclient.InferInput("pixels", [1, 10, 10, 3], "UINT8")
    wrong.set_data_from_numpy(np.zeros((1, 10, 10, 3), np.uint8))
    corrupt = httpclient.InferInput("image", [1], "BYTES")
    corrupt.set_data_from_numpy(np.array([jpeg(1)[:40]], dtype=np.object_))
    floats = httpclient.InferInput("pixels", [1, SIZE, SIZE, 3], "FP32")
    floats.set_data_from_numpy(np.zeros((1, SIZE, SIZE, 3), np.float32))
    for model, tensor, status, words in (("clipart", wrong, "400", f"[N, {SIZE}, {SIZE}, 3]"),
                                         ("clipart", floats, "400", "UINT8"),
                                         ("clipart", corrupt, "422", "input 'image' element 0"),
                                         ("nope", corrupt, "404", "unknown task")):
        with pytest.raises(InferenceServerException) as caught:
            triton.infer(model, [tensor])
        assert caught.value.status() == status and words in caught.value.message(), caught.value.message()
    with pytest.raises(InferenceServerException) as caught:
        triton.infer("clipart", [corrupt], parameters={"topk": 3})
    assert caught.value.status() == "400" and "unknown parameter 'topk'" in caught.value.message()

    # on the wire: exactly {"error": ...}, the service's code in a header
    answer = httpx.post(f"{base}/v2/models/clipart/infer", json={"inputs": [{"name": "image", "shape": [1],
                                                                             "datatype": "BYTES", "data": ["%%"]}]})
    assert answer.status_code == 422 and list(answer.json()) == ["error"]
    assert answer.headers["x-mmap-error"] == "invalid_base64"
    answer = httpx.post(f"{base}/v2/models/clipart/infer", json={"inputs": [{"name": "image", "shape": [17],
                                                                             "datatype": "BYTES", "data": []}]})
    assert (answer.status_code, answer.headers["x-mmap-error"]) == (413, "too_many_images")


def test_the_protocol_routes_are_listed_in_the_api_docs(base):
    paths = httpx.get(f"{base}/openapi.json").json()["paths"]
    assert {"/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/{task}", "/v2/models/{task}/ready",
            "/v2/models/{task}/infer", "/v2/models/{task}/versions/{version}/infer"} <= set(paths)
    assert "V2InferRequest" in str(paths["/v2/models/{task}/infer"]["post"]["requestBody"])
