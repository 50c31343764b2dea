"""Multi-process training under torchrun: who am I, and the few collectives the loop needs.

No home-made cluster code: torchrun starts the processes and sets RANK, WORLD_SIZE, LOCAL_RANK.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and prints progress."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: str) -> DistributedContext:
    """Join the torchrun process group (NCCL on GPUs, gloo on CPUs), or run as a single process."""
    if not launched_by_torchrun():
        return DistributedContext()
    context = DistributedContext(
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return context


def device_for_rank(device: str, context: DistributedContext) -> str:
    """Each process on a multi-GPU machine takes its own GPU."""
    if context.enabled and device == "cuda":
        return f"cuda:{context.local_rank}"
    return device


def any_rank(flag: bool, context: DistributedContext, device: str) -> bool:
    """True on every rank if any rank says so: all ranks must stop at the same step."""
    if not context.enabled:
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item() > 0)


def mean_over_ranks(value: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    if not context.enabled:
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / context.world_size


def average_bn_statistics(model: nn.Module, context: DistributedContext) -> None:
    """Average BN running statistics over the ranks (every rank must call it).

    Without SyncBN (CPUs) each rank's statistics saw only its own share of the batches, and DDP's
    buffer broadcast at the next forward would keep rank 0's alone: the checkpoint should hold
    statistics of all the data. With SyncBN they are equal already, and stay so.
    """
    if not context.enabled:
        return
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            module.running_mean.copy_(mean_over_ranks(module.running_mean, context))
            module.running_var.copy_(mean_over_ranks(module.running_var, context))


def shutdown(context: DistributedContext) -> None:
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()
