"""Prompt modules of every method behind one interface, and their multi-task composition.

A prompt module owns the learnable tensors for n prompt tokens and, when called, returns a
`Prompts` pair: text prompts [J_t, n, d_t] and visual prompts [J_v, n, d_v] (either may be
None when the method prompts one modality only). The encoders only ever see these tensors, so
no method needs a branch in the forward.

Methods (docs/method.md):
- `mmap`: r source prompts S_jk [n, d_s] and Kronecker factors K^t_jk [1, d_t/d_s], K^v_jk [1, d_v/d_s];
  T_j = Σ_k S_jk ⊗ K^t_jk, V_j = Σ_k S_jk ⊗ K^v_jk (coupling rank r, default 1 = the paper's S_j ⊗ K_j).
  Both modalities are generated from one set of sources.
- `maple`: deep text prompts; visual prompts = per-layer Linear(d_t -> d_v) of the text prompts.
- `coop`: text context at layer 0 only.
- `vpt`: deep visual prompts only.
- `independent`: deep text and deep visual prompts, unrelated.

Defaults (see `PromptConfig`): depth 9 (MaPLe's depth for 12-layer towers, clamped to the shallower
of the towers a method prompts), 2 tokens per group module and 2 per task module (a grouped task
sees 4), d_s = gcd(d_t, d_v) (256 for ViT-B: the largest shared source, K^t is 1×2 and K^v 1×3).
For ViT-B-16 with 4 tasks in 2 groups this trains ~28k parameters, 0.019% of the backbone
(`python -m mmap_model.params`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor, nn

from .backbone import Widths, count_parameters


@dataclass(frozen=True)
class Prompts:
    """A task's prompts: text [J_t, m, d_t] and visual [J_v, m, d_v]; None = modality not prompted."""

    text: Tensor | None
    visual: Tensor | None

    @property
    def text_tokens(self) -> int:
        return 0 if self.text is None else self.text.shape[1]

    def cat(self, other: Prompts) -> Prompts:
        """Token-wise concatenation [self ; other] (group module then task module)."""
        return Prompts(_cat(self.text, other.text), _cat(self.visual, other.visual))


def _cat(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None or b is None:
        return b if a is None else a
    return torch.cat([a, b], dim=1)


KRON_INITS = ("ones", "normal")
TASK_INITS = ("random", "group")


@dataclass(frozen=True, kw_only=True)  # built by keyword only: a reordered field cannot shift values
class PromptConfig:
    """Hyper-parameters of a prompt set's modules (saved in promptset.json).

    One config serves every method, as in peft's config per method: a field that only some methods read
    (`PromptModule.settings`: MmAP's `source_dim`, `rank`, `kron_init`; `depth`, which CoOp does not read) is
    refused at a value other than its default for any other method.
    """

    # The metadata is the help of each field's command-line flag (training/cli.py).
    method: str = field(default="mmap", metadata={"help": "prompt module of every group and task"})
    # J: layers 0..J-1 receive prompts; clamped to the towers' depth by `resolve`
    depth: int = field(default=9, metadata={"help": "prompted layers J (clamped to the towers; not coop)"})
    group_tokens: int = field(default=2, metadata={"help": "tokens per group-shared module"})
    task_tokens: int = field(default=2, metadata={"help": "tokens per task-specific module"})
    # mmap's d_s; None = gcd(d_t, d_v), fixed by `resolve`
    source_dim: int | None = field(default=None, metadata={"help": "MmAP's d_s, a common divisor of d_t and d_v "
                                                                  "(default gcd(d_t, d_v))", "type": int})
    # mmap's coupling rank r: sources (and factor pairs) summed per layer; 1 = the paper's formulation
    rank: int = field(default=1, metadata={"help": "MmAP's coupling rank r (sum of r Kronecker products)"})
    kron_init: str = field(default="ones", metadata={
        "help": "MmAP's Kronecker factors at the start: ones (both prompts begin as the summed sources repeated, "
                "aligned) or normal (N(0, 1) entries)", "choices": list(KRON_INITS)})
    init_std: float = field(default=0.02, metadata={"help": "standard deviation of the prompts' initialisation"})
    task_init: str = field(default="random", metadata={
        "help": "task modules at the start: drawn like every module (random) or copies of their group's module "
                "(group; needs --group-tokens == --task-tokens)", "choices": list(TASK_INITS)})

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {sorted(METHODS)}")
        if self.depth < 1 or self.group_tokens < 0 or self.task_tokens < 0:
            raise ValueError("depth must be >= 1 and token counts >= 0")
        if self.source_dim is not None and self.source_dim < 1:
            raise ValueError("source_dim must be >= 1")
        if self.rank < 1:
            raise ValueError("rank must be >= 1")
        if self.kron_init not in KRON_INITS:
            raise ValueError(f"kron_init must be one of {KRON_INITS}, not {self.kron_init!r}")
        if self.task_init not in TASK_INITS:
            raise ValueError(f"task_init must be one of {TASK_INITS}, not {self.task_init!r}")
        for f in fields(self):
            users = methods_reading(f.name)
            if self.method not in users and getattr(self, f.name) != f.default:
                raise ValueError(f"{f.name} applies only to method{'s' if len(users) > 1 else ''} "
                                 f"{', '.join(users)}; {self.method} does not use it")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PromptConfig:
        """The config saved in a promptset.json. Fields its method does not read are dropped: sets written before
        they were refused may hold them (every method's resolved source_dim, CoOp's clamped depth), and they never
        shaped the weights."""
        if not isinstance(values, Mapping):
            raise TypeError(f"the method settings must be an object, not {type(values).__name__}")
        method = values.get("method", cls.method)
        unread = {name for name in values if method in METHODS and method not in methods_reading(name)}
        return cls(**{k: v for k, v in values.items() if k not in unread})

    def for_method(self, method: str) -> PromptConfig:
        """This config for another method: the fields `method` does not read go back to their defaults."""
        return replace(self, method=method, **{f.name: f.default for f in fields(self)
                                               if method not in methods_reading(f.name)})

    def resolve(self, widths: Widths) -> PromptConfig:
        """Fix the width- and depth-dependent values the method reads for a backbone."""
        reads = METHODS[self.method].settings
        fixed: dict[str, Any] = {}
        if "source_dim" in reads:
            d_s = fixed["source_dim"] = self.source_dim or math.gcd(widths.d_t, widths.d_v)
            if widths.d_t % d_s or widths.d_v % d_s:
                raise ValueError(f"source_dim {d_s} must divide d_t={widths.d_t} and d_v={widths.d_v}; "
                                 f"choose from {common_divisors(widths.d_t, widths.d_v)}")
        if "depth" in reads:
            layers = {"text": widths.layers_t, "visual": widths.layers_v}
            deepest = min(layers[m] for m in METHODS[self.method].modalities)  # a one-sided method: its own tower
            fixed["depth"] = min(self.depth, deepest)
        return replace(self, **fixed)

    def to_dict(self) -> dict:
        return asdict(self)


def common_divisors(a: int, b: int) -> list[int]:
    """The values d_s may take for widths a and b."""
    g = math.gcd(a, b)
    return [d for d in range(1, g + 1) if g % d == 0]


class PromptModule(nn.Module):
    """Learnable prompts for n tokens at the prompted layers; `forward()` -> Prompts.

    `no_weight_decay`: names of tensors an optimiser must not decay (multiplicative factors that start at
    one: decay would pull them, and with them the prompts they scale, toward zero).
    """

    no_weight_decay: frozenset[str] = frozenset()
    modalities: tuple[str, ...] = ("text", "visual")  # the towers it prompts (its depth is clamped to theirs)
    # The PromptConfig fields it reads besides those every method reads (method, token counts, init_std).
    settings: frozenset[str] = frozenset({"depth"})

    def __init__(self, cfg: PromptConfig, widths: Widths, n_tokens: int):
        super().__init__()
        self.n_tokens = n_tokens

    def forward(self) -> Prompts:  # pragma: no cover - interface
        raise NotImplementedError


def _normal(std: float, *shape: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape) * std)


class MmAPPrompt(PromptModule):
    """r source prompts per layer, projected to both modalities by Kronecker factors and summed.

    Stored as `source` [J, n, r * d_s] (source k in columns k*d_s .. (k+1)*d_s - 1) and `kron_text`
    [J, r, d_t/d_s], `kron_visual` [J, r, d_v/d_s]: at r = 1 exactly the tensors, initialisation and
    arithmetic of the rank-free formulation, so prompt sets written before `rank` load unchanged.
    """

    no_weight_decay = frozenset({"kron_text", "kron_visual"})
    settings = frozenset({"depth", "source_dim", "rank", "kron_init"})

    def __init__(self, cfg: PromptConfig, widths: Widths, n_tokens: int):
        super().__init__(cfg, widths, n_tokens)
        d_s, r = cfg.source_dim, cfg.rank
        # Each source's std is divided by sqrt(r): the initial prompts' scale does not depend on the rank.
        self.source = _normal(cfg.init_std / math.sqrt(r), cfg.depth, n_tokens, r * d_s)
        # "ones": both modalities begin as the summed sources repeated, aligned from step 0. "normal": N(0, 1)
        # factors, which keep the prompts' scale and start the r terms (and the two modalities) apart.
        make = torch.ones if cfg.kron_init == "ones" else torch.randn
        self.kron_text = nn.Parameter(make(cfg.depth, r, widths.d_t // d_s))
        self.kron_visual = nn.Parameter(make(cfg.depth, r, widths.d_v // d_s))

    @staticmethod
    def kron(source: Tensor, factor: Tensor) -> Tensor:
        """Σ_k S_k ⊗ K_k for S [J, n, r * d_s], K [J, r, q] -> [J, n, d_s * q], without forming I ⊗ K."""
        depth, n, _ = source.shape
        rank, q = factor.shape[1:]
        terms = source.view(depth, n, rank, -1, 1) * factor.view(depth, 1, rank, 1, q)  # [J, n, r, d_s, q]
        return terms.sum(dim=2).flatten(-2)

    def forward(self) -> Prompts:
        return Prompts(self.kron(self.source, self.kron_text), self.kron(self.source, self.kron_visual))


class MaPLePrompt(PromptModule):
    """Deep text prompts; visual prompts are a per-layer linear map of them (MaPLe's coupling)."""

    def __init__(self, cfg: PromptConfig, widths: Widths, n_tokens: int):
        super().__init__(cfg, widths, n_tokens)
        self.text = _normal(cfg.init_std, cfg.depth, n_tokens, widths.d_t)
        bound = 1 / math.sqrt(widths.d_t)  # nn.Linear's default initialisation
        self.proj_weight = nn.Parameter(torch.empty(cfg.depth, widths.d_t, widths.d_v).uniform_(-bound, bound))
        self.proj_bias = nn.Parameter(torch.empty(cfg.depth, 1, widths.d_v).uniform_(-bound, bound))

    def forward(self) -> Prompts:
        return Prompts(self.text, torch.bmm(self.text, self.proj_weight) + self.proj_bias)


class CoOpPrompt(PromptModule):
    """Learnable text context at the input layer only."""

    modalities = ("text",)
    settings = frozenset()  # one layer of context: no depth

    def __init__(self, cfg: PromptConfig, widths: Widths, n_tokens: int):
        super().__init__(cfg, widths, n_tokens)
        self.text = _normal(cfg.init_std, 1, n_tokens, widths.d_t)

    def forward(self) -> Prompts:
        return Prompts(self.text, None)


class VPTPrompt(PromptModule):
    """Deep visual prompts only (VPT-deep)."""

    modalities = ("visual",)

    def __init__(self, cfg: PromptConfig, widths: Widths, n_tokens: int):
        super().__init__(cfg, widths, n_tokens)
        self.visual = _normal(cfg.init_std, cfg.depth, n_tokens, widths.d_v)

    def forward(self) -> Prompts:
        return Prompts(None, self.visual)


class IndependentPrompt(PromptModule):
    """Deep text and deep visual prompts with no coupling between them."""

    def __init__(self, cfg: PromptConfig, widths: Widths, n_tokens: int):
        super().__init__(cfg, widths, n_tokens)
        self.text = _normal(cfg.init_std, cfg.depth, n_tokens, widths.d_t)
        self.visual = _normal(cfg.init_std, cfg.depth, n_tokens, widths.d_v)

    def forward(self) -> Prompts:
        return Prompts(self.text, self.visual)


METHODS: dict[str, type[PromptModule]] = {
    "mmap": MmAPPrompt,
    "maple": MaPLePrompt,
    "coop": CoOpPrompt,
    "vpt": VPTPrompt,
    "independent": IndependentPrompt,
}
_SPECIFIC = frozenset().union(*(m.settings for m in METHODS.values()))


def methods_reading(name: str) -> list[str]:
    """The methods that read PromptConfig field `name` (every method for a field no method lists as its own)."""
    return sorted(m for m, module in METHODS.items() if name not in _SPECIFIC or name in module.settings)


class MultiTaskPrompts(nn.Module):
    """Group-shared modules plus task-specific modules; a task's prompts are [group ; task].

    groups: {group: [tasks]} (disjoint); tasks outside every group use their task module only.
    task_modules=False gives the "-MT" baselines (one shared module per group, nothing per task).
    State-dict names are `group.<g>.<tensor>` and `task.<t>.<tensor>`, the prompt-set file's names.
    """

    def __init__(self, cfg: PromptConfig, widths: Widths, tasks: list[str],
                 groups: dict[str, list[str]] | None = None, task_modules: bool = True):
        super().__init__()
        groups = groups or {}
        for name in [*tasks, *groups]:
            check_name(name)
        self.cfg = cfg = cfg.resolve(widths)
        self.tasks = list(tasks)
        self.task_group = _task_to_group(self.tasks, groups)
        if not task_modules and (len(self.task_group) < len(self.tasks) or cfg.group_tokens == 0):
            raise ValueError("without task modules every task needs a group with group_tokens > 0")
        if task_modules and cfg.task_tokens == 0:
            raise ValueError("task modules need task_tokens > 0")
        make = METHODS[cfg.method]
        self.group = nn.ModuleDict({g: make(cfg, widths, cfg.group_tokens) for g in groups})
        self.task = nn.ModuleDict({t: make(cfg, widths, cfg.task_tokens) for t in self.tasks} if task_modules else {})
        if cfg.task_init == "group":  # a warm start: each task module begins as its group's module
            if cfg.group_tokens != cfg.task_tokens:
                raise ValueError("task_init 'group' copies the group module: group_tokens must equal task_tokens")
            for t, g in self.task_group.items():
                if t in self.task:
                    self.task[t].load_state_dict(self.group[g].state_dict())

    @property
    def groups(self) -> dict[str, list[str]]:
        return {g: [t for t in self.tasks if self.task_group.get(t) == g] for g in self.group}

    def forward(self, task: str) -> Prompts:
        if task not in self.tasks:
            raise KeyError(f"unknown task {task!r}; known: {self.tasks}")
        prompts = Prompts(None, None)
        if task in self.task_group:
            prompts = prompts.cat(self.group[self.task_group[task]]())
        if task in self.task:
            prompts = prompts.cat(self.task[task]())
        return prompts

    def trainable_parameters(self) -> int:
        return count_parameters(self, trainable_only=True)


NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def check_name(name: str) -> str:
    """Task, group and prompt-set names: letters, digits, '_' and '-' (safe as paths and tensor names)."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"invalid name {name!r}: use 1-64 letters, digits, '_' or '-', "
                         "starting with a letter or digit")
    return name


def _task_to_group(tasks: list[str], groups: dict[str, list[str]]) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for g, members in groups.items():
        if not members:  # its module would count as trainable but never receive a gradient
            raise ValueError(f"group {g!r} has no task")
        for t in members:
            if t not in tasks:
                raise ValueError(f"group {g!r} names unknown task {t!r}")
            if t in mapping:
                raise ValueError(f"task {t!r} is in groups {mapping[t]!r} and {g!r}; groups must be disjoint")
            mapping[t] = g
    return mapping
