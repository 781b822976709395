"""The GPU path of the backends: fp16 autocast, pinned staging, compiled batch buckets, onnxruntime's CUDA
provider, and the service on CUDA. `gpu`-marked tests skip without CUDA (bench/gpu_check.sh runs them on a
GPU host); the bucket padding they rely on is checked on the CPU too."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmap_model import Backbone, load_backbone
from service.backends import TorchImageTower

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def inputs(backbone: Backbone, batch: int, depth: int = 9, tokens: int = 4, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, backbone.image_size, backbone.image_size, generator=generator)
    prompts = torch.randn(batch, min(depth, backbone.widths.layers_v), tokens, backbone.widths.d_v,
                          generator=generator) * 0.04
    return images, prompts


def cuda_backbone(model: str, precision: str) -> Backbone:
    """The same random weights as conftest's fixtures (seed 0), on CUDA at `precision`."""
    return load_backbone(model, None, "cuda", precision, seed=0)


def test_padding_to_a_batch_bucket_leaves_every_row_unchanged(tiny):
    """Compiled towers run fixed batch buckets (zero-padded); padding must not change any row."""
    eager, bucketed = TorchImageTower(tiny), TorchImageTower(tiny)
    bucketed.buckets = [1, 2, 4, 8]  # what torch_compile != "off" sets, without compiling (no CUDA here)
    for batch in (1, 3, 5):
        images, prompts = inputs(tiny, batch, seed=batch)
        for p in (prompts, None):
            got = bucketed(images, p)
            assert got.shape == (batch, tiny.widths.embed_dim)
            assert torch.allclose(got, eager(images, p), atol=1e-5)
    assert TorchImageTower(tiny, compile="default", max_batch_size=24).buckets == [1, 2, 4, 8, 16, 32]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_torch_backend_half_precision_on_cuda_matches_fp32(vitb32, precision):
    tower = TorchImageTower(cuda_backbone("ViT-B-32", precision))
    assert tower.autocast
    images, prompts = inputs(vitb32, 6)
    got = tower(images, prompts.cuda())
    expected = TorchImageTower(vitb32)(images, prompts)
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    assert F.cosine_similarity(got, expected).min() > 0.999
    assert tower._staging is not None and tower._staging.is_pinned()
    staging = tower._staging
    smaller = tower(images[:2], prompts[:2].cuda())  # the pinned buffer is reused, not reallocated
    assert tower._staging is staging and torch.allclose(smaller, got[:2], atol=2e-2)


@pytest.mark.gpu
@needs_cuda
def test_compiled_buckets_with_cuda_graphs_match_eager():
    backbone = cuda_backbone("ViT-B-32", "fp16")
    eager, compiled = TorchImageTower(backbone), TorchImageTower(backbone, "reduce-overhead", max_batch_size=8)
    for batch in (3, 8, 3, 5):  # a bucket again after another: graphs replay, inputs are not stale
        images, prompts = inputs(backbone, batch, seed=batch)
        assert torch.allclose(compiled(images, prompts.cuda()), eager(images, prompts.cuda()), atol=1e-2)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision,tolerance", [("fp32", 2e-3), ("fp16", 2e-2)])
def test_onnxruntime_cuda_provider_matches_torch(tmp_path, precision, tolerance):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDA provider: pip install 'onnxruntime-gpu[cuda,cudnn]' (the onnx-gpu extra)")
    from service.onnx_backend import OnnxImageTower

    backbone = cuda_backbone("ViT-B-32", precision)
    tower = OnnxImageTower(backbone, cache_dir=tmp_path)
    images, prompts = inputs(backbone, 5)
    got = tower(images, prompts.cuda())
    assert tower.provider == "CUDAExecutionProvider"
    assert (got - TorchImageTower(backbone)(images, prompts.cuda())).abs().max() <= tolerance


@pytest.mark.gpu
@needs_cuda
def test_service_on_cuda_fp16_scores_like_the_cpu_reference(tiny, tmp_path):
    from helpers.service import (
        OFFICE,
        classify,
        image_bytes,
        make_set,
        publish,
        reference_scores,
        run,
        scores,
        serve,
    )
    from helpers.service import settings as service_settings

    office = make_set(tiny, "office", OFFICE, 1)
    publish(office, tmp_path)

    async def scenario():
        async with serve(service_settings(tmp_path, device="cuda", precision="fp16")) as client:
            for seed, task in enumerate(["clipart", "real"]):
                data = image_bytes(seed)
                got = scores(await classify(client, task, data))
                expected = reference_scores(tiny, office, task, data)
                assert max(abs(got[k] - expected[k]) for k in expected) <= 2e-2

    run(scenario())
