"""The process group seen from anywhere: rank, world size, all-reduce, all-gather, a group from torchrun's environment.

Every helper works without a process group (one process: rank 0 of 1), so the same code runs on 1 or N
processes. Lightning's DDP strategies initialise the default group; `sample.py` uses `process_group`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _comm_device(t: Tensor) -> torch.device:
    """Where a collective on `t` runs: t's device, or the current CUDA device when the backend is NCCL."""
    if dist.get_backend() == "nccl" and t.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


def all_reduce(t: Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> Tensor:
    """All-reduce a copy of t (on a CUDA device when the backend is NCCL) and return it on t's device."""
    buf = t.to(_comm_device(t), copy=True)
    dist.all_reduce(buf, op=op)
    return buf.to(t.device)


def all_gather(t: Tensor) -> Tensor:
    """Every rank's `t` stacked in rank order, (world, *t.shape), on t's device (through CUDA with NCCL)."""
    dev = _comm_device(t)
    parts = [torch.empty_like(t, device=dev) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.to(dev).contiguous())
    return torch.stack(parts).to(t.device)


def all_reduce_sum_sync(x: Tensor, group: dist.ProcessGroup | None = None) -> list[Tensor]:
    """torchmetrics `dist_sync_fn` for sum-reduced states: one all_reduce, not an all_gather of world_size copies."""
    out = x.clone()
    dist.all_reduce(out, group=group)
    return [out]


@contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """A process group from torchrun's environment when WORLD_SIZE > 1 (NCCL on CUDA, else gloo)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()
