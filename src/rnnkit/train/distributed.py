"""Data-parallel helpers on ``torch.distributed`` (gloo on CPU, NCCL on GPU), launched with torchrun.

rnnkit averages gradients with one all-reduce per optimizer step instead of wrapping the model in
``DistributedDataParallel``: truncated BPTT runs the task's forward several times per backward pass
(segments, gradient cuts, recomputation), which DDP's bucketed reducer does not allow, and a single
reduction after gradient accumulation is what DDP's ``no_sync`` would do anyway. The arithmetic is the
same: every rank holds identical parameters, and the gradient is the sum over ranks divided by the global
token (or item) count.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device: torch.device) -> tuple[int, int]:
    """Join the process group that torchrun describes in the environment; return (rank, world_size).

    Does nothing (returns (0, 1)) outside torchrun. Uses NCCL for CUDA devices, gloo otherwise.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if env_world_size() <= 1:
        return 0, 1
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy parameters and buffers of rank ``src`` to every rank."""
    if not active():
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src)


def all_reduce_grads(params: Iterable[nn.Parameter]) -> None:
    """Sum the gradients of ``params`` over ranks in place (missing gradients count as zero)."""
    if not active():
        return
    params = [p for p in params if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def all_reduce_sum(t: Tensor) -> Tensor:
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: object, src: int = 0) -> object:
    """Send a small Python object from ``src`` to every rank (in-process communication only)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: object) -> list[object]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not active():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


__all__ = ["init_from_env", "active", "broadcast_module", "all_reduce_grads", "all_reduce_sum",
           "broadcast_object", "gather_objects", "env_world_size"]
