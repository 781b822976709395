"""The service's defaults: the embedded tiny CLIP and the demo prompt sets shipped with it."""

from __future__ import annotations

import pytest
import torch
from helpers.service import classify, failed_start, image_bytes, reference_scores, run, scores, serve

import mmap_model.backbone
from mmap_model import EMBEDDED_PROMPTS_DIR, PromptSet, load_backbone
from mmap_model.promptset import CONFIG_FILE
from service import Settings
from service.engine.backbone import load_configured_backbone


def _demo_sets() -> list[str]:
    if not EMBEDDED_PROMPTS_DIR.is_dir():
        return []
    return sorted(p.name for p in EMBEDDED_PROMPTS_DIR.iterdir() if (p / CONFIG_FILE).is_file())


def test_every_demo_task_classifies_with_the_defaults():
    if not (mmap_model.backbone.EMBEDDED_DIR / "open_clip_model.safetensors").is_file():
        pytest.skip("the embedded tiny CLIP is not trained yet (python -m training.pretrain)")
    if not _demo_sets():
        pytest.skip(f"no demo prompt set in {EMBEDDED_PROMPTS_DIR} yet")
    backbone = load_backbone()
    demo = {name: PromptSet.load(EMBEDDED_PROMPTS_DIR / name, backbone) for name in _demo_sets()}

    async def scenario():
        async with serve(Settings(prompts=EMBEDDED_PROMPTS_DIR, device="cpu", watch_interval_s=0)) as client:
            listed = {t["task"]: t for t in (await client.get("/tasks")).json()["tasks"]}
            assert listed.keys() == {task for ps in demo.values() for task in ps.tasks}
            for name, ps in demo.items():
                for i, task in enumerate(ps.tasks):
                    samples = listed[task]["samples"]
                    data = (await client.get(samples[0])).content if samples else image_bytes(i, size=(64, 64))
                    response = await classify(client, task, data)
                    body = response.json()
                    assert body["prompt_set"] == name and body["version"] == ps.version
                    got, want = scores(response), reference_scores(backbone, ps, task, data)
                    assert max(abs(got[k] - want[k]) for k in want) <= 1e-5, task

    run(scenario())


def test_missing_embedded_weights_stop_start_up_with_the_reason(tmp_path, monkeypatch):
    """The default must never serve random weights silently: the engine's loading rule refuses."""
    monkeypatch.setattr(mmap_model.backbone, "EMBEDDED_DIR", tmp_path)  # an embedded directory without weights
    with pytest.raises(RuntimeError, match="embedded weights missing.*does not fall back to random weights"):
        load_configured_backbone(Settings(device="cpu", prompts=tmp_path))


def test_a_backbone_that_cannot_load_stops_the_service_with_the_reason(tmp_path):
    """Through the launcher: the engine's reason in the log, exit status 1, and nothing left behind."""
    code, log = failed_start(Settings(device="cpu", prompts=tmp_path, pretrained=str(tmp_path / "missing.bin"),
                                      model="ViT-B-32", workers=1))
    assert code == 1, log
    assert "is not a known tag or valid file path" in log and "the engine did not start" in log, log[-2000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: device cuda starts")
def test_device_cuda_without_a_gpu_stops_start_up_in_one_line(tmp_path):
    code, log = failed_start(Settings(device="cuda", prompts=tmp_path, workers=1))
    assert code == 1, log
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert ("device 'cuda' asked for" in errors[0] and "finds no CUDA GPU" in errors[0]
            and "use device 'cpu'" in errors[0])
    assert "Traceback" not in log, log[-2000:]


def test_a_missing_prompt_directory_stops_start_up_before_the_model_loads(tmp_path):
    code, log = failed_start(Settings(device="cpu", prompts=tmp_path / "missing", workers=1))
    assert code == 1, log
    assert f"the prompt directory {tmp_path / 'missing'} does not exist" in log, log
    assert "engine" not in log, log  # refused before the engine started
