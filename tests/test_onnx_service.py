"""The service end to end on the onnx backend: classify over HTTP (in-process ASGI), same scores as torch."""

from __future__ import annotations

import pytest

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install -e '.[onnx]'")

from helpers.service import (  # noqa: E402
    DOODLES,
    OFFICE,
    classify,
    failed_start,
    image_bytes,
    make_set,
    metric,
    publish,
    reference_scores,
    run,
    scores,
    serve,
    settings,
)

from mmap_model import PromptConfig, TaskSpec  # noqa: E402
from service.engine.onnx.export import export_image_tower  # noqa: E402

SCENES = {"indoor": TaskSpec(["kitchen", "office", "garage"], "a photo of a {}.", "places")}


@pytest.fixture(scope="module")
def sets(tiny):
    """Three visual-prompt signatures: (3, 4) grouped mmap and maple, (3, 2) ungrouped mmap, none for coop."""
    return {"office": make_set(tiny, "office", OFFICE, 1),
            "scenes": make_set(tiny, "scenes", SCENES, 2, PromptConfig(method="maple")),
            "doodles": make_set(tiny, "doodles", DOODLES, 3, PromptConfig(method="coop"))}


@pytest.fixture(scope="module")
def prompts_dir(sets, tmp_path_factory):
    directory = tmp_path_factory.mktemp("prompts")
    for ps in sets.values():
        publish(ps, directory)
    return directory


def test_classify_on_onnx_backend_equals_torch_scores(prompts_dir, sets, tiny, tmp_path):
    cache = tmp_path / "onnx-cache"
    task_set = {task: ps for ps in sets.values() for task in ps.tasks}

    async def scenario():
        async with serve(settings(prompts_dir, backend="onnx", onnx_cache=cache)) as client:
            # the warm-up exported one graph per prompt signature before /readyz turned 200
            assert len(list(cache.glob("*.onnx"))) == 3
            for i, task in enumerate(["clipart", "real", "indoor", "sketch"]):  # (3,4), (3,2), maple (3,4), coop: none
                data = image_bytes(10 + i)
                got = scores(await classify(client, task, data))
                expected = reference_scores(tiny, task_set[task], task, data)  # mmap_model + torch only
                assert got.keys() == expected.keys()
                assert max(abs(got[k] - expected[k]) for k in got) <= 1e-4, task
            assert metric((await client.get("/metrics")).text, "mmap_requests_total", task="clipart", status="200") == 1

    run(scenario())


def test_a_graph_of_another_backbone_stops_the_service_with_the_reason(prompts_dir, foreign_graph):
    code, log = failed_start(settings(prompts_dir, backend="onnx", onnx_model=foreign_graph))
    assert code == 1 and "exported from another backbone" in log, log[-2000:]


@pytest.fixture
def foreign_graph(tmp_path):
    """A tiny-architecture graph with other weights (seed 5) than the served `random:0`."""

    from mmap_model import load_backbone

    other = load_backbone("mmap-tiny", None, seed=5)
    path = tmp_path / "other.onnx"
    export_image_tower(other, path, depth=3, tokens=4)
    return path


@pytest.mark.slow  # a real `python -m service` process (imports torch)
def test_python_m_service_backend_onnx_flag(prompts_dir, sets, tiny, tmp_path):
    import httpx
    from helpers.service import SERVED_ENV, service_process

    cache = tmp_path / "cache"
    env = {**SERVED_ENV, "MMAP_PROMPTS": str(prompts_dir), "MMAP_WATCH_INTERVAL_S": "0"}
    with service_process(tmp_path / "service.log", ["--backend", "onnx", "--onnx-cache", str(cache)], env) as (base, _):
        data = image_bytes(3)
        response = httpx.post(f"{base}/classify", params={"task": "product", "top_k": 10}, content=data,
                              headers={"content-type": "image/png"}, timeout=30)
        got = scores(response)
        expected = reference_scores(tiny, sets["office"], "product", data)
        assert max(abs(got[k] - expected[k]) for k in expected) <= 1e-4
    assert len(list(cache.glob("*.onnx"))) == 3  # the flag reached the backend: graphs went to --onnx-cache
