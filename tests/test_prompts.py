"""Prompt modules: the Kronecker structure, documented shapes, composition, accounting."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch

from mmap_model import METHODS, MultiTaskPrompts, PromptConfig, PromptSet, TaskSpec, Widths
from mmap_model.prompts import MmAPPrompt, check_name


def test_mmap_prompts_are_kronecker_products(tiny):
    module = MmAPPrompt(PromptConfig().resolve(tiny.widths), tiny.widths, n_tokens=3)
    with torch.no_grad():
        module.kron_text.normal_()
        module.kron_visual.normal_()
    p = module()
    for j in range(module.source.shape[0]):
        assert torch.equal(p.text[j], torch.kron(module.source[j], module.kron_text[j]))
        assert torch.equal(p.visual[j], torch.kron(module.source[j], module.kron_visual[j]))


# method -> (text shape, visual shape) for m tokens, depth J, widths (d_t, d_v); None = not prompted
EXPECTED = {
    "mmap": lambda J, m, dt, dv: ((J, m, dt), (J, m, dv)),
    "maple": lambda J, m, dt, dv: ((J, m, dt), (J, m, dv)),
    "independent": lambda J, m, dt, dv: ((J, m, dt), (J, m, dv)),
    "coop": lambda J, m, dt, dv: ((1, m, dt), None),
    "vpt": lambda J, m, dt, dv: (None, (J, m, dv)),
}


def _shape(t):
    return None if t is None else tuple(t.shape)


def _config_widths(model: str) -> Widths:
    """A model's widths from open_clip's own config: nothing is built (ViT-B-16 would cost ~150 M parameters)."""
    cfg = open_clip.get_model_config(model)
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    return Widths(d_t=text["width"], d_v=vision["width"], embed_dim=cfg["embed_dim"], layers_t=text["layers"],
                  layers_v=vision["layers"])


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("model", ["mmap-tiny", "ViT-B-16"])
def test_documented_shapes(method, model, tiny):
    widths = tiny.widths if model == "mmap-tiny" else _config_widths(model)
    cfg = PromptConfig(method=method)
    prompts = MultiTaskPrompts(cfg, widths, ["a", "b", "c"], {"g": ["a", "b"]})
    J = min(cfg.depth, widths.layers_t, widths.layers_v)
    grouped, alone = prompts("a"), prompts("c")
    m = cfg.group_tokens + cfg.task_tokens
    assert (_shape(grouped.text), _shape(grouped.visual)) == EXPECTED[method](J, m, widths.d_t, widths.d_v)
    assert (_shape(alone.text), _shape(alone.visual)) == EXPECTED[method](J, cfg.task_tokens, widths.d_t, widths.d_v)


def test_group_module_is_shared_and_task_module_is_not(tiny):
    prompts = MultiTaskPrompts(PromptConfig(), tiny.widths, ["a", "b"], {"g": ["a", "b"]})
    a, b = prompts("a"), prompts("b")
    n = prompts.cfg.group_tokens
    assert torch.equal(a.visual[:, :n], b.visual[:, :n])
    assert not torch.equal(a.visual[:, n:], b.visual[:, n:])


def test_multitask_layouts_and_errors(tiny):
    cfg = PromptConfig()
    shared_only = MultiTaskPrompts(cfg, tiny.widths, ["a", "b"], {"all": ["a", "b"]}, task_modules=False)
    assert torch.equal(shared_only("a").visual, shared_only("b").visual)
    with pytest.raises(ValueError, match="disjoint"):
        MultiTaskPrompts(cfg, tiny.widths, ["a", "b"], {"g1": ["a"], "g2": ["a", "b"]})
    with pytest.raises(ValueError, match="unknown task"):
        MultiTaskPrompts(cfg, tiny.widths, ["a"], {"g": ["zz"]})
    with pytest.raises(ValueError, match="needs a group"):
        MultiTaskPrompts(cfg, tiny.widths, ["a", "b"], {"g": ["a"]}, task_modules=False)
    with pytest.raises(ValueError, match="unknown method"):
        PromptConfig(method="nope")
    with pytest.raises(ValueError, match="must divide"):
        PromptConfig(source_dim=48).resolve(tiny.widths)
    for bad in ["../x", "a.b", "", "a/b", "x" * 65, "office\n"]:
        with pytest.raises(ValueError, match="invalid name"):
            check_name(bad)


def test_trainable_parameter_accounting(tiny):
    cfg = PromptConfig().resolve(tiny.widths)
    prompts = MultiTaskPrompts(cfg, tiny.widths, ["a", "b", "c"], {"g": ["a", "b"]})
    d_s = cfg.source_dim
    per_module = lambda n: cfg.depth * (n * d_s + tiny.widths.d_t // d_s + tiny.widths.d_v // d_s)  # noqa: E731
    assert prompts.trainable_parameters() == per_module(cfg.group_tokens) + 3 * per_module(cfg.task_tokens)


def test_params_cli_reports_paper_scale_ratio():
    out = subprocess.run([sys.executable, "-m", "mmap_model.params", "--model", "ViT-B-16", "--method", "mmap",
                          "--tasks", "4", "--groups", "2", "--json"], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert result["backbone_params"] > 140_000_000  # ViT-B-16 is ~150M
    assert result["trainable_params"] > 0 and result["ratio"] == result["trainable_params"] / result["backbone_params"]
    assert result["ratio"] <= 0.001


def test_one_sided_methods_are_clamped_to_their_own_tower_only():
    """A 4-layer text tower must not cap VPT, which prompts only a 12-layer image tower."""
    widths = Widths(d_t=64, d_v=96, embed_dim=32, layers_t=4, layers_v=12)
    assert PromptConfig(method="vpt", depth=9).resolve(widths).depth == 9
    assert PromptConfig(method="vpt", depth=20).resolve(widths).depth == 12
    for method in ("mmap", "maple", "independent"):
        assert PromptConfig(method=method, depth=9).resolve(widths).depth == 4
    coop = PromptConfig(method="coop").resolve(widths)  # one layer of context: it has no depth to clamp
    assert coop == PromptConfig(method="coop") and coop.source_dim is None


# The fields only some methods read, and a value other than the default for each.
SPECIFIC = {"depth": 3, "source_dim": 16, "rank": 3, "kron_init": "normal"}
READS = {"mmap": {"depth", "source_dim", "rank", "kron_init"}, "maple": {"depth"}, "vpt": {"depth"},
         "independent": {"depth"}, "coop": set()}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_field_the_method_does_not_read_is_refused(method):
    """One config for every method, checked per method (like peft's config per method): `--method maple --rank 3`
    is a mistake, not a silently ignored setting."""
    assert set(READS) == set(METHODS)
    PromptConfig(method=method, **{f: SPECIFIC[f] for f in READS[method]})  # what it reads is accepted
    PromptConfig(method=method, depth=9, source_dim=None, rank=1, kron_init="ones")  # defaults always are
    for name in sorted(set(SPECIFIC) - READS[method]):
        users = sorted(m for m, fields in READS.items() if name in fields)
        with pytest.raises(ValueError) as refused:
            PromptConfig(method=method, **{name: SPECIFIC[name]})
        assert str(refused.value) == (f"{name} applies only to method{'s' if len(users) > 1 else ''} "
                                      f"{', '.join(users)}; {method} does not use it")


def test_the_message_names_the_field_and_both_methods():
    with pytest.raises(ValueError, match="^rank applies only to method mmap; maple does not use it$"):
        PromptConfig(method="maple", rank=3)


def test_switching_method_drops_what_the_new_method_does_not_read():
    cfg = PromptConfig(rank=3, source_dim=16, kron_init="normal", depth=4, group_tokens=5, init_std=0.1)
    assert cfg.for_method("maple") == PromptConfig(method="maple", depth=4, group_tokens=5, init_std=0.1)
    assert cfg.for_method("coop") == PromptConfig(method="coop", group_tokens=5, init_std=0.1)
    assert cfg.for_method("mmap") == cfg


@pytest.mark.parametrize("method", sorted(METHODS))
def test_prompt_sets_saved_with_settings_their_method_ignores_still_load(method, tiny, tmp_path):
    """Sets written before the check recorded every method's resolved source_dim, CoOp's clamped depth, and any
    MmAP field passed with another method: they load, with the same weights, and those fields at their defaults."""
    ps = PromptSet.create("legacy", tiny, PromptConfig(method=method), {"a": TaskSpec(["cat", "dog"])})
    path = ps.save(tmp_path / "legacy")
    meta = json.loads((path / "promptset.json").read_text())
    legacy = {"depth": min(9, tiny.widths.layers_t), "source_dim": math.gcd(tiny.widths.d_t, tiny.widths.d_v),
              "rank": 2, "kron_init": "normal"}
    unread = {k: v for k, v in legacy.items() if k not in READS[method]}
    meta["method"] |= unread
    (path / "promptset.json").write_text(json.dumps(meta))
    loaded = PromptSet.load(path, tiny)
    assert loaded.prompts.cfg == ps.prompts.cfg and all(getattr(loaded.prompts.cfg, k) != v for k, v in unread.items())
    for key, value in ps.prompts.state_dict().items():
        assert torch.equal(loaded.prompts.state_dict()[key], value)


def test_every_committed_prompt_set_loads(embedded):
    """The demo sets shipped with the embedded model (all the promptset.json files in the repository)."""
    root = Path(__file__).resolve().parent.parent
    found = sorted(p.parent for d in ("mmap_model", "tests") for p in (root / d).rglob("promptset.json"))
    assert found
    for directory in found:
        assert PromptSet.load(directory, embedded).tasks


def test_a_group_without_tasks_is_refused(tiny):
    """Its module would be counted as trainable and saved, but never trained."""
    with pytest.raises(ValueError, match="group 'empty' has no task"):
        MultiTaskPrompts(PromptConfig(), tiny.widths, ["a", "b"], {"ab": ["a", "b"], "empty": []})


@pytest.mark.parametrize("method", ["mmap", "independent"])
def test_task_init_group_starts_each_task_module_as_its_group_module(tiny, method):
    """`--task-init group` (a warm start): a grouped task's module begins as a copy of its group's module, an
    ungrouped task's as drawn; the draws themselves are those of the default, so "random" is unchanged."""
    torch.manual_seed(0)
    plain = MultiTaskPrompts(PromptConfig(method=method), tiny.widths, ["a", "b", "c"], {"g": ["a", "b"]}).state_dict()
    torch.manual_seed(0)
    warm = MultiTaskPrompts(PromptConfig(method=method, task_init="group"), tiny.widths, ["a", "b", "c"],
                            {"g": ["a", "b"]}).state_dict()
    for name, tensor in warm.items():
        kind, owner, field = name.split(".")
        expected = plain[f"group.g.{field}"] if kind == "task" and owner in ("a", "b") else plain[name]
        assert torch.equal(tensor, expected), name
    with pytest.raises(ValueError, match="group_tokens must equal task_tokens"):
        MultiTaskPrompts(PromptConfig(task_init="group", task_tokens=4), tiny.widths, ["a"], {"g": ["a"]})
    with pytest.raises(ValueError, match="task_init must be one of"):
        PromptConfig(task_init="zeros")
