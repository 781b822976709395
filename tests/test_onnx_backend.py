"""The onnx backend: exported prompted image tower == torch, graph metadata and refusals, cache, CLI."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install -e '.[onnx]'")
import onnx  # noqa: E402

from mmap_model import Backbone, load_backbone  # noqa: E402
from service.engine.backends import TorchImageTower, make_image_tower  # noqa: E402
from service.engine.onnx.backend import OnnxImageTower  # noqa: E402
from service.engine.onnx.export import OnnxGraphError, cache_name, export_image_tower, graph_info, main  # noqa: E402
from service.settings import Settings  # noqa: E402

TOLERANCE = 1e-4


def inputs(backbone: Backbone, batch: int, depth: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and per-sample prompts, each row different (as in a batch that mixes tasks)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, backbone.image_size, backbone.image_size, generator=generator)
    prompts = torch.randn(batch, depth, tokens, backbone.widths.d_v, generator=generator) * 0.5
    return images, prompts


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
    return (a - b).abs().max().item()


def test_tiny_scores_equal_torch_for_every_signature_and_batch(tiny, tmp_path):
    reference, tower = TorchImageTower(tiny), OnnxImageTower(tiny, cache_dir=tmp_path)
    for depth, tokens in [(3, 4), (1, 2)]:
        for batch in (1, 5):  # both differ from the traced batch of 2: the batch axis is dynamic
            images, prompts = inputs(tiny, batch, depth, tokens, seed=batch)
            features = tower(images, prompts)
            assert max_diff(features, reference(images, prompts)) <= TOLERANCE
            assert torch.allclose(features.norm(dim=-1), torch.ones(batch), atol=1e-5)  # normalised
            assert max_diff(tower(images, None), reference(images, None)) <= TOLERANCE
    # prompts change the answer (the graph really takes them as an input), and mixing rows is per sample
    images, prompts = inputs(tiny, 2, 3, 4, seed=7)
    mixed = tower(images, prompts)
    assert max_diff(mixed, tower(images, None)) > 1e-3
    assert max_diff(mixed[1:], tower(images[1:], prompts[1:])) <= TOLERANCE
    assert tower.signatures == [(0, 0), (1, 2), (3, 4)]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 3 and all(n.startswith(tiny.fingerprint[:24]) for n in names), names


@pytest.mark.slow
def test_vitb32_scores_equal_torch(vitb32, tmp_path):
    graph = tmp_path / "vitb32.onnx"
    info = export_image_tower(vitb32, graph, depth=9, tokens=4)
    assert (info.height, info.width, info.d_v, info.embed_dim) == (224, 224, 768, 512)
    tower = OnnxImageTower(vitb32, model_path=graph)  # no cache: the given graph alone
    images, prompts = inputs(vitb32, 3, 9, 4, seed=0)
    prompts = prompts * 0.04  # the scale of trained ViT-B prompts (init std 0.02)
    assert max_diff(tower(images, prompts), TorchImageTower(vitb32)(images, prompts)) <= TOLERANCE
    with pytest.raises(OnnxGraphError, match="no onnx graph for J=0, m=0 and no cache"):
        tower(images, None)


def test_cached_graph_is_reused_not_exported_again(tiny, tmp_path):
    images, prompts = inputs(tiny, 3, 2, 2, seed=0)
    first = OnnxImageTower(tiny, cache_dir=tmp_path)(images, prompts)
    (graph,) = tmp_path.iterdir()
    stamp = graph.stat().st_mtime_ns
    again = OnnxImageTower(tiny, cache_dir=tmp_path)(images, prompts)
    assert [p.name for p in tmp_path.iterdir()] == [graph.name] and graph.stat().st_mtime_ns == stamp
    assert torch.equal(first, again)


def test_graph_of_another_backbone_is_refused(tiny, tmp_path):
    graph = tmp_path / "tiny.onnx"
    export_image_tower(tiny, graph, depth=3, tokens=4)
    meta = {p.key: p.value for p in onnx.load(graph).metadata_props}
    assert meta["mmap.fingerprint"] == tiny.fingerprint and (meta["mmap.depth"], meta["mmap.tokens"]) == ("3", "4")
    assert OnnxImageTower(tiny, model_path=graph).signatures == [(3, 4)]
    other = load_backbone("mmap-tiny", None, seed=1)
    with pytest.raises(OnnxGraphError, match="exported from another backbone"):
        OnnxImageTower(other, model_path=graph)
    # a cache entry is checked the same way: a file put under the other backbone's cache name is refused
    cache = tmp_path / "cache"
    cache.mkdir()
    graph.rename(cache / cache_name(graph_info(other, 3, 4)))
    images, prompts = inputs(other, 1, 3, 4, seed=0)
    with pytest.raises(OnnxGraphError, match="exported from another backbone"):
        OnnxImageTower(other, cache_dir=cache)(images, prompts)


def test_foreign_onnx_file_is_refused(tiny, tmp_path):
    graph = tmp_path / "plain.onnx"
    export_image_tower(tiny, graph, depth=1, tokens=1)
    model = onnx.load(graph)
    del model.metadata_props[:]
    onnx.save(model, graph)
    with pytest.raises(OnnxGraphError, match="not an mmap-serve image-tower graph"):
        OnnxImageTower(tiny, model_path=graph)
    with pytest.raises(OnnxGraphError, match="no such onnx graph"):
        OnnxImageTower(tiny, model_path=tmp_path / "missing.onnx")


def test_precisions_the_cpu_cannot_run_are_refused_with_the_reason(tiny):
    half = load_backbone("mmap-tiny", None, precision="fp16")
    with pytest.raises(OnnxGraphError, match="fp16 graphs need onnxruntime's CUDA execution provider"):
        OnnxImageTower(half)
    with pytest.raises(OnnxGraphError, match="fp32 or fp16 graphs"):
        OnnxImageTower(load_backbone("mmap-tiny", None, precision="bf16"))
    with pytest.raises(OnnxGraphError, match="both be 0"):
        export_image_tower(tiny, "unused.onnx", depth=2, tokens=0)


def test_export_cli_writes_a_graph_the_backend_serves(tiny, tmp_path, capsys):
    graph = tmp_path / "out" / "tiny-J2-m2.onnx"
    # random:0 = the `tiny` fixture's weights (seed 0), loaded by the service's own rules
    main(["--out", str(graph), "--model", "mmap-tiny", "--pretrained", "random:0", "--prompt-tokens", "2",
          "--depth", "2"])
    report = json.loads(capsys.readouterr().out)
    assert report["fingerprint"] == tiny.fingerprint and (report["depth"], report["tokens"]) == (2, 2)
    assert report["bytes"] == graph.stat().st_size and report["exporter"] == "torchscript"
    settings = Settings(backend="onnx", onnx_model=graph, onnx_cache=tmp_path / "cache")
    tower = make_image_tower("onnx", tiny, settings)
    images, prompts = inputs(tiny, 4, 2, 2, seed=3)
    assert max_diff(tower(images, prompts), TorchImageTower(tiny)(images, prompts)) <= TOLERANCE
    assert not (tmp_path / "cache").exists()  # the given graph served: nothing exported

    unprompted = tmp_path / "unprompted.onnx"
    main(["--out", str(unprompted), "--model", "mmap-tiny", "--pretrained", "random:0", "--prompt-tokens", "0"])
    assert json.loads(capsys.readouterr().out)["depth"] == 0
    assert [i.name for i in onnx.load(unprompted).graph.input] == ["images"]
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x.onnx"), "--model", "mmap-tiny", "--pretrained", "random:0", "--depth", "9"])
    assert "exceeds the image tower's 3 layers" in capsys.readouterr().err


@pytest.mark.slow
def test_dynamo_exporter_gives_the_same_scores(tiny, tmp_path):
    pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript (the onnx extra)")
    graph = tmp_path / "dynamo.onnx"
    assert export_image_tower(tiny, graph, depth=2, tokens=3, dynamo=True).exporter == "dynamo"
    images, prompts = inputs(tiny, 5, 2, 3, seed=5)
    tower = OnnxImageTower(tiny, model_path=graph)
    assert max_diff(tower(images, prompts), TorchImageTower(tiny)(images, prompts)) <= TOLERANCE
