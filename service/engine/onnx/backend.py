"""The `onnx` backend: the prompted image tower as ONNX graphs run by onnxruntime.

`OnnxImageTower` implements `ImageTower` (images [B, 3, H, W] + per-sample prompts
[B, J, m, d_v] or None -> normalised features [B, D]) with one graph per prompt signature (J, m),
exported by `export_onnx.py`:

- `model_path` (setting `onnx_model`): a graph exported beforehand; opened at construction and
  refused (OnnxGraphError, the service does not start) unless its metadata names the served
  backbone's fingerprint, dtype, input size and widths.
- every other signature, and all of them when no file is given, is exported on the fly into
  `cache_dir` (setting `onnx_cache`) under a name made of the fingerprint, J, m, input size and
  dtype, and reused from there on the next start (replicas may share the directory: writes are
  atomic). The engine's warm-up runs one forward per prompt bank, so the graphs the loaded
  prompt sets need are exported before /readyz turns 200; a prompt set with a new (J, m) loaded
  later pays its export (seconds for ViT-B) on its first batch.
- prompts=None (coop, or any task without visual prompts) runs the unprompted graph (m = 0),
  exported like the others: the onnx backend never falls back to torch for images.

Execution provider: CUDA when the backbone is on CUDA and onnxruntime has it (onnxruntime-gpu),
else CPU. fp16 graphs need the CUDA provider; bf16 is refused (use the torch backend).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor

from mmap_model import Backbone

from .export import GraphInfo, OnnxGraphError, cache_name, export_image_tower, graph_dtype, graph_info
from .runtime import CUDA_EP, Provider, open_session, provider_names, providers_for

log = logging.getLogger(__name__)

class OnnxImageTower:
    """Prompted image tower on onnxruntime; graphs are opened, or exported and cached, per (J, m)."""

    def __init__(self, backbone: Backbone, model_path: Path | None = None, cache_dir: Path | None = None,
                 providers: Sequence[Provider] | None = None, threads: int | None = None):
        self.backbone = backbone
        self.threads = threads
        self.providers = list(providers) if providers else providers_for(backbone.device)
        self.dtype = graph_dtype(backbone)
        if self.dtype == "fp16" and CUDA_EP not in provider_names(self.providers):
            raise OnnxGraphError("fp16 graphs need onnxruntime's CUDA execution provider (onnxruntime-gpu and "
                                 "--device cuda); on the CPU serve the onnx backend with --precision fp32")
        self.np_dtype = np.float16 if self.dtype == "fp16" else np.float32
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self._sessions: dict[tuple[int, int], ort.InferenceSession] = {}
        self._lock = threading.Lock()  # the engine calls from one thread; this guards direct callers too
        if model_path is not None:
            session, info = self._open(Path(model_path))
            self._sessions[info.signature] = session
            log.info("onnx backend: serving %s for J=%d, m=%d on %s", model_path, info.depth, info.tokens,
                     session.get_providers()[0])

    @property
    def signatures(self) -> list[tuple[int, int]]:
        """The (J, m) signatures with an open graph ((0, 0) = unprompted)."""
        return sorted(self._sessions)

    @property
    def provider(self) -> str | None:
        """The execution provider the open graphs run on (None before one is open)."""
        return next((s.get_providers()[0] for s in self._sessions.values()), None)

    def __call__(self, images: Tensor, prompts: Tensor | None) -> Tensor:
        signature = (0, 0) if prompts is None else (int(prompts.shape[1]), int(prompts.shape[2]))
        session = self._session(signature)
        feeds = {"images": images.detach().to("cpu", torch.float32).numpy().astype(self.np_dtype, copy=False)}
        if prompts is not None:
            feeds["prompts"] = prompts.detach().to("cpu", torch.float32).numpy().astype(self.np_dtype, copy=False)
        (features,) = session.run(["features"], feeds)
        return torch.from_numpy(features.astype(np.float32, copy=False))

    def _session(self, signature: tuple[int, int]) -> ort.InferenceSession:
        with self._lock:
            session = self._sessions.get(signature)
            if session is not None:
                return session
            depth, tokens = signature
            if self.cache_dir is None:
                raise OnnxGraphError(f"no onnx graph for J={depth}, m={tokens} "
                                     "and no cache directory to export one into")
            path = self.cache_dir / cache_name(graph_info(self.backbone, depth, tokens))
            if not path.is_file():
                log.info("onnx backend: exporting the image tower for J=%d, m=%d into %s", depth, tokens, path)
                export_image_tower(self.backbone, path, depth, tokens, providers=self.providers)
            session, _ = self._open(path)
            self._sessions[signature] = session
            return session

    def _open(self, path: Path) -> tuple[ort.InferenceSession, GraphInfo]:
        """Open a graph and check that it belongs to the served backbone; OnnxGraphError says why not."""
        if not path.is_file():
            raise OnnxGraphError(f"{path}: no such onnx graph")
        session = open_session(path, self.providers, self.threads)
        info = GraphInfo.from_metadata(session.get_modelmeta().custom_metadata_map, str(path))
        expected = graph_info(self.backbone, info.depth, info.tokens)
        if info.fingerprint != expected.fingerprint:
            raise OnnxGraphError(
                f"{path} was exported from another backbone (fingerprint {info.fingerprint[:12]}…, model "
                f"{info.model} {info.pretrained}); the served backbone is {expected.fingerprint[:12]}… "
                f"({expected.model} {expected.pretrained}). Re-export it: "
                "python -m service.engine.onnx.export --out FILE --model … --pretrained …")
        mismatched = [f"{k} {getattr(info, k)} != {getattr(expected, k)}"
                      for k in ("height", "width", "d_v", "embed_dim", "dtype")
                      if getattr(info, k) != getattr(expected, k)]
        if mismatched:
            raise OnnxGraphError(f"{path} does not fit the served backbone: {', '.join(mismatched)}")
        inputs = [i.name for i in session.get_inputs()]
        wanted = ["images", "prompts"] if info.tokens else ["images"]
        if inputs != wanted or [o.name for o in session.get_outputs()] != ["features"]:
            raise OnnxGraphError(f"{path}: inputs {inputs} / outputs {[o.name for o in session.get_outputs()]}, "
                                 f"expected {wanted} / ['features']")
        return session, info
