"""MmAP's coupling of rank r and selectable d_s (docs/method.md, "Coupling rank").

Rank 1 must be today's formulation bit for bit, and prompt sets written before `rank` existed
must load and score exactly as they did: `tests/data/demo_promptset_scores.json` holds the scores of
the demo sets of 2026-11 (kept in `tests/data/promptsets-2026-11`, so the shipped demo sets may be
remade) computed by the code before the change (regenerate only on purpose:
`python -m tests.test_prompt_rank`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmap_model import (
    EMBEDDED_MODEL,
    EMBEDDED_PRETRAINED,
    MultiTaskPrompts,
    PromptConfig,
    PromptedCLIP,
    PromptSet,
    TaskSpec,
    Widths,
    class_text_features,
    load_backbone,
)
from mmap_model.prompts import MmAPPrompt

SCORES = Path(__file__).parent / "data" / "demo_promptset_scores.json"
OLD_SETS = Path(__file__).parent / "data" / "promptsets-2026-11"  # the demo sets as shipped before `rank` existed
WIDTHS = Widths(d_t=64, d_v=96, embed_dim=64, layers_t=3, layers_v=3)


def demo_scores(backbone) -> dict[str, list[list[float]]]:
    """Cosine similarity of 4 seeded images to every class text, per demo set and task, under its prompts."""
    clip = PromptedCLIP(backbone.model).eval()
    images = torch.rand(4, 3, backbone.image_size, backbone.image_size, generator=torch.Generator().manual_seed(0))
    out = {}
    for directory in sorted(p.parent for p in OLD_SETS.glob("*/promptset.json")):
        promptset = PromptSet.load(directory, backbone)
        for task, spec in promptset.tasks.items():
            with torch.no_grad():
                prompts = promptset.prompts(task)
                text = class_text_features(clip, backbone.tokenizer, spec.classnames, spec.template, prompts.text)
                image = clip.encode_image(images, prompts.visual, normalize=True)
            out[f"{directory.name}/{task}"] = (image @ text.T).tolist()
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    SCORES.parent.mkdir(exist_ok=True)
    SCORES.write_text(json.dumps(demo_scores(load_backbone(EMBEDDED_MODEL, EMBEDDED_PRETRAINED))) + "\n")


def test_rank_one_is_the_rank_free_formulation_bit_for_bit():
    cfg = PromptConfig(depth=3, source_dim=32).resolve(WIDTHS)
    torch.manual_seed(7)
    module = MmAPPrompt(cfg, WIDTHS, n_tokens=2)
    torch.manual_seed(7)
    assert torch.equal(module.source, torch.randn(3, 2, 32) * 0.02)  # the old initialisation, draw for draw
    with torch.no_grad():  # factors away from one, so the product itself is compared
        module.kron_text.copy_(torch.randn(3, 1, 2))
        module.kron_visual.copy_(torch.randn(3, 1, 3))
    prompts = module()
    for got, factor in [(prompts.text, module.kron_text), (prompts.visual, module.kron_visual)]:
        expected = torch.stack([torch.kron(module.source[j], factor[j]) for j in range(3)])  # S_j ⊗ K_j, [n, d_s * q]
        assert torch.equal(got, expected)  # one product per entry either way: equal to the bit


def test_prompt_sets_written_before_rank_load_and_score_identically(embedded):
    meta = json.loads(next(OLD_SETS.glob("*/promptset.json")).read_text())
    assert "rank" not in meta["method"]  # the demo sets predate the field
    expected = json.loads(SCORES.read_text())
    got = demo_scores(embedded)
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(torch.tensor(got[key]), torch.tensor(expected[key]), rtol=0, atol=1e-6)


def test_rank_terms_are_summed():
    cfg = PromptConfig(depth=2, source_dim=16, rank=3).resolve(WIDTHS)
    module = MmAPPrompt(cfg, WIDTHS, n_tokens=4)
    with torch.no_grad():
        module.kron_text.normal_()
        module.kron_visual.normal_()
    sources = module.source.view(2, 4, 3, 16)
    for got, factor in [(module().text, module.kron_text), (module().visual, module.kron_visual)]:
        for j in range(2):
            expected = sum(torch.kron(sources[j, :, k], factor[j, k:k + 1]) for k in range(3))
            torch.testing.assert_close(got[j], expected)


@pytest.mark.parametrize("source_dim,rank", [(32, 3), (16, 6), (32, 4)])
def test_rank_of_at_least_dv_over_ds_fits_any_visual_prompt(source_dim, rank):
    """r >= d_v/d_s spans every [n, d_v] prompt: a fit to a random target reaches ~0 error."""
    torch.manual_seed(0)
    cfg = PromptConfig(depth=1, source_dim=source_dim, rank=rank).resolve(WIDTHS)
    module = MmAPPrompt(cfg, WIDTHS, n_tokens=2)
    target = torch.randn(1, 2, WIDTHS.d_v)
    assert _fit_visual(module, target) < 1e-6


def test_rank_below_dv_over_ds_cannot_fit_every_visual_prompt():
    torch.manual_seed(0)
    cfg = PromptConfig(depth=1, source_dim=32, rank=1).resolve(WIDTHS)
    target = torch.randn(1, 2, WIDTHS.d_v)
    assert _fit_visual(MmAPPrompt(cfg, WIDTHS, n_tokens=2), target) > 0.1  # a rank-1 [32 x 3] map per token


def _fit_visual(module: MmAPPrompt, target: torch.Tensor) -> float:
    """Relative squared error of the visual prompt after L-BFGS on the module's own parameters."""
    optimizer = torch.optim.LBFGS(module.parameters(), lr=1, max_iter=500, tolerance_grad=1e-12,
                                  tolerance_change=1e-14, history_size=50, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = (module().visual - target).pow(2).sum() / target.pow(2).sum()
        loss.backward()
        return loss

    for _ in range(5):
        optimizer.step(closure)
    with torch.no_grad():
        return float((module().visual - target).pow(2).sum() / target.pow(2).sum())


@pytest.mark.parametrize("source_dim,rank,group_tokens,task_tokens", [(32, 1, 2, 2), (32, 3, 4, 2), (16, 2, 8, 8)])
def test_parameter_count_matches_the_formula(source_dim, rank, group_tokens, task_tokens):
    """Per module and layer: n·r·d_s source entries + r·(d_t + d_v)/d_s factor entries."""
    cfg = PromptConfig(depth=3, source_dim=source_dim, rank=rank, group_tokens=group_tokens, task_tokens=task_tokens)
    tasks = ["a", "b", "c"]
    prompts = MultiTaskPrompts(cfg, WIDTHS, tasks, {"g": ["a", "b"]})

    def module(n: int) -> int:
        return 3 * (n * rank * source_dim + rank * (WIDTHS.d_t + WIDTHS.d_v) // source_dim)

    assert prompts.trainable_parameters() == module(group_tokens) + len(tasks) * module(task_tokens)


def test_source_dim_must_be_a_common_divisor():
    with pytest.raises(ValueError, match=r"choose from \[1, 2, 4, 8, 16, 32\]"):
        PromptConfig(source_dim=24).resolve(WIDTHS)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        PromptConfig(rank=0)


def test_rank_and_source_dim_round_trip_through_a_prompt_set(tiny, tmp_path):
    cfg = PromptConfig(depth=2, source_dim=16, rank=2)
    tasks = {"a": TaskSpec(["cat", "dog"], "a photo of a {}.", "g"),
             "b": TaskSpec(["x", "y"], "a sketch of a {}.", "g")}
    promptset = PromptSet.create("ranked", tiny, cfg, tasks)
    with torch.no_grad():
        for p in promptset.prompts.parameters():
            p.normal_()
    loaded = PromptSet.load(promptset.save(tmp_path / "ranked"), tiny)
    assert loaded.prompts.cfg.rank == 2 and loaded.prompts.cfg.source_dim == 16
    assert torch.equal(loaded.prompts("a").visual, promptset.prompts("a").visual)
    assert loaded.prompts.trainable_parameters() == promptset.prompts.trainable_parameters()


def test_normal_factor_init_starts_the_terms_apart_at_the_prompts_scale():
    torch.manual_seed(0)
    cfg = PromptConfig(depth=3, rank=3, task_tokens=64, kron_init="normal").resolve(WIDTHS)
    module = MmAPPrompt(cfg, WIDTHS, n_tokens=64)
    assert not torch.equal(module.kron_text[:, 0], module.kron_text[:, 1])  # at "ones" every term is alike
    with torch.no_grad():
        visual = module().visual
    assert 0.7 * cfg.init_std < float(visual.std()) < 1.3 * cfg.init_std
    with pytest.raises(ValueError, match="kron_init"):
        PromptConfig(kron_init="zeros")
