"""The image tower's eager forward captured as CUDA graphs and replayed (the torch backend's `cuda_graphs`).

An eager forward of a ViT launches hundreds of kernels from Python; at the batch sizes a service runs
(1-64 images) launching them takes longer than running them (docs/benchmarks.md, "GPU"). A CUDA graph
records the launches once and replays them with one call. The graph is captured from the eager forward
itself, so it runs eager's kernels (cuBLAS, fused attention), unlike torch.compile's.

One graph per (batch bucket, input signature). Each owns static input buffers (images, per-sample
prompts); a call copies its rows into them, replays, and clones the rows it asked for out of the static
output. Prompts are inputs, not captured constants, so swapping a prompt set never re-captures; only a
new prompt shape (J, m) does. Rows past the call's batch hold whatever an earlier call left: every row of
a ViT forward is independent of the others, so they cannot change the rows read back.

All graphs share one memory pool: they replay one at a time on one stream, and each output is cloned
before the next replay can overwrite it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

WARMUP_RUNS = 2  # eager runs on a side stream before a capture (cuBLAS handles, workspaces, lazy inits)

Forward = Callable[[Tensor, Tensor | None], Tensor]


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    images: Tensor  # [bucket, 3, H, W], static
    prompts: Tensor | None  # [bucket, J, m, d_v], static
    output: Tensor  # [bucket, D], static


class CudaGraphs:
    """Replays of `forward(images, prompts)` on CUDA; call under the same autocast/inference mode as the capture."""

    def __init__(self, forward: Forward):
        self.forward = forward
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, _Captured] = {}

    def __call__(self, images: Tensor, prompts: Tensor | None, bucket: int) -> Tensor:
        """forward(images, prompts) for images [B <= bucket, ...] on the device (captured on first use)."""
        key = (bucket, images.dtype, tuple(images.shape[1:]),
               None if prompts is None else (prompts.dtype, tuple(prompts.shape[1:])))
        captured = self.graphs.get(key) or self._capture(key, images, prompts, bucket)
        batch = images.shape[0]
        captured.images[:batch].copy_(images)
        if prompts is not None:
            captured.prompts[:batch].copy_(prompts)
        captured.graph.replay()
        return captured.output[:batch].clone()

    def _capture(self, key: tuple, images: Tensor, prompts: Tensor | None, bucket: int) -> _Captured:
        static_images = images.new_zeros(bucket, *images.shape[1:])
        static_prompts = None if prompts is None else prompts.new_zeros(bucket, *prompts.shape[1:])
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                self.forward(static_images, static_prompts)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the engine's loader thread may run the text tower on the GPU during a capture (a hot swap
        # that brings a new prompt shape); that is not part of this graph and must not fail it
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            output = self.forward(static_images, static_prompts)
        captured = _Captured(graph, static_images, static_prompts, output)
        self.graphs[key] = captured
        return captured
