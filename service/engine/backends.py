"""Inference backends: the prompted image tower behind one small interface.

The engine only ever calls an `ImageTower`; the class-text side is computed once per task at
load time with torch (see `registry.py`), so a backend needs the image tower alone. A second
backend implements the same call and is registered in `BACKENDS`: `torch` (default) and `onnx`
(onnxruntime running a graph exported by `service.engine.onnx.export`, see `onnx_backend.py`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from mmap_model import Backbone, PromptedCLIP
from service.settings import Settings

from .cuda_graphs import CudaGraphs


class PinnedStaging:
    """Host -> CUDA copies that do not block: through pinned host buffers, reused.

    An event recorded after each copy guards its buffer: a buffer is refilled only once the device has read
    it. A batch stages once per prompt bank, and the next batch may be staged while the last one is still
    queued on the device (`batches_in_flight`), so a copy takes a buffer whose copy has passed (one large
    enough first), and while none has, a new one, up to `most`; beyond that it waits for the oldest.
    """

    def __init__(self, device: torch.device, most: int = 8):
        self.device = device
        self.most = most
        self.buffers: list[Tensor] = []  # least recently used first
        self._copied: list[torch.cuda.Event] = []  # recorded after each buffer's last copy

    def upload(self, shape: Sequence[int], dtype: torch.dtype, fill: Callable[[Tensor], object],
               device_dtype: torch.dtype | None = None) -> Tensor:
        """`fill` writes a host tensor of `shape` and `dtype`; its copy on the device (as `device_dtype`) is
        returned, on its way."""
        n = math.prod(shape)
        free = [i for i, copied in enumerate(self._copied) if copied.query()]
        fits = [i for i in free if self.buffers[i].numel() >= n and self.buffers[i].dtype == dtype]
        take = fits[0] if fits else free[0] if free else None
        if take is None and len(self.buffers) >= self.most:
            take = 0
            self._copied[0].synchronize()
        buffer = None
        if take is not None:
            buffer = self.buffers.pop(take)
            del self._copied[take]
        if buffer is None or buffer.numel() < n or buffer.dtype != dtype:
            buffer = torch.empty(n, dtype=dtype, pin_memory=True)
        host = buffer[:n].view(*shape)
        fill(host)
        on_device = host.to(self.device, device_dtype or dtype, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        self.buffers.append(buffer)
        self._copied.append(copied)
        return on_device


def batch_buckets(max_batch_size: int) -> list[int]:
    """Batch sizes a compiled or captured tower runs: 1, 2, 4, 8, 16, then 24, 32, 48, 64, 96, ... (steps of
    1.5x and 4/3x, so padding wastes at most a third), up to the first that holds `max_batch_size`."""
    buckets = [1]
    while buckets[-1] < max_batch_size:
        b = buckets[-1]
        buckets.append(2 * b if b < 16 else b + (b // 2 if b & (b - 1) == 0 else b // 3))
    return buckets


class ImageTower(Protocol):
    """images [B, 3, H, W] (fp32, normalised, on any device) and per-sample visual prompts [B, J, m, d_v]
    or None -> L2-normalised image features [B, D] (fp32, on the tower's device)."""

    def __call__(self, images: Tensor, prompts: Tensor | None) -> Tensor: ...


class TorchImageTower:
    """The prompted open_clip image tower, run at the backbone's device and precision.

    On CUDA, fp16/bf16 weights run under autocast of the same dtype (LayerNorm and softmax then
    run in fp32) and images go through a reused pinned host buffer with a non-blocking copy.

    Two ways to cut the launch cost of the eager forward, both over batch buckets (`batch_buckets`,
    up to `max_batch_size`; a batch runs at the smallest bucket that holds it):
    - `cuda_graphs`: the eager forward captured as one CUDA graph per (bucket, prompt shape) and
      replayed on static buffers (`cuda_graphs.py`);
    - `compile` (a torch.compile mode, "off" = eager): the tower compiled per (bucket, prompt shape),
      a batch zero-padded to its bucket; "reduce-overhead" also captures CUDA graphs of Inductor's
      kernels.
    The first forward of a prompt shape prepares every bucket for it, so the service's warm-up (one
    forward per prompt shape) captures or compiles them all before /readyz turns 200; only a shape first
    brought by a hot swap is prepared by the batch that first uses it.
    """

    def __init__(self, backbone: Backbone, compile: str = "off", max_batch_size: int = 32,
                 cuda_graphs: bool = False):
        self.prompted = PromptedCLIP(backbone.model)
        self.device = backbone.device
        self.dtype = backbone.dtype
        self.cuda = self.device.type == "cuda"
        if cuda_graphs and not self.cuda:
            raise ValueError(f"cuda_graphs needs a CUDA device; the model is on {self.device}")
        if cuda_graphs and compile != "off":
            raise ValueError("cuda_graphs and torch_compile exclude each other: choose one")
        self.autocast = self.cuda and self.dtype != torch.float32
        self.buckets = None if compile == "off" and not cuda_graphs else batch_buckets(max_batch_size)
        self.cudagraphs = compile in ("reduce-overhead", "max-autotune")
        self.graphs = CudaGraphs(self._encode) if cuda_graphs else None
        self._forward = self._encode if compile == "off" else torch.compile(self._encode, mode=compile, dynamic=False)
        self._staging = PinnedStaging(self.device) if self.cuda else None  # images that arrive on the host
        self._prepared: set[tuple[int, ...]] = set()  # prompt shapes whose buckets are compiled or captured

    def _encode(self, images: Tensor, prompts: Tensor | None) -> Tensor:
        return self.prompted.encode_image(images, prompts, normalize=True, per_sample=True)

    def __call__(self, images: Tensor, prompts: Tensor | None) -> Tensor:
        batch = size = images.shape[0]
        if self.buckets is not None:
            shape = () if prompts is None else tuple(prompts.shape[1:])
            if shape not in self._prepared:
                self._prepared.add(shape)
                for bucket in reversed(self.buckets):  # largest first: the smaller graphs reuse its memory
                    self(images[:1].expand(bucket, -1, -1, -1),
                         None if prompts is None else prompts[:1].expand(bucket, -1, -1, -1))
            size = next((b for b in self.buckets if b >= batch), batch)
            if self.graphs is None:
                images = torch.cat([images, images.new_zeros(size - batch, *images.shape[1:])])
                if prompts is not None:
                    prompts = torch.cat([prompts, prompts.new_zeros(size - batch, *prompts.shape[1:])])
        # autocast's weight-cast cache must be off while graphs are captured (it holds no-grad weights anyway)
        autocast = (torch.autocast("cuda", self.dtype, cache_enabled=self.graphs is None) if self.autocast
                    else contextlib.nullcontext())
        with torch.inference_mode(), autocast:
            images = self._to_device(images)
            if prompts is not None:
                prompts = prompts.to(self.device, non_blocking=True)
            if self.graphs is not None and size in self.buckets:
                return self.graphs(images, prompts, size).float()
            if self.cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            features = self._forward(images, prompts)[:batch]
            # torch.compile's CUDA graphs own their output and overwrite it on the next run: copy it out
            return features.clone().float() if self.cudagraphs else features.float()

    def _to_device(self, images: Tensor) -> Tensor:
        if self._staging is None or images.device.type == "cuda":  # (torch.device("cuda") != the tensors' "cuda:0")
            return images.to(self.device, self.dtype)
        return self._staging.upload(images.shape, images.dtype, lambda host: host.copy_(images), self.dtype)


class PixelNormalizer:
    """uint8 pixels [B, H, W, 3] (CPU, or already on the device) -> normalised fp32 images [B, 3, H, W] on the device.

    The same operations as open_clip's ToTensor + Normalize (divide by 255, subtract the mean, divide
    by the std, in fp32), run on the device after the copy: bit-identical to open_clip's transform,
    with a quarter of the bytes crossing to the device. On CUDA the copy goes through reused pinned
    buffers (`PinnedStaging`), without blocking; `stack` fills one straight from the images, one host copy
    in all.
    """

    def __init__(self, device: torch.device, mean: Sequence[float], std: Sequence[float]):
        self.device = device
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=device).view(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=device).view(-1, 1, 1)
        self._staging = PinnedStaging(device) if device.type == "cuda" else None

    def stack(self, images: Sequence[np.ndarray]) -> Tensor:
        """Images [H, W, 3] uint8 -> one batch [B, H, W, 3]: on its way to the device on CUDA (through a pinned
        buffer), a new CPU tensor otherwise."""
        if self._staging is None:
            return torch.from_numpy(np.stack(images))
        return self._staging.upload((len(images), *images[0].shape), torch.uint8,
                                    lambda host: np.stack(images, out=host.numpy()))

    def __call__(self, pixels: Tensor) -> Tensor:
        if self._staging is not None and pixels.device.type == "cpu":
            pixels = self._staging.upload(pixels.shape, pixels.dtype, lambda host: host.copy_(pixels))
        images = pixels.permute(0, 3, 1, 2).to(torch.float32).div(255)
        return images.sub_(self.mean).div_(self.std)


def _torch(backbone: Backbone, settings: Settings) -> ImageTower:
    settings = settings.resolved(backbone.device.type)
    return TorchImageTower(backbone, settings.torch_compile, settings.max_batch_size, settings.cuda_graphs)


def _onnx(backbone: Backbone, settings: Settings) -> ImageTower:
    from service.engine.onnx.backend import (
        OnnxImageTower,  # onnxruntime is an optional extra: imported only when chosen
    )

    return OnnxImageTower(backbone, settings.onnx_model, settings.onnx_cache)


BACKENDS: dict[str, Callable[[Backbone, Settings], ImageTower]] = {"torch": _torch, "onnx": _onnx}


def make_image_tower(name: str, backbone: Backbone, settings: Settings | None = None) -> ImageTower:
    """The configured backend for a loaded backbone (`settings` carries the backend's options; None = defaults)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available: {sorted(BACKENDS)}")
    return BACKENDS[name](backbone, settings or Settings.model_construct())
