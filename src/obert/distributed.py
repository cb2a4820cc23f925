"""The few collective operations obert needs when training runs on several processes (DDP).

Every function is the identity on a single process, so the same code runs everywhere.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over processes in place (CPU tensors work on gloo, CUDA ones on nccl)."""
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast(t: Tensor, src: int = 0) -> Tensor:
    """Overwrite ``t`` on every process with rank ``src``'s value (bool tensors go as uint8)."""
    if world_size() > 1:
        if t.dtype == torch.bool:
            buf = t.to(torch.uint8)
            dist.broadcast(buf, src)
            t.copy_(buf.bool())
        else:
            dist.broadcast(t, src)
    return t


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
