"""The prompted forward: exact without prompts, per-sample prompts, truncation, gradients, precision."""

from __future__ import annotations

import copy

import pytest
import torch

from mmap_model import MultiTaskPrompts, PromptConfig, PromptedCLIP, load_backbone, prompt_texts

TEXTS = ["a photo of a dog.", "a sketch of a traffic light on a table.", "X X X X cat."]


def _images(backbone, n: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, backbone.image_size, backbone.image_size, generator=g)


@pytest.mark.parametrize("name", ["tiny", "vitb32"])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_zero_prompts_reproduce_open_clip(request, name, train, grad):
    backbone = request.getfixturevalue(name)
    model = backbone.model
    prompted = PromptedCLIP(model)
    images, tokens = _images(backbone, 2), backbone.tokenizer(TEXTS)
    model.train(train)
    try:
        with torch.set_grad_enabled(grad):
            ref_img, ref_txt = model.encode_image(images), model.encode_text(tokens)
            empty_v = torch.zeros(3, 0, backbone.widths.d_v)
            empty_t = torch.zeros(3, 0, backbone.widths.d_t)
            for visual, text in [(None, None), (empty_v, empty_t)]:
                img = prompted.encode_image(images, visual)
                txt = prompted.encode_text(tokens, text, truncate=False)
                assert (img - ref_img).abs().max() <= 1e-6
                assert (txt - ref_txt).abs().max() <= 1e-6
    finally:
        model.eval()


@pytest.mark.parametrize("name", ["tiny", "vitb32"])
def test_eot_truncation_matches_full_context(request, name):
    backbone = request.getfixturevalue(name)
    prompted = PromptedCLIP(backbone.model)
    tokens = backbone.tokenizer(TEXTS)
    prompts = torch.randn(3, 4, backbone.widths.d_t) * 0.02
    with torch.no_grad():
        for p in (None, prompts):
            full = prompted.encode_text(tokens, p, truncate=False)
            short = prompted.encode_text(tokens, p, truncate=True)
            assert (full - short).abs().max() <= 1e-5


def test_placeholders_sit_right_after_sos(tiny):
    tokens = tiny.tokenizer(prompt_texts(["traffic light"], "a photo of a {}.", 3))[0]
    x_id = tiny.tokenizer(["X"])[0][1]
    assert tokens[0] == 49406 and (tokens[1:4] == x_id).all() and tokens[4] != x_id


@pytest.mark.parametrize("name", ["tiny", "vitb32"])
def test_per_sample_visual_prompts_equal_separate_forwards(request, name):
    backbone = request.getfixturevalue(name)
    prompted = PromptedCLIP(backbone.model)
    images = _images(backbone, 3)
    prompts = torch.randn(3, 3, 4, backbone.widths.d_v) * 0.5  # [B, J, m, d_v], a different task per image
    with torch.no_grad():
        batched = prompted.encode_image(images, prompts)
        single = torch.cat([prompted.encode_image(images[i:i + 1], prompts[i]) for i in range(3)])
    assert (batched - single).abs().max() <= 1e-5
    assert not torch.allclose(batched[0], prompted.encode_image(images[:1])[0], atol=1e-3)  # prompts matter


def test_prompts_change_every_prompted_layer(tiny_prompted, tiny):
    """Replacing layer j's prompts changes the output for every j < J (the slots are really used)."""
    images = _images(tiny, 1)
    depth = tiny.widths.layers_v
    base = torch.randn(depth, 2, tiny.widths.d_v)
    with torch.no_grad():
        ref = tiny_prompted.encode_image(images, base)
        for j in range(depth):
            changed = base.clone()
            changed[j] += torch.randn_like(changed[j])
            assert not torch.allclose(tiny_prompted.encode_image(images, changed), ref, atol=1e-5), j


@pytest.mark.parametrize("method", ["mmap", "maple", "coop", "vpt", "independent"])
def test_only_prompt_parameters_train(tiny, method):
    backbone = load_backbone("mmap-tiny", None)  # a private copy: this test steps an optimiser
    prompted = PromptedCLIP(backbone.model)
    prompts = MultiTaskPrompts(PromptConfig(method=method), backbone.widths, ["a", "b"], {"g": ["a", "b"]})
    before = copy.deepcopy(backbone.model.state_dict())
    opt = torch.optim.AdamW(list(backbone.model.parameters()) + list(prompts.parameters()), lr=0.1)
    p = prompts("a")
    images, classes = _images(backbone, 2), ["dog", "cat"]
    text = prompted.encode_text(backbone.tokenizer(prompt_texts(classes, "a {}.", p.text_tokens)), p.text, normalize=True)
    logits = prompted.encode_image(images, p.visual, normalize=True) @ text.T * prompted.logit_scale
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    assert all(param.grad is None for param in backbone.model.parameters())
    used = [*prompts.group["g"].parameters(), *prompts.task["a"].parameters()]
    assert all(param.grad is not None and param.grad.abs().sum() > 0 for param in used)
    assert all(param.grad is None for param in prompts.task["b"].parameters())
    opt.step()
    after = backbone.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bf16_backbone_with_fp32_prompts():
    torch.manual_seed(0)
    backbone = load_backbone("mmap-tiny", None, precision="bf16")
    prompted = PromptedCLIP(backbone.model)
    prompts = MultiTaskPrompts(PromptConfig(), backbone.widths, ["a"])
    p = prompts("a")
    assert p.visual.dtype == torch.float32
    images = _images(backbone, 2).to(torch.bfloat16)
    img = prompted.encode_image(images, p.visual)
    txt = prompted.encode_text(backbone.tokenizer(prompt_texts(["dog"], "a {}.", p.text_tokens)), p.text)
    assert img.dtype == txt.dtype == torch.bfloat16
    assert torch.isfinite(img.float()).all() and torch.isfinite(txt.float()).all()
    (img.float().sum() + txt.float().sum()).backward()
    assert prompts.task["a"].source.grad is not None and prompts.task["a"].source.grad.dtype == torch.float32
