"""onnxruntime sessions for the image tower: execution providers and session options (the `onnx` extra)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnxruntime as ort
import torch

log = logging.getLogger(__name__)

CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"
Provider = str | tuple[str, dict[str, Any]]


def provider_names(providers: Sequence[Provider]) -> list[str]:
    return [p if isinstance(p, str) else p[0] for p in providers]


def providers_for(device: torch.device) -> list[Provider]:
    """CUDA (on the backbone's GPU) when the backbone is on CUDA and onnxruntime has it, else CPU."""
    if device.type == "cuda":
        if CUDA_EP in ort.get_available_providers():
            return [(CUDA_EP, {"device_id": device.index or 0}), CPU_EP]
        log.warning("the backbone is on CUDA but onnxruntime has no CUDA execution provider (install "
                    "onnxruntime-gpu): the onnx backend runs on the CPU")
    return [CPU_EP]


def open_session(graph: bytes | Path, providers: Sequence[Provider],
                 threads: int | None = None) -> ort.InferenceSession:
    """An onnxruntime session with full graph optimisation (`threads`: intra-op threads, None = one per
    physical core); warns if CUDA was asked for but not granted."""
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise here
    session = ort.InferenceSession(graph if isinstance(graph, bytes) else str(graph), options,
                                   providers=list(providers))
    if CUDA_EP in provider_names(providers) and CUDA_EP not in session.get_providers():
        log.warning("onnxruntime could not start its CUDA provider (CUDA/cuDNN libraries?); running on the CPU")
    return session
