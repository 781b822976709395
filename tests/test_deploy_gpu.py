"""The GPU path of the backends: fp16 autocast, pinned staging, compiled batch buckets, captured CUDA
graphs, onnxruntime's CUDA provider, and the service on CUDA. `gpu`-marked tests skip without CUDA
(bench/gpu_check.sh runs them on a GPU host); the bucket padding they rely on is checked on the CPU too."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmap_model import Backbone, load_backbone
from service.engine.backends import TorchImageTower, batch_buckets, make_image_tower
from service.settings import Settings

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
    assert TorchImageTower(tiny, compile="default", max_batch_size=24).buckets == [1, 2, 4, 8, 16, 24]


def test_batch_buckets_are_finer_than_powers_of_two_and_hold_the_largest_batch():
    assert batch_buckets(1) == [1]
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 48, 64]
    assert batch_buckets(100) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128]
    for most in range(1, 300):
        buckets = batch_buckets(most)
        assert buckets[-1] >= most and (len(buckets) == 1 or buckets[-2] < most)
        assert all(b / a <= 2 and (a < 16 or b / a <= 1.5) for a, b in pairwise(buckets))


def test_cuda_graphs_are_refused_clearly_without_cuda_or_with_torch_compile(tiny):
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        TorchImageTower(tiny, cuda_graphs=True)
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        make_image_tower("torch", tiny, Settings(cuda_graphs=True))
    with pytest.raises(ValueError, match="exclude each other"):
        Settings(cuda_graphs=True, torch_compile="reduce-overhead")
    assert make_image_tower("torch", tiny, Settings()).graphs is None  # the default on a CPU: eager


def test_defaults_that_depend_on_the_device_are_filled_in_for_it():
    cpu, cuda = Settings().resolved("cpu"), Settings().resolved("cuda")
    assert (cpu.max_batch_size, cpu.cuda_graphs) == (32, False)
    assert (cuda.max_batch_size, cuda.cuda_graphs) == (128, True)
    assert Settings(torch_compile="default").resolved("cuda").cuda_graphs is False
    assert Settings(backend="onnx").resolved("cuda").cuda_graphs is False
    chosen = Settings(max_batch_size=48, cuda_graphs=False).resolved("cuda")
    assert (chosen.max_batch_size, chosen.cuda_graphs) == (48, False)  # what the user set stays
    assert Settings().max_batch_size is None  # unresolved until the model's device is known


@pytest.mark.gpu
@needs_cuda
def test_cuda_graphs_are_the_default_on_cuda_unless_torch_compile_or_turned_off():
    backbone = cuda_backbone("ViT-B-32", "fp16")
    assert make_image_tower("torch", backbone, Settings()).graphs is not None
    assert make_image_tower("torch", backbone, Settings(cuda_graphs=False)).graphs is None
    assert make_image_tower("torch", backbone, Settings(torch_compile="default")).graphs is None


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_torch_backend_half_precision_on_cuda_matches_fp32(vitb32, precision):
    tower = TorchImageTower(cuda_backbone("ViT-B-32", precision))
    assert tower.autocast
    images, prompts = inputs(vitb32, 6)
    got = tower(images, prompts.cuda())
    expected = TorchImageTower(vitb32)(images, prompts)
    assert got.dtype == torch.float32 and got.device.type == "cuda"  # the engine scores on the device
    assert F.cosine_similarity(got.cpu(), expected).min() > 0.999
    staging = tower._staging
    first = list(staging.buffers)
    assert len(first) == 1 and first[0].is_pinned()
    smaller = tower(images[:2], prompts[:2].cuda())  # its copy has passed (got.cpu()): reused, not reallocated
    assert len(staging.buffers) == 1 and staging.buffers[0] is first[0] and torch.allclose(smaller, got[:2],
                                                                                           atol=2e-2)
    copied = staging._copied[0]  # images already on the device (the engine's) go straight in, not via the host
    assert torch.allclose(tower(images.cuda(), prompts.cuda()), got, atol=2e-2) and staging._copied == [copied]


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
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_captured_cuda_graphs_match_eager_and_survive_new_prompt_values(precision):
    backbone = cuda_backbone("ViT-B-32", precision)
    eager, graphed = TorchImageTower(backbone), TorchImageTower(backbone, max_batch_size=24, cuda_graphs=True)
    tolerance = 1e-2 if precision == "fp16" else 1e-4
    first = None
    for batch, seed in [(3, 0), (24, 1), (3, 2), (17, 3), (1, 4)]:  # a bucket again after another: nothing stale
        images, prompts = inputs(backbone, batch, seed=seed)  # new prompt values each time: a swap
        got = graphed(images, prompts.cuda())
        assert got.shape == (batch, backbone.widths.embed_dim)
        assert (got - eager(images, prompts.cuda())).abs().max() <= tolerance
        first = got if first is None else first
    assert len(graphed.graphs.graphs) == len(graphed.buckets)  # one prompt shape: captured once, at first use
    images, prompts = inputs(backbone, 3, seed=0)  # the first call's, whose bucket has been replayed since:
    assert (first - eager(images, prompts.cuda())).abs().max() <= tolerance  # what it returned is its own copy
    images, _ = inputs(backbone, 5)
    assert (graphed(images, None) - eager(images, None)).abs().max() <= tolerance  # unprompted: its own graphs
    assert len(graphed.graphs.graphs) == 2 * len(graphed.buckets)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision,tolerance", [("fp32", 2e-3), ("fp16", 2e-2)])
def test_onnxruntime_cuda_provider_matches_torch(tmp_path, precision, tolerance):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDA provider: pip install 'onnxruntime-gpu[cuda,cudnn]' (the onnx-gpu extra)")
    from service.engine.onnx.backend import OnnxImageTower

    backbone = cuda_backbone("ViT-B-32", precision)
    tower = OnnxImageTower(backbone, cache_dir=tmp_path)
    images, prompts = inputs(backbone, 5)
    got = tower(images, prompts.cuda())
    assert tower.provider == "CUDAExecutionProvider"
    assert (got - TorchImageTower(backbone)(images, prompts.cuda()).cpu()).abs().max() <= tolerance


@pytest.mark.gpu
@needs_cuda
def test_pixels_cross_to_the_gpu_through_reused_pinned_buffers():
    from service.engine.backends import PixelNormalizer

    mean, std = [0.5, 0.4, 0.3], [0.2, 0.3, 0.4]
    normalize = PixelNormalizer(torch.device("cuda"), mean, std)
    images = [np.random.default_rng(i).integers(0, 256, (224, 224, 3), dtype=np.uint8) for i in range(5)]
    batch = normalize.stack(images)
    assert batch.device.type == "cuda" and torch.equal(batch.cpu(), torch.from_numpy(np.stack(images)))
    first = [b for b in normalize._staging.buffers if b is not None]
    assert len(first) == 1 and first[0].is_pinned()
    expected = PixelNormalizer(torch.device("cpu"), mean, std)(torch.from_numpy(np.stack(images)))
    assert torch.allclose(normalize(batch).cpu(), expected, atol=1e-6)
    for n in (2, 3):
        assert torch.equal(normalize.stack(images[:n]).cpu(), torch.from_numpy(np.stack(images[:n])))
    assert any(b is first[0] for b in normalize._staging.buffers)  # reused, not reallocated


@pytest.mark.gpu
@needs_cuda
def test_a_batch_staged_while_the_last_is_still_queued_does_not_overwrite_its_pixels():
    """The engine launches the next batch before the last one's copy has run (batches_in_flight 2): with the GPU
    kept busy, every batch staged in turn must still arrive as it was."""
    from service.engine.backends import PixelNormalizer

    normalize = PixelNormalizer(torch.device("cuda"), [0.5] * 3, [0.2] * 3)
    # more batches than buffers: the pool grows to its most, then waits for the oldest copy
    batches = [[np.full((224, 224, 3), 10 * k + i, np.uint8) for i in range(8)] for k in range(12)]
    busy = torch.randn(4096, 4096, device="cuda")
    for _ in range(3):
        on_device = []
        for images in batches:
            for _ in range(20):  # ~tens of ms of queued work: the copies wait behind it
                busy = busy @ busy.T / 4096
            on_device.append(normalize.stack(images))
        for images, got in zip(batches, on_device, strict=True):
            assert torch.equal(got.cpu(), torch.from_numpy(np.stack(images)))


GPU_DECODE_MAX, GPU_DECODE_MEAN = 16, 1.0  # 8-bit levels between nvjpeg + resize on CUDA and the Pillow path


@pytest.mark.gpu
@needs_cuda
def test_nvjpeg_decoding_is_within_the_stated_tolerance_and_fails_only_the_bad_file(vitb32):
    from helpers.service import jpeg, truncated

    from service.engine.device_decode import DeviceDecoder, UndecodableJpeg
    from service.http.uploads import Preprocessor

    cfg = vitb32.preprocess_cfg
    pillow, engine = Preprocessor(cfg, 10**8), DeviceDecoder(cfg, torch.device("cuda"))
    files = [jpeg(1, (298, 224)), jpeg(2, (1365, 1024)), jpeg(3, (224, 224), "L"),
             jpeg(4, (640, 480), progressive=True), jpeg(5, (100, 80))]
    decoded = engine([*files[:2], truncated(jpeg(6, (640, 480))), *files[2:]])
    assert isinstance(decoded[2], UndecodableJpeg)
    for data, pixels in zip(files, decoded[:2] + decoded[3:], strict=True):
        assert pixels.device.type == "cuda" and pixels.dtype == torch.uint8
        error = np.abs(pixels.cpu().numpy().astype(int) - pillow(data))
        print(f"nvjpeg vs Pillow: max |Δ| {error.max()} mean |Δ| {error.mean():.3f} levels ({len(data)} bytes)")
        assert error.max() <= GPU_DECODE_MAX and error.mean() <= GPU_DECODE_MEAN


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("cuda_graphs,decode", [(None, "worker"), (False, "worker"), (None, "engine")])
def test_service_on_cuda_fp16_scores_like_the_cpu_reference(tiny, tmp_path, cuda_graphs, decode):
    from helpers.service import (
        OFFICE,
        classify,
        jpeg,
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
        config = service_settings(tmp_path, device="cuda", precision="fp16", cuda_graphs=cuda_graphs, decode=decode)
        async with serve(config) as client:
            for seed, task in enumerate(["clipart", "real"]):
                data = jpeg(seed, (300, 200))
                got = scores(await classify(client, task, data))
                expected = reference_scores(tiny, office, task, data)
                assert max(abs(got[k] - expected[k]) for k in expected) <= 2e-2

    run(scenario())
