"""Process-group set-up for data-parallel training under `torchrun` (gloo on CPU, nccl on GPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as td


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank, world size and its device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    active: bool = False  # in a torchrun process group (any world size): DDP and collective reductions

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun (with any number of processes, so that one
    GPU runs the nccl + DDP path too), else a single process.

    `device`: "auto" (cuda when available), "cpu" or "cuda". Under torchrun each rank takes
    cuda:<LOCAL_RANK>.
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if not launched_by_torchrun():
        return DistInfo(device=torch.device("cuda" if use_cuda else "cpu"))
    world = int(os.environ["WORLD_SIZE"])
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
    if not td.is_initialized():
        td.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local, torch.device(f"cuda:{local}" if use_cuda else "cpu"), active=True)


def all_reduce_sum(tensor: torch.Tensor, dist: DistInfo) -> torch.Tensor:
    """Sum over ranks (a copy on the rank's device for nccl, returned on the input's device)."""
    if not dist.active:
        return tensor
    work = tensor.to(dist.device)
    td.all_reduce(work, op=td.ReduceOp.SUM)
    return work.to(tensor.device)


def barrier(dist: DistInfo) -> None:
    if dist.active:
        td.barrier()


def shutdown(dist: DistInfo) -> None:
    if dist.active and td.is_initialized():
        td.destroy_process_group()
