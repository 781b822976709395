"""`python -m service.engine.onnx.export --out FILE [--model M] [--pretrained P] [--prompt-tokens m] [--depth J]`.

Exports the prompted image tower (`PromptedCLIP.encode_image(images, prompts, normalize=True)`)
of a backbone to ONNX, for the `onnx` backend (`onnx_backend.py`):

- inputs `images` [B, 3, H, W] and, when m > 0, `prompts` [B, J, m, d_v] (per-sample visual
  prompts, so one forward can mix tasks); output `features` [B, D], L2-normalised. The batch axis
  is dynamic; J and m are static (the prompted forward slices by them), so there is one graph per
  prompt signature (J, m). m = 0 exports the unprompted tower (methods without visual prompts).
- the graph's metadata (`mmap.*` keys) records the backbone fingerprint, J, m, input size,
  widths, dtype and exporter; the backend refuses a graph whose fingerprint is not the served
  backbone's, or whose signature is not the one asked for.
- every export is checked: onnxruntime and torch must agree on a batch of a size other than the
  traced one (max |diff| <= 1e-4 in fp32), or nothing is written.

The legacy TorchScript exporter is the default (seconds for ViT-B); `--dynamo` uses
`torch.onnx.export(dynamo=True)` (needs onnxscript; slower, the path once the legacy exporter is
gone). nn.MultiheadAttention's fast path cannot be traced by the legacy exporter, so it is
switched off while exporting (it is a speed path only; results are the same). Graphs over 2 GB
(protobuf's limit; ViT-bigG-sized towers) are not supported.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import open_clip
import torch
from torch import Tensor, nn

from mmap_model import Backbone, PromptConfig, PromptedCLIP

log = logging.getLogger(__name__)

GRAPH_FORMAT = "1"  # bump when inputs, outputs or metadata change: cached graphs of other formats are not reused
META_PREFIX = "mmap."
OPSET = 17
TRACE_BATCH = 2  # traced with 2 and verified with 3 rows: a batch size baked in by mistake fails verification
ONNX_DTYPES = {torch.float32: "fp32", torch.float16: "fp16"}
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}


class OnnxGraphError(ValueError):
    """A graph that cannot be exported or served; the message says which check failed."""


@dataclass(frozen=True)
class GraphInfo:
    """What an exported graph is, as stored in its metadata."""

    fingerprint: str  # the backbone's weight fingerprint (mmap_model.backbone.fingerprint)
    depth: int  # J: prompted layers (0 = unprompted graph)
    tokens: int  # m: prompt tokens per layer (0 = unprompted graph)
    height: int
    width: int
    d_v: int
    embed_dim: int
    dtype: str  # fp32 | fp16
    model: str
    pretrained: str
    exporter: str  # torchscript | dynamo
    format: str = GRAPH_FORMAT

    @property
    def signature(self) -> tuple[int, int]:
        return self.depth, self.tokens

    def to_metadata(self) -> dict[str, str]:
        return {META_PREFIX + k: str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str], source: str) -> GraphInfo:
        """Parse `mmap.*` metadata; a graph without it (or of another format) raises OnnxGraphError."""
        values = {k[len(META_PREFIX):]: v for k, v in metadata.items() if k.startswith(META_PREFIX)}
        if values.get("format") != GRAPH_FORMAT:
            raise OnnxGraphError(f"{source}: not an mmap-serve image-tower graph of format {GRAPH_FORMAT} "
                                 f"(found {values.get('format', 'no mmap.* metadata')}); export it with "
                                 "`python -m service.engine.onnx.export`")
        try:
            ints = {k: int(values[k]) for k in ("depth", "tokens", "height", "width", "d_v", "embed_dim")}
            return cls(fingerprint=values["fingerprint"], dtype=values["dtype"], model=values["model"],
                       pretrained=values["pretrained"], exporter=values["exporter"], **ints)
        except (KeyError, ValueError) as e:
            raise OnnxGraphError(f"{source}: incomplete mmap.* metadata ({type(e).__name__}: {e})") from e


class PromptedImageTower(nn.Module):
    """The exported function: images (+ per-sample visual prompts) -> normalised image features."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.prompted = PromptedCLIP(backbone.model)

    def forward(self, images: Tensor, prompts: Tensor | None = None) -> Tensor:
        return self.prompted.encode_image(images, prompts, normalize=True, per_sample=True)


def image_hw(backbone: Backbone) -> tuple[int, int]:
    size = backbone.model.visual.image_size
    return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))


def graph_dtype(backbone: Backbone) -> str:
    if backbone.dtype not in ONNX_DTYPES:
        raise OnnxGraphError(f"the onnx backend runs fp32 or fp16 graphs, not {backbone.dtype}; "
                             "serve with --precision fp32 or fp16")
    return ONNX_DTYPES[backbone.dtype]


def graph_info(backbone: Backbone, depth: int, tokens: int, exporter: str = "torchscript") -> GraphInfo:
    height, width = image_hw(backbone)
    return GraphInfo(fingerprint=backbone.fingerprint, depth=depth, tokens=tokens, height=height, width=width,
                     d_v=backbone.widths.d_v, embed_dim=backbone.widths.embed_dim, dtype=graph_dtype(backbone),
                     model=backbone.model_name, pretrained=str(backbone.pretrained), exporter=exporter)


def cache_name(info: GraphInfo) -> str:
    """The file name of a graph in the on-the-fly cache: everything that makes two graphs differ."""
    return (f"{info.fingerprint[:24]}-J{info.depth}-m{info.tokens}-{info.height}x{info.width}-{info.dtype}"
            f"-f{info.format}.onnx")


def sample_inputs(backbone: Backbone, depth: int, tokens: int, batch: int, seed: int = 0) -> tuple[Tensor, ...]:
    """Random images (and prompts when m > 0) on the backbone's device, in its dtype."""
    generator = torch.Generator().manual_seed(seed)
    height, width = image_hw(backbone)
    images = torch.randn(batch, 3, height, width, generator=generator)
    if not tokens:
        return (images.to(backbone.device, backbone.dtype),)
    prompts = torch.randn(batch, depth, tokens, backbone.widths.d_v, generator=generator) * 0.02
    return images.to(backbone.device, backbone.dtype), prompts.to(backbone.device, backbone.dtype)


@contextlib.contextmanager
def mha_fastpath_disabled() -> Iterator[None]:
    """The legacy exporter cannot trace aten::_native_multi_head_attention (process-wide switch, restored)."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def export_proto(backbone: Backbone, depth: int, tokens: int, dynamo: bool = False) -> onnx.ModelProto:
    """Trace the prompted image tower into an ONNX model (without metadata)."""
    if (depth == 0) != (tokens == 0):
        raise OnnxGraphError(f"depth and prompt tokens must both be 0 (unprompted) or both > 0, "
                             f"got J={depth}, m={tokens}")
    if depth > backbone.widths.layers_v:
        raise OnnxGraphError(f"depth {depth} exceeds the image tower's {backbone.widths.layers_v} layers")
    tower = PromptedImageTower(backbone).eval()
    args = sample_inputs(backbone, depth, tokens, TRACE_BATCH)
    names = ["images", "prompts"][: len(args)]
    with torch.no_grad(), warnings.catch_warnings():
        # the tracer warns that J and m become constants: intended, one graph per (J, m)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="# The axis name")  # dynamo: both inputs share one batch Dim
        if dynamo:
            batch = torch.export.Dim("batch", min=1, max=4096)
            program = torch.onnx.export(tower, args, dynamo=True, input_names=names, output_names=["features"],
                                        dynamic_shapes=tuple({0: batch} for _ in args), opset_version=18,
                                        verbose=False)
            return program.model_proto
        buffer = io.BytesIO()
        with mha_fastpath_disabled():
            torch.onnx.export(tower, args, buffer, dynamo=False, input_names=names, output_names=["features"],
                              dynamic_axes={n: {0: "batch"} for n in [*names, "features"]}, opset_version=OPSET)
        return onnx.load_from_string(buffer.getvalue())


def export_image_tower(backbone: Backbone, out: Path, depth: int, tokens: int, dynamo: bool = False,
                       providers: Sequence[str] | None = None) -> GraphInfo:
    """Export, verify against torch with onnxruntime, and write `out` atomically; returns its metadata.

    `providers`: onnxruntime execution providers for the check (default: CUDA when the backbone is on
    CUDA and onnxruntime has it, else CPU).
    """
    info = graph_info(backbone, depth, tokens, "dynamo" if dynamo else "torchscript")
    proto = export_proto(backbone, depth, tokens, dynamo)
    for key, value in info.to_metadata().items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    data = proto.SerializeToString()
    verify(backbone, data, info, providers)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, out)  # atomic: a concurrent reader (another replica sharing the cache) sees all or nothing
    finally:
        tmp.unlink(missing_ok=True)
    log.info("exported the image tower (J=%d, m=%d, %s) to %s", depth, tokens, info.dtype, out)
    return info


def verify(backbone: Backbone, graph: bytes, info: GraphInfo, providers: Sequence[str] | None = None) -> float:
    """Run the graph with onnxruntime on a batch of 3 and compare with torch; raise OnnxGraphError beyond tolerance."""
    from .runtime import CUDA_EP, open_session, provider_names  # onnxruntime: the optional onnx extra

    providers = providers or default_providers(backbone)
    if info.dtype == "fp16" and CUDA_EP not in provider_names(providers):
        raise OnnxGraphError("fp16 graphs need onnxruntime's CUDA execution provider (onnxruntime-gpu, --device cuda)")
    session = open_session(graph, providers)
    args = sample_inputs(backbone, info.depth, info.tokens, TRACE_BATCH + 1, seed=1)
    with torch.inference_mode():
        expected = PromptedImageTower(backbone)(*args).float().cpu().numpy()
    feeds = {name: t.cpu().numpy() for name, t in zip(["images", "prompts"], args, strict=False)}
    got = session.run(["features"], feeds)[0].astype(np.float32)
    error = float(np.abs(got - expected).max()) if got.shape == expected.shape else float("inf")
    if not error <= TOLERANCE[info.dtype]:
        raise OnnxGraphError(f"exported graph disagrees with torch: max |diff| {error:.3g} > {TOLERANCE[info.dtype]:g} "
                             f"(output {got.shape}, expected {expected.shape})")
    return error


def default_providers(backbone: Backbone) -> list[str]:
    from .runtime import providers_for

    return providers_for(backbone.device)


def default_signature(backbone: Backbone) -> tuple[int, int]:
    """J and m of a grouped task under the default PromptConfig (group + task tokens)."""
    cfg = PromptConfig().resolve(backbone.widths)
    return cfg.depth, cfg.group_tokens + cfg.task_tokens


def main(argv: list[str] | None = None) -> None:
    from service.engine.backbone import (
        load_configured_backbone,  # the service's rules: random:<seed>, no silent fallback
    )
    from service.settings import Settings

    parser = argparse.ArgumentParser(prog="python -m service.engine.onnx.export", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    parser.add_argument("--model", default=Settings.model_fields["model"].default,
                        help="open_clip model name (as the service)")
    parser.add_argument("--pretrained", default=Settings.model_fields["pretrained"].default,
                        help="open_clip pretrained tag or checkpoint; 'none' or 'random:<seed>' = random weights")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="m (0 = unprompted graph); default: the "
                        "default PromptConfig's group + task tokens")
    parser.add_argument("--depth", type=int, default=None,
                        help="J, prompted layers; default: the default PromptConfig's")
    parser.add_argument("--precision", choices=["fp32", "fp16"], default="fp32", help="graph dtype (fp16 needs CUDA)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu", help="where to trace")
    parser.add_argument("--dynamo", action="store_true", help="use the dynamo exporter (needs onnxscript)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    backbone = load_configured_backbone(Settings(model=args.model, pretrained=args.pretrained, device=args.device,
                                                 precision=args.precision))
    depth, tokens = default_signature(backbone)
    if args.prompt_tokens is not None:
        tokens = args.prompt_tokens
        depth = 0 if tokens == 0 else depth
    if args.depth is not None:
        depth = args.depth
    try:
        info = export_image_tower(backbone, args.out, depth, tokens, dynamo=args.dynamo)
    except OnnxGraphError as e:
        parser.exit(1, f"error: {e}\n")
    print(json.dumps({"out": str(args.out), "bytes": args.out.stat().st_size, "open_clip": open_clip.__version__,
                      "torch": torch.__version__, **asdict(info)}, indent=2))


if __name__ == "__main__":
    main()
