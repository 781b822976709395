"""The prompted image and text forward over open_clip's own sub-modules.

No fork and no hooks: the blocks of each tower are called one by one, and prompt slots are
written between them (MaPLe's deep-prompt semantics, docs/method.md):

- image: after `_embeds` (conv, class token, positional embedding, patch dropout, `ln_pre`) the
  m visual prompt tokens are inserted right after the class token. Inserting after `ln_pre`
  means every prompt, at layer 0 or deeper, lives in the residual stream that the blocks read.
  Before each block 0 < j < J the slots are replaced by layer j's prompts; after block J-1 they
  ride along; they are stripped before pooling.
- text: the m placeholder positions after SOS ("X X … <template>") take layer 0's prompts in
  place of their token embeddings (before the positional embedding is added) and are replaced
  before each block 0 < j < J. The causal mask is kept, and pooling uses the original ids.

With no prompts both reproduce open_clip's `encode_image` / `encode_text`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CustomTextCLIP
from open_clip.transformer import ResidualAttentionBlock, text_global_pool
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .tokens import tokenize

PLACEHOLDER = "X"
EXPLICIT_ATTENTION_MAX_LENGTH = 40  # text rows up to this long attend by explicit products on the CPU (_text_block)


@dataclass(frozen=True)
class _TextTower:
    """The text-side modules, wherever the CLIP class keeps them."""

    token_embedding: nn.Embedding
    positional_embedding: Tensor
    transformer: nn.Module
    ln_final: nn.Module
    projection: Tensor | nn.Linear | None
    attn_mask: Tensor | None
    pool_type: str
    eos_id: int | None

    @classmethod
    def of(cls, model: CLIP | CustomTextCLIP) -> _TextTower:
        if isinstance(model, CustomTextCLIP):
            t = model.text
            return cls(t.token_embedding, t.positional_embedding, t.transformer, t.ln_final,
                       t.text_projection, t.attn_mask, t.pool_type, getattr(t, "eos_id", None))
        return cls(model.token_embedding, model.positional_embedding, model.transformer, model.ln_final,
                   model.text_projection, model.attn_mask, model.text_pool_type, getattr(model, "text_eos_id", None))


def _batched(prompts: Tensor, batch: int) -> Tensor:
    """[m, d] (shared) or [B, m, d] (per sample) -> [B, m, d]."""
    return prompts.unsqueeze(0).expand(batch, -1, -1) if prompts.dim() == 2 else prompts


def _insert_slots(x: Tensor, prompts: Tensor, start: int) -> Tensor:
    """Insert m prompt tokens before position `start`."""
    return torch.cat([x[:, :start], _batched(prompts, x.shape[0]), x[:, start:]], dim=1)


def _replace_slots(x: Tensor, prompts: Tensor, start: int) -> Tensor:
    """x[:, start:start+m] := prompts, without in-place writes (autograd-safe)."""
    m = prompts.shape[-2]
    return torch.cat([x[:, :start], _batched(prompts, x.shape[0]), x[:, start + m:]], dim=1)


def _run_block(transformer: nn.Module, block: nn.Module, x: Tensor, mask: Tensor | None) -> Tensor:
    """One residual block; recomputed in the backward pass when the tower's grad checkpointing is on
    (`model.set_grad_checkpointing()`, as open_clip's own forward honours it)."""
    if getattr(transformer, "grad_checkpointing", False) and torch.is_grad_enabled():
        return checkpoint(block, x, attn_mask=mask, use_reentrant=False)
    return block(x, attn_mask=mask)


def _plain_block(transformer: nn.Module, block: nn.Module) -> bool:
    """open_clip's own self-attention block (torch's MultiheadAttention, batch first, packed projections, no
    attention dropout), run without grad checkpointing: `_text_block` computes what it computes."""
    attn = getattr(block, "attn", None)
    return (type(block) is ResidualAttentionBlock and not hasattr(block, "ln_1_kv")
            and isinstance(attn, nn.MultiheadAttention) and attn.batch_first and attn._qkv_same_embed_dim
            and attn.in_proj_bias is not None and attn.bias_k is None and not attn.add_zero_attn
            and (attn.dropout == 0 or not attn.training)
            and not (getattr(transformer, "grad_checkpointing", False) and torch.is_grad_enabled()))


def _text_block(block: nn.Module, x: Tensor, mask: Tensor, at: Tensor | None = None) -> Tensor:
    """`block(x, attn_mask=mask)` for a `_plain_block` of the causal text tower, [N, L, d].

    With `at` ([N], the position of each row that is pooled; the last block) only that position is computed,
    [N, 1, d]: under the causal mask it reads the other positions' keys and values, but nothing reads its
    output in the same block, so their queries, attention, output projection and MLP are skipped (the last
    block at about a third of its cost). On the CPU, for rows of at most EXPLICIT_ATTENTION_MAX_LENGTH tokens
    (class texts are ~10-30), the attention is written as its products, which at such lengths run faster than
    torch's fused CPU kernel with a mask (that kernel wins at 77 tokens, and runs elsewhere). The arithmetic is
    MultiheadAttention's; results agree to float rounding (tests/test_encoders.py)."""
    attn = block.attn
    n, length, d = x.shape
    heads = attn.num_heads
    h = block.ln_1(x)
    if at is None:
        q, k, v = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).view(n, length, 3, heads, -1).unbind(2)
        rows_mask = mask  # [L, L]
    else:
        rows = torch.arange(n, device=x.device)
        x, h_at = x[rows, at].unsqueeze(1), h[rows, at].unsqueeze(1)
        q = F.linear(h_at, attn.in_proj_weight[:d], attn.in_proj_bias[:d]).view(n, 1, heads, -1)
        k, v = F.linear(h, attn.in_proj_weight[d:], attn.in_proj_bias[d:]).view(n, length, 2, heads, -1).unbind(2)
        rows_mask = mask[at].view(n, 1, 1, length)  # each row's line of the causal mask, for every head
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [N, heads, L or 1, d / heads]
    rows_mask = rows_mask.to(q.dtype)
    if q.device.type == "cpu" and length <= EXPLICIT_ATTENTION_MAX_LENGTH:
        weights = torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2) + rows_mask, dim=-1)
        out = weights @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, rows_mask)
    out = attn.out_proj(out.transpose(1, 2).reshape(n, q.shape[2], d))
    y = x + block.ls_1(out)
    return y + block.ls_2(block.mlp(block.ln_2(y)))


def _check_visual_shape(prompts: Tensor, batch: int, per_sample: bool, layers: int) -> None:
    expected = ("[B, J, m, d_v] (per_sample=True)" if per_sample
                else "[J, m, d_v] (shared; per_sample=True for [B, ...])")
    if prompts.dim() != (4 if per_sample else 3) or (per_sample and prompts.shape[0] != batch):
        raise ValueError(f"visual prompts of shape {tuple(prompts.shape)} for {batch} images: expected {expected}")
    if prompts.shape[-3] > layers:
        raise ValueError(f"visual prompts for {prompts.shape[-3]} layers; the image tower has {layers}")


def _check_placeholders(tokens: Tensor, m: int, placeholder: int | None) -> None:
    """Positions 1..m of every row hold the placeholder token (one comparison, on the tokens' device)."""
    slots = tokens[:, 1:m + 1]
    expected = int(slots[0, 0]) if placeholder is None else placeholder
    if slots.shape[1] < m or not bool((slots == expected).all()):
        raise ValueError(f"text prompts replace token positions 1..{m}, which must hold the placeholder token "
                         f"{expected} in every row (a tokenizer with a start token that keeps {PLACEHOLDER!r} whole; "
                         f"see prompt_texts); found {slots[:2].tolist()}")


class PromptedCLIP(nn.Module):
    """A frozen open_clip CLIP whose towers take deep prompts.

    Prompt tensors are cast to the activation dtype at the point of use, so fp32 prompt
    parameters work with an fp16/bf16 backbone.
    """

    def __init__(self, model: CLIP | CustomTextCLIP):
        super().__init__()
        self.model = model

    @property
    def _text(self) -> _TextTower:
        # Read at call time: `.to(dtype or device)` replaces the tower's buffers (attn_mask), so a copy taken at
        # construction would go stale.
        return _TextTower.of(self.model)

    @property
    def logit_scale(self) -> Tensor:
        return self.model.logit_scale.exp()

    def encode_image(self, images: Tensor, prompts: Tensor | None = None, normalize: bool = False, *,
                     per_sample: bool = False) -> Tensor:
        """Image features [B, D].

        prompts: None; [J, m, d_v], the same for every image; or, with `per_sample=True`,
        [B, J, m, d_v], one per image (a batch that mixes tasks). Said explicitly: a per-sample
        tensor of one layer and a shared one of B layers would otherwise look alike.
        """
        visual = self.model.visual
        if prompts is not None:
            _check_visual_shape(prompts, images.shape[0], per_sample, len(visual.transformer.resblocks))
        x = visual._embeds(images)
        depth = 0 if prompts is None else prompts.shape[-3]
        if depth:
            prompts = prompts.to(x.dtype)
            m = prompts.shape[-2]
            layer = (lambda j: prompts[:, j]) if prompts.dim() == 4 else (lambda j: prompts[j])
            x = _insert_slots(x, layer(0), 1)
        for j, block in enumerate(visual.transformer.resblocks):
            if 0 < j < depth:
                x = _replace_slots(x, layer(j), 1)
            x = _run_block(visual.transformer, block, x, None)
        if depth:
            x = torch.cat([x[:, :1], x[:, 1 + m:]], dim=1)
        pooled, _ = visual._pool(x)
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        return F.normalize(pooled, dim=-1) if normalize else pooled

    def encode_text(self, tokens: Tensor, prompts: Tensor | None = None, normalize: bool = False,
                    truncate: bool = True, placeholder: int | None = None, *, per_row: bool = False) -> Tensor:
        """Text features [N, D] for token ids [N, L].

        prompts: None; [J, m, d_t], written at positions 1..m of every row; or, with `per_row=True`,
        [N, J, m, d_t], one per row (texts of several tasks in one forward). Those positions must hold
        the placeholder token (see `prompt_texts`; `placeholder`: its id, else the one at [0, 1]): a
        ValueError says so otherwise, instead of overwriting class-name tokens. `truncate` drops the
        positions after the last EOT, which is exact only under a causal mask (without one, it is off).
        """
        t = self._text
        if prompts is not None and per_row and (prompts.dim() != 4 or prompts.shape[0] != tokens.shape[0]):
            raise ValueError(f"per-row text prompts of shape {tuple(prompts.shape)} for {tokens.shape[0]} rows: "
                             "expected [N, J, m, d_t]")
        if prompts is not None and prompts.shape[-2]:
            _check_placeholders(tokens, prompts.shape[-2], placeholder)
        eot = self._eot_index(tokens)
        if truncate and eot is not None and t.attn_mask is not None:
            tokens = tokens[:, : int(eot.max()) + 1]
        length = tokens.shape[1]
        cast_dtype = t.transformer.get_cast_dtype()
        x = t.token_embedding(tokens).to(cast_dtype)
        depth = 0 if prompts is None else prompts.shape[-3]
        if depth:
            prompts = prompts.to(cast_dtype)
            layer = (lambda j: prompts[:, j]) if per_row else (lambda j: prompts[j])
            x = _replace_slots(x, layer(0), 1)
        x = x + t.positional_embedding[:length].to(cast_dtype)
        mask = None if t.attn_mask is None else t.attn_mask[:length, :length]
        blocks = list(t.transformer.resblocks)
        own = mask is not None and all(_plain_block(t.transformer, block) for block in blocks)
        pooled_only = own and eot is not None
        for j, block in enumerate(blocks):
            if 0 < j < depth:
                x = _replace_slots(x, layer(j), 1)
            if own:
                x = _text_block(block, x, mask, eot if pooled_only and j == len(blocks) - 1 else None)
            else:
                x = _run_block(t.transformer, block, x, mask)
        x = t.ln_final(x)
        pooled = x[:, 0] if pooled_only else text_global_pool(x, tokens, t.pool_type, eos_token_id=t.eos_id)
        if isinstance(t.projection, nn.Linear):
            pooled = t.projection(pooled)
        elif t.projection is not None:
            pooled = pooled @ t.projection
        return F.normalize(pooled, dim=-1) if normalize else pooled

    def _eot_index(self, tokens: Tensor) -> Tensor | None:
        """Index of the pooled token per row, or None where pooling is not at EOT."""
        if self._text.pool_type == "argmax":
            return tokens.argmax(dim=-1)
        if self._text.pool_type == "eos" and self._text.eos_id is not None:
            return (tokens == self._text.eos_id).int().argmax(dim=-1)
        return None


def prompt_texts(classnames: list[str], template: str, n_placeholders: int) -> list[str]:
    """'X X … <template filled with the class name>': the texts whose X slots take text prompts."""
    prefix = " ".join([PLACEHOLDER] * n_placeholders)
    return [f"{prefix} {template.format(c)}".strip() for c in classnames]


def class_text_features(model: PromptedCLIP, tokenizer, classnames: Sequence[str], template: str,
                        text_prompts: Tensor | None = None) -> Tensor:
    """Normalised class-text embeddings [C, D] of a task's classes under its text prompts."""
    return many_class_text_features(model, tokenizer, [ClassTexts(classnames, template, text_prompts)])[0]


@dataclass(frozen=True)
class ClassTexts:
    """The class names of one task (or of a caller's label set) under its template and text prompts."""

    classnames: Sequence[str]
    template: str
    prompts: Tensor | None = None  # the task's text prompts [J, m, d_t]


def many_class_text_features(model: PromptedCLIP, tokenizer, sets: Sequence[ClassTexts],
                             max_rows: int = 512) -> list[Tensor]:
    """Normalised class-text embeddings [C_i, D] of each set, computed in shared text-tower forwards.

    Rows are independent (each class text is its own row, attention is causal within it), so the rows of
    all sets whose text prompts have the same shape go through forwards of at most `max_rows` rows, each
    row with its own set's prompts: loading thousands of tasks costs a few large forwards, not one each.
    """
    return encode_class_texts(model, tokenize_class_texts(tokenizer, sets), max_rows)


@dataclass(frozen=True)
class TokenizedTexts:
    """Class texts tokenized for `encode_class_texts`: per text-prompt shape, the sets of that shape (their
    indices), every row's tokens and the set it belongs to."""

    sizes: list[int]  # classes of each set
    groups: list[tuple[list[int], Tensor, Tensor, Tensor | None, int | None]]  # members, tokens, owner, prompts, X id


def tokenize_class_texts(tokenizer, sets: Sequence[ClassTexts], tokens: Sequence[Tensor] | None = None
                         ) -> TokenizedTexts:
    """The tokenizer's part of `many_class_text_features` (pure Python, the larger share of its time for a small
    text tower), grouped for `encode_class_texts`. `tokens`: each set's token rows, as `class_text_tokens` gives
    them (computed elsewhere, e.g. in another process), else computed here."""
    if tokens is None:
        tokens = class_text_tokens(tokenizer, [text_key(item) for item in sets])
    by_shape: dict[tuple[int, ...] | None, list[int]] = {}
    for i, item in enumerate(sets):
        by_shape.setdefault(None if item.prompts is None else tuple(item.prompts.shape), []).append(i)
    groups = []
    for shape, members in by_shape.items():
        m = 0 if shape is None else shape[1]
        owner = torch.tensor([k for k, i in enumerate(members) for _ in sets[i].classnames])
        stacked = None if shape is None else torch.stack([sets[i].prompts for i in members])
        placeholder = int(tokenizer([PLACEHOLDER])[0, 1]) if m else None  # [SOS, X, EOT, ...] with a start token
        groups.append((members, torch.cat([tokens[i] for i in members]), owner, stacked, placeholder))
    return TokenizedTexts([len(item.classnames) for item in sets], groups)


def text_key(item: ClassTexts) -> tuple[Sequence[str], str, int]:
    """What a set's token rows depend on: class names, template, number of text-prompt tokens."""
    return item.classnames, item.template, 0 if item.prompts is None else item.prompts.shape[-2]


def class_text_tokens(tokenizer, keys: Sequence[tuple[Sequence[str], str, int]]) -> list[Tensor]:
    """Token rows [C_i, L] of each (class names, template, prompt tokens); a text that recurs (a class name shared
    by tasks with one template) is tokenized once."""
    texts = [prompt_texts(classnames, template, m) for classnames, template, m in keys]
    unique = list(dict.fromkeys(text for rows in texts for text in rows))
    where = {text: row for row, text in enumerate(unique)}
    tokens = tokenize(tokenizer, unique)
    return [tokens[torch.tensor([where[text] for text in rows])] for rows in texts]


def encode_class_texts(model: PromptedCLIP, texts: TokenizedTexts, max_rows: int = 512) -> list[Tensor]:
    """The forwards of `many_class_text_features`: normalised [C_i, D] per set, in the order of the sets."""
    device = model.logit_scale.device
    features: list[Tensor | None] = [None] * len(texts.sizes)
    for members, tokens, owner, stacked, placeholder in texts.groups:
        tokens, owner = tokens.to(device), owner.to(device)
        stacked = None if stacked is None else stacked.to(device)
        rows = [model.encode_text(tokens[start:start + max_rows],
                                  None if stacked is None else stacked[owner[start:start + max_rows]],
                                  normalize=True, placeholder=placeholder, per_row=stacked is not None)
                for start in range(0, len(tokens), max_rows)]
        encoded = torch.cat(rows)
        for i, part in zip(members, encoded.split([texts.sizes[i] for i in members]), strict=True):
            features[i] = part
    return features  # type: ignore[return-value]
