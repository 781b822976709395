"""Loading a frozen open_clip CLIP: the one factory every package goes through.

`load_backbone(model, pretrained)` accepts what open_clip accepts (a built-in name with a
`pretrained` tag or a local checkpoint file, or `local-dir:<dir>`), plus the project's
embedded default (`model="mmap-tiny", pretrained="embedded"`), a tiny CLIP shipped inside this
package so that everything works offline. The result is frozen (eval, no grad), carries its
preprocess, tokenizer and widths, and a fingerprint of its weights that prompt sets are bound to.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import open_clip
import torch
from open_clip.model import CLIP, CustomTextCLIP
from open_clip.transform import PreprocessCfg, image_transform_v2
from open_clip.transformer import TextTransformer, VisionTransformer
from torch import nn

from .embedded import EMBEDDED_DIR, EMBEDDED_MODEL, EMBEDDED_PRETRAINED, EMBEDDED_PROMPTS_DIR  # noqa: F401

log = logging.getLogger(__name__)


PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class UnsupportedBackboneError(ValueError):
    """The model's towers cannot take deep prompts (timm / ResNet / HF text / CoCa)."""


@dataclass(frozen=True)
class Widths:
    """Sizes the prompt modules are built from."""

    d_t: int  # text transformer width
    d_v: int  # image transformer width
    embed_dim: int  # joint embedding size
    layers_t: int
    layers_v: int


@dataclass
class Backbone:
    """A frozen CLIP with everything needed to prompt it and to feed it."""

    model: CLIP | CustomTextCLIP
    preprocess: Callable  # PIL image -> [3, H, W] tensor, exactly open_clip's eval transform
    tokenizer: Callable  # list[str] -> [N, context_length] token ids
    widths: Widths
    fingerprint: str  # sha256 over the fp32 weights: binds prompt sets to these weights
    model_name: str
    pretrained: str | None
    device: torch.device
    dtype: torch.dtype

    @property
    def preprocess_cfg(self) -> dict[str, Any]:
        """What `preprocess` does, as data: open_clip's PreprocessCfg fields, `size` as [H, W]."""
        cfg = dataclasses.asdict(PreprocessCfg(**self.model.visual.preprocess_cfg))
        size = cfg["size"]
        cfg["size"] = [size, size] if isinstance(size, int) else list(size)
        return cfg

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)


def random_weights(pretrained: str | None) -> bool:
    """`pretrained` asks for random weights (None, '' or 'none')."""
    return pretrained in (None, "", "none")


def resolve_model_name(model: str, pretrained: str | None) -> tuple[str, str | None, bool]:
    """Map the user's (model, pretrained) to open_clip's (name, pretrained, load_weights)."""
    if model == EMBEDDED_MODEL:
        if pretrained != EMBEDDED_PRETRAINED and not random_weights(pretrained):
            raise ValueError(f"model {EMBEDDED_MODEL!r} only knows pretrained={EMBEDDED_PRETRAINED!r} or none")
        load = pretrained == EMBEDDED_PRETRAINED
        if load and not (EMBEDDED_DIR / "open_clip_model.safetensors").is_file():
            raise FileNotFoundError(f"embedded weights missing in {EMBEDDED_DIR}; run `python -m training.pretrain`")
        return f"local-dir:{EMBEDDED_DIR}", None, load
    return model, None if random_weights(pretrained) else pretrained, True


def check_promptable(model: nn.Module) -> None:
    """Refuse towers that the prompted forward cannot drive, with the reason."""
    if not isinstance(model, (CLIP, CustomTextCLIP)):
        raise UnsupportedBackboneError(
            f"{type(model).__name__} is not a CLIP/CustomTextCLIP (CoCa and others are not supported)"
        )
    if not isinstance(model.visual, VisionTransformer):
        raise UnsupportedBackboneError(
            f"image tower {type(model.visual).__name__} is not open_clip's native VisionTransformer "
            "(timm and ResNet towers cannot take deep visual prompts)"
        )
    if isinstance(model, CustomTextCLIP):
        text = model.text
        if not isinstance(text, TextTransformer):
            raise UnsupportedBackboneError(
                f"text tower {type(text).__name__} is not open_clip's native TextTransformer "
                "(HF text towers are not supported)"
            )
        if text.cls_emb is not None or getattr(text, "use_pad_mask", False):
            raise UnsupportedBackboneError("text towers with a class token or padding mask are not supported")
    if not model.visual.transformer.batch_first:
        raise UnsupportedBackboneError(
            "sequence-first transformers are not supported (open_clip 3.3 builds batch-first ones)"
        )
    if model.visual.attn_pool is not None:
        raise UnsupportedBackboneError("image towers with attentional pooling are not supported")


def fingerprint(model: nn.Module) -> str:
    """sha256 over names, shapes and fp32 bytes of every parameter and buffer.

    Computed in fp32 on the CPU so the same weights give the same digest in every process, on
    every device and at every serving precision.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(t.shape)};".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def widths_of(model: CLIP | CustomTextCLIP) -> Widths:
    text = model.text if isinstance(model, CustomTextCLIP) else model
    return Widths(
        d_t=text.transformer.width,
        d_v=model.visual.transformer.width,
        embed_dim=int(model.visual.output_dim),
        layers_t=text.transformer.layers,
        layers_v=model.visual.transformer.layers,
    )


def resolve_device(device: str) -> torch.device:
    """"auto" is cuda when torch sees a GPU, else cpu; "cuda" without one is refused in one clear line."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ValueError(f"device {device!r} asked for, but torch {torch.__version__} ({build}) finds no CUDA GPU "
                         "on this machine; use device 'cpu' or 'auto'")
    return resolved


def load_backbone(
    model: str = EMBEDDED_MODEL,
    pretrained: str | None = EMBEDDED_PRETRAINED,
    device: str = "cpu",
    precision: str = "fp32",
    *,
    seed: int | None = None,
) -> Backbone:
    """Create a frozen, promptable CLIP.

    `model`/`pretrained`: an open_clip built-in name with a tag or checkpoint file (`pretrained=None`
    gives random weights, never a download), `local-dir:<dir>` with open_clip's own format, or the
    embedded default. `seed`: random weights drawn from this seed (the same weights, and fingerprint,
    in every process: what tests, benchmarks and `--pretrained none` runs share), without touching the
    caller's random state; None draws from the current state. `precision` casts the weights (fp32 /
    fp16 / bf16); the fingerprint is taken before the cast.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    torch_device = resolve_device(device)
    name, tag, load = resolve_model_name(model, pretrained)
    if seed is not None and not random_weights(pretrained):
        raise ValueError("seed draws random weights: it goes with pretrained=None")
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        clip = open_clip.create_model(name, pretrained=tag, load_weights=load, device="cpu")
    check_promptable(clip)
    clip.eval().requires_grad_(False)
    digest = fingerprint(clip)
    dtype = PRECISIONS[precision]
    clip.to(torch_device, dtype)
    preprocess = image_transform_v2(PreprocessCfg(**clip.visual.preprocess_cfg), is_train=False)
    tokenizer = open_clip.get_tokenizer(name)
    log.info("loaded %s (%s) on %s/%s, fingerprint %s", model, pretrained, torch_device, precision, digest[:12])
    return Backbone(
        model=clip,
        preprocess=preprocess,
        tokenizer=tokenizer,
        widths=widths_of(clip),
        fingerprint=digest,
        model_name=model,
        pretrained=pretrained,
        device=torch_device,
        dtype=dtype,
    )


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
