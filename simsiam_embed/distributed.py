"""Multi-process training under torchrun: who am I, and the few collectives the loop needs.

No home-made cluster code: torchrun starts the processes and sets RANK, WORLD_SIZE, LOCAL_RANK.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from simsiam_embed.errors import UserError


#: How long a collective may wait for the slowest rank. Rank 0 scans the whole folder while the
#: others wait in a broadcast: NCCL's default of 10 minutes failed a run on a few million files
#: (gloo's is 30). A rank that fails exits with its error and torchrun ends the others, so a
#: long wait costs only a rank that hangs.
COLLECTIVE_TIMEOUT = timedelta(hours=2)


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
    """Join the torchrun process group (NCCL on GPUs, gloo on CPUs), or run as a single process.

    On GPUs each process binds its own GPU *before* the group exists: otherwise every rank's
    first CUDA call (NCCL's, or the pin-memory thread's) creates a context on GPU 0.
    """
    if not launched_by_torchrun():
        return DistributedContext()
    context = DistributedContext(
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )
    if not dist.is_initialized():
        if device.startswith("cuda"):
            own_gpu = torch.device(device_for_rank(device, context))
            torch.cuda.set_device(own_gpu)
            dist.init_process_group(backend="nccl", device_id=own_gpu, timeout=COLLECTIVE_TIMEOUT)
        else:
            dist.init_process_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)
    return context


@contextlib.contextmanager
def distributed_session(device: str) -> Iterator[DistributedContext]:
    """:func:`init_distributed` for a block; the group is destroyed at its end if the block made it
    (a library call made under torchrun leaves no process group behind)."""
    made_here = launched_by_torchrun() and not dist.is_initialized()
    context = init_distributed(device)
    try:
        yield context
    finally:
        if made_here and dist.is_initialized():
            dist.destroy_process_group()


def device_for_rank(device: str, context: DistributedContext) -> str:
    """Each process on a multi-GPU machine takes the GPU of its LOCAL_RANK."""
    if context.enabled and device.startswith("cuda"):
        if device not in ("cuda", f"cuda:{context.local_rank}"):
            raise UserError(f"--device {device} under torchrun would put every process on one GPU: pass --device "
                            "cuda (each process takes its LOCAL_RANK's GPU; choose GPUs with CUDA_VISIBLE_DEVICES)")
        return f"cuda:{context.local_rank}"
    return device


def agree_on_every_rank(flag: bool, what: str, context: DistributedContext, device: str) -> None:
    """One line on every rank, instead of a hang, when ranks see different things: on several
    machines, a workspace that is not on a shared filesystem."""
    if not context.enabled:
        return
    seen = torch.tensor([1.0 if flag else 0.0], device=device)
    low, high = seen.clone(), seen.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if low.item() != high.item():
        raise UserError(f"the processes disagree on {what} (this is rank {context.rank}: {flag}): with several "
                        "machines, the workspace must be on a filesystem they all share")


def gather_to_main(value: Any, context: DistributedContext) -> list[Any]:
    """Every rank's ``value`` (picklable, between this job's own processes), on rank 0; [] elsewhere."""
    if not context.enabled:
        return [value]
    gathered: list[Any] = [None] * context.world_size if context.is_main else []
    dist.gather_object(value, gathered if context.is_main else None, dst=0)
    return gathered


def from_main(value: Any, context: DistributedContext) -> Any:
    """Rank 0's ``value`` (picklable, between this job's own processes) on every rank."""
    if not context.enabled:
        return value
    holder = [value if context.is_main else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def any_rank(flag: bool, context: DistributedContext, device: str) -> bool:
    """True on every rank if any rank says so: all ranks must stop at the same step."""
    if not context.enabled:
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item() > 0)


def value_of_main(value: int, context: DistributedContext, device: str) -> int:
    """Rank 0's ``value`` on every rank: decisions that must agree (how many steps a time budget
    allows) are taken on one clock, not on each rank's own."""
    if not context.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(tensor, src=0)
    return int(tensor.item())


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
