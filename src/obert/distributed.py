"""The few collective operations obert needs when training runs on several processes (DDP).

Every function is the identity on a single process, so the same code runs everywhere.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Processes in the job (from the launcher's environment before the process group exists)."""
    return dist.get_world_size() if _initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return dist.get_rank() if _initialized() else int(os.environ.get("RANK", "0"))


def process_group() -> tuple[int, int]:
    """``(world size, rank)`` of the initialised process group; ``(1, 0)`` without one."""
    return (dist.get_world_size(), dist.get_rank()) if _initialized() else (1, 0)


def finish() -> None:
    """Leave the process group once every process is done (a no-op without one): destroyed at
    interpreter exit instead, its communication threads can abort the process."""
    if _initialized():
        if world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process (nothing to wait for on one)."""
    if _initialized() and world_size() > 1:
        dist.barrier()


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over processes in place (CPU tensors work on gloo, CUDA ones on nccl)."""
    if _initialized() and world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast(t: Tensor, src: int = 0) -> Tensor:
    """Overwrite ``t`` on every process with rank ``src``'s value (bool tensors go as uint8)."""
    if _initialized() and world_size() > 1:
        if t.dtype == torch.bool:
            buf = t.to(torch.uint8)
            dist.broadcast(buf, src)
            t.copy_(buf.bool())
        else:
            dist.broadcast(t, src)
    return t
