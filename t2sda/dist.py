"""Distributed helpers that are no-ops without a process group (single process, CPU tests)."""

from __future__ import annotations

import gc
import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (and return it), so every rank holds the total."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean_(tensors: list[torch.Tensor]) -> None:
    """Average floating ``tensors`` over ranks in place (one flattened all-reduce; no-op alone).

    Used for the teacher's BatchNorm statistics: each rank's student sees its own batch shard, so
    without this the EMA of its running stats differs between ranks.
    """
    if not is_distributed() or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def float_buffers(module: torch.nn.Module) -> torch.Tensor:
    """The module's floating buffers (BatchNorm running stats) as one flat tensor, for drift checks."""
    bufs = [b.detach().reshape(-1) for b in module.buffers() if b.dtype.is_floating_point]
    return torch.cat(bufs).float() if bufs else torch.zeros(1)


def record_broadcast_buffers(ddp: torch.nn.parallel.DistributedDataParallel) -> None:
    """Keep, at each training forward, the wrapped module's buffers as DDP has just broadcast them.

    DDP copies rank 0's buffers to every rank before each forward with gradients, then each
    rank's BatchNorm updates its running stats from its own batch shard: the buffers *after* a
    step differ by design, the ones DDP hands the forward must not. A forward pre-hook on the
    inner module runs after that broadcast; ``ddp.broadcast_buffers_seen`` holds its copy.
    """
    def hook(module, args):
        if torch.is_grad_enabled():  # evaluation (no_grad) calls the inner module directly
            ddp.broadcast_buffers_seen = float_buffers(module)

    ddp.broadcast_buffers_seen = None
    ddp.module.register_forward_pre_hook(hook)


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (picklable objects; identity without a process group)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return model.module if hasattr(model, "module") else model


def init_from_env(device_type: str) -> bool:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1).

    NCCL for CUDA, gloo for CPU. Returns whether this process is now part of a group.
    """
    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return is_distributed()
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return True


def shutdown(*, wait: bool) -> None:
    """Leave the process group cleanly (``wait``: first let every rank finish its work).

    Exiting with gloo's threads still alive can abort the process at interpreter shutdown, and
    so can a DistributedDataParallel wrapper that outlives its group: its reducer, kept alive
    by reference cycles (forward hooks), is then destroyed during interpreter teardown and
    aborts the process ("terminate called without an active exception") about one exit in
    ten on gloo. Collecting it here, while the group still exists, avoids that.
    """
    if is_distributed():
        gc.collect()
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def max_rank_difference(tensor: torch.Tensor) -> float:
    """Largest |x_r - x_0| over ranks r and elements: 0 when every rank holds the same tensor.

    DDP replicas must stay bit-identical (same init, all-reduced gradients, same EMA and class
    weights); a non-zero value means a rank has drifted.
    """
    if not is_distributed():
        return 0.0
    gathered = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return max((g - gathered[0]).abs().max().item() for g in gathered)
