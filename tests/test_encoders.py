"""The prompted forward: exact without prompts, per-sample prompts, truncation, gradients, precision."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from mmap_model import (
    ClassTexts,
    MultiTaskPrompts,
    PromptConfig,
    PromptedCLIP,
    class_text_features,
    encoders,
    load_backbone,
    many_class_text_features,
    prompt_texts,
)
from mmap_model.tokens import PLAIN, tokenize

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
                assert (txt - ref_txt).abs().max() <= 1e-5  # the last block at EOT only: float32 rounding
    finally:
        model.eval()


@pytest.mark.parametrize("name", ["tiny", "vitb32"])
def test_eot_truncation_matches_full_context(request, name):
    backbone = request.getfixturevalue(name)
    prompted = PromptedCLIP(backbone.model)
    prompts = torch.randn(3, 4, backbone.widths.d_t) * 0.02
    placeholders = backbone.tokenizer(prompt_texts(["dog", "traffic light on a table", "cat"], "a photo of a {}.", 4))
    with torch.no_grad():
        for p, tokens in ((None, backbone.tokenizer(TEXTS)), (prompts, placeholders)):
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
        batched = prompted.encode_image(images, prompts, per_sample=True)
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
    text = prompted.encode_text(backbone.tokenizer(prompt_texts(classes, "a {}.", p.text_tokens)), p.text,
                                normalize=True)
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
    backbone = load_backbone("mmap-tiny", None, precision="bf16", seed=0)
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


@pytest.mark.parametrize("name", ["tiny", "vitb32"])
@pytest.mark.parametrize("longest", [8, 60])  # words in the longest class name: explicit products / torch's kernel
def test_the_text_blocks_computed_in_place_of_open_clips_give_what_they_give(request, name, longest, monkeypatch):
    """Rows of different lengths, each with its own prompts: `_text_block` (attention as explicit products on the
    CPU for short rows, torch's kernel for long ones; the last block at each row's EOT only) agrees with
    open_clip's blocks, which are what runs where `_plain_block` says no."""
    backbone = request.getfixturevalue(name)
    prompted = PromptedCLIP(backbone.model)
    classes = ["dog", "traffic light on a table", "cat", " ".join(["word"] * longest)]
    tokens = backbone.tokenizer(prompt_texts(classes, "a photo of a {}.", 4))
    assert (int(tokens.argmax(-1).max()) + 1 > encoders.EXPLICIT_ATTENTION_MAX_LENGTH) == (longest > 30)
    prompts = torch.randn(len(classes), 3, 4, backbone.widths.d_t) * 0.02
    transformer = backbone.model.transformer
    assert all(encoders._plain_block(transformer, block) for block in transformer.resblocks)  # ours runs first
    with torch.no_grad():
        ours = prompted.encode_text(tokens, prompts, per_row=True)
        monkeypatch.setattr(encoders, "_plain_block", lambda *_: False)
        theirs = prompted.encode_text(tokens, prompts, per_row=True)
    assert (ours - theirs).abs().max() <= 1e-5


def test_the_text_tower_follows_the_model_to_another_dtype():
    """Buffers are read at call time: after .to(float64) the causal mask is float64 too (it was a stale copy)."""
    model = copy.deepcopy(load_backbone("mmap-tiny", None, seed=0).model)
    prompted = PromptedCLIP(model).to(torch.float64)
    tokens = load_backbone("mmap-tiny", None).tokenizer(TEXTS[:2])
    ours = prompted.encode_text(tokens, truncate=False)
    assert ours.dtype == torch.float64
    assert (ours - model.encode_text(tokens)).abs().max() <= 1e-10


def test_text_prompts_refuse_tokens_without_placeholders(tiny, tiny_prompted):
    prompts = torch.zeros(2, 2, tiny.widths.d_t)
    good = tiny.tokenizer(prompt_texts(["cat", "dog"], "a {}.", 2))
    tiny_prompted.encode_text(good, prompts)  # placeholders at 1..2: fine
    no_start = torch.cat([good[:, 1:], good[:, :1] * 0], dim=1)  # a tokenizer without a start token
    with pytest.raises(ValueError, match="placeholder"):
        tiny_prompted.encode_text(no_start, prompts)
    too_few = tiny.tokenizer(prompt_texts(["cat", "dog"], "a {}.", 1))  # 2 prompt tokens, 1 placeholder
    with pytest.raises(ValueError, match="placeholder"):
        tiny_prompted.encode_text(too_few, prompts)
    with pytest.raises(ValueError, match="placeholder"):  # the tokenizer's own placeholder id, not just agreement
        tiny_prompted.encode_text(good, prompts, placeholder=int(good[0, 1]) + 1)


def test_truncation_is_off_without_a_causal_mask():
    """Positions after EOT influence EOT when nothing masks them: truncating then would change the result."""
    backbone = load_backbone("mmap-tiny", None, seed=0)
    model = copy.deepcopy(backbone.model)
    model.attn_mask = None  # a bidirectional text tower
    tokens = backbone.tokenizer(TEXTS[:2])
    prompted = PromptedCLIP(model)
    assert (prompted.encode_text(tokens) - model.encode_text(tokens)).abs().max() <= 1e-6


def test_grad_checkpointing_is_honoured(tiny):
    """model.set_grad_checkpointing(): every block starts again in the backward pass (a pre-hook: the recompute
    stops early, once it has what the backward needs); the gradients are the same. (Without it the text blocks'
    own forwards are not called: `_text_block` computes them.)"""
    torch.manual_seed(0)
    model = copy.deepcopy(tiny.model)
    prompted = PromptedCLIP(model)
    calls = []
    for block in [*model.visual.transformer.resblocks, *model.transformer.resblocks]:
        block.register_forward_pre_hook(lambda *_: calls.append(1))
    images, tokens = _images(tiny, 2), tiny.tokenizer(prompt_texts(["cat", "dog"], "a {}.", 2))

    def grads() -> tuple[torch.Tensor, torch.Tensor, int]:
        calls.clear()
        visual = torch.full((2, 2, tiny.widths.d_v), 0.01, requires_grad=True)
        text = torch.full((2, 2, tiny.widths.d_t), 0.01, requires_grad=True)
        loss = prompted.encode_image(images, visual).sum() + prompted.encode_text(tokens, text).sum()
        loss.backward()
        return visual.grad, text.grad, len(calls)

    plain_v, plain_t, plain_calls = grads()
    model.set_grad_checkpointing(True)
    ckpt_v, ckpt_t, ckpt_calls = grads()
    visual = len(model.visual.transformer.resblocks)
    assert plain_calls == visual and ckpt_calls == 2 * (visual + len(model.transformer.resblocks))
    assert (plain_v - ckpt_v).abs().max() <= 1e-6
    assert (plain_t - ckpt_t).abs().max() <= 1e-6 * plain_t.abs().max()  # last block at EOT only: float32 rounding


def test_visual_prompt_shapes_are_explicit(tiny, tiny_prompted):
    """[B, m, d] meant per sample would read as B layers: per-sample prompts are 4-D and say so."""
    images = _images(tiny, 3)
    d_v = tiny.widths.d_v
    tiny_prompted.encode_image(images, torch.zeros(2, 4, d_v))  # shared, 2 layers
    tiny_prompted.encode_image(images, torch.zeros(3, 2, 4, d_v), per_sample=True)
    for prompts, per_sample in [(torch.zeros(3, 2, 4, d_v), False),  # per-sample tensor, not said
                                (torch.zeros(3, 4, d_v), True),  # one layer per sample, as 3-D
                                (torch.zeros(2, 2, 4, d_v), True),  # 2 prompt rows for 3 images
                                (torch.zeros(40, 4, d_v), False)]:  # more layers than the tower has
        with pytest.raises(ValueError, match="visual prompts"):
            tiny_prompted.encode_image(images, prompts, per_sample=per_sample)


def test_many_class_text_sets_in_shared_forwards_equal_one_forward_each(tiny, tiny_prompted):
    """Class texts of many tasks (different text prompts, templates, counts; one set without prompts, one that
    recurs) computed together, in forwards of a few rows each, equal each task's own forward."""
    torch.manual_seed(0)
    d_t = tiny.widths.d_t
    sets = [ClassTexts(["dog", "cat", "traffic light"], "a photo of a {}.", torch.randn(3, 4, d_t)),
            ClassTexts(["apple"], "a sketch of a {}.", torch.randn(3, 4, d_t)),
            ClassTexts(["dog", "cat"], "a photo of a {}.", torch.randn(2, 2, d_t)),
            ClassTexts(["boat", "car", "bus", "tram", "bike"], "a {} in the city.", None),
            ClassTexts(["dog", "cat", "traffic light"], "a photo of a {}.", torch.randn(3, 4, d_t))]
    with torch.no_grad():
        together = many_class_text_features(tiny_prompted, tiny.tokenizer, sets, max_rows=4)
        alone = [class_text_features(tiny_prompted, tiny.tokenizer, s.classnames, s.template, s.prompts)
                 for s in sets]
    assert [t.shape for t in together] == [a.shape for a in alone]
    assert max((t - a).abs().max().item() for t, a in zip(together, alone, strict=True)) <= 1e-5
    assert (together[0] - together[4]).abs().max() > 1e-3  # same texts, other prompts: the prompts are per row


def test_plain_ascii_texts_tokenize_as_open_clip_does(tiny):
    """The tokenizer's fast path for plain ASCII (no ftfy, no html.unescape) gives open_clip's tokens for texts
    that probe each step it keeps (case, runs of spaces, punctuation runs, digits, contractions, special-token
    text, truncation at the context length, a chunk recurring among others), and texts it must leave to the
    tokenizer give them too."""
    rng = random.Random(0)
    alphabet = "abcXYZ019 .,-'!?()<>/_:;\"`~@#$%^*+=[]{}|\\"
    texts = ["X X X X a photo of a Traffic  Light.", "  leading and trailing  ", "don't it's we're I'll",
             "<start_of_text> the <end_of_text>", "a 1x1000 strip...!!", "C-3PO & R2-D2", "café", "tab\there",
             "line\nbreak", "&amp; entity", "ｆｕｌｌ width", "word " * 100, "",
             "it 's a' s", "x <|endoftext|> y<|startoftext|>z", "dog dog. .dog dog"]  # chunks meeting a pattern
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 40))) for _ in range(300)]
    assert torch.equal(tokenize(tiny.tokenizer, texts), tiny.tokenizer(texts))
    assert sum(bool(PLAIN.fullmatch(t)) for t in texts) > 250  # the fast path was taken, not only the fallback
