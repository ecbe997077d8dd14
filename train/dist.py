"""Distributed setup from torchrun's environment, falling back to one process.

    ctx = setup()            # ctx.rank, ctx.local_rank, ctx.world_size, ctx.device
    print0(ctx, "only rank 0 prints")
    cleanup()

The global rank chooses the data; the local rank chooses the GPU. nccl on GPUs, gloo on the CPU.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device: str = "auto") -> DistContext:
    """Join the process group when launched by torchrun (RANK set), else a world of one.
    `device`: "auto" (cuda if available), "cpu" or "cuda"."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but no GPU is available.")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        check_gpus(local, int(os.environ.get("LOCAL_WORLD_SIZE", local + 1)), torch.cuda.device_count())
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return DistContext(rank, local, world, dev)


def check_gpus(local_rank: int, local_world: int, gpus: int) -> None:
    """One GPU per local rank. Checked on every rank before joining the group: a rank that asked
    for a missing GPU would fail alone ("invalid device ordinal") while the others wait in
    init_process_group until torchrun's timeout."""
    if max(local_world, local_rank + 1) > gpus:
        raise RuntimeError(f"{max(local_world, local_rank + 1)} ranks on this machine but {gpus} GPU(s): "
                           f"start at most {gpus} (torchrun --nproc_per_node {gpus}), or pass --device cpu.")


def cleanup() -> None:
    """Collect first: a DDP reducer kept by a reference cycle would otherwise go with its gloo work
    at interpreter shutdown, where a rank once aborted ("terminate called without an active
    exception") after a finished run."""
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


def print0(ctx: DistContext, *args, **kwargs) -> None:
    if ctx.main:
        print(*args, **kwargs, flush=True)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place; a no-op in a world of one."""
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
