"""Activation checkpointing that keeps BatchNorm's running statistics right.

``torch.utils.checkpoint`` recomputes a block's forward during the backward. In training mode
that second forward would update every BatchNorm's running mean and variance a second time per
step (a different EMA than the uncheckpointed model's). Here the recomputation normalises with
the batch statistics exactly as the first pass did but leaves the running statistics (and the
batch counter) alone, so checkpointing changes memory and time only, never the model.
"""

from __future__ import annotations

import contextlib

import torch
import torch.utils.checkpoint
from torch import Tensor, nn


@contextlib.contextmanager
def _running_stats_frozen(layers: list[nn.Module]):
    # Momentum 0 makes the update running <- running (the same saved tensors as the first
    # pass, which checkpoint verifies); the batch counter is put back afterwards.
    saved = [(layer.momentum, layer.num_batches_tracked.clone()
              if layer.num_batches_tracked is not None else None) for layer in layers]
    for layer in layers:
        layer.momentum = 0.0
    try:
        yield
    finally:
        for layer, (momentum, count) in zip(layers, saved, strict=True):
            layer.momentum = momentum
            if count is not None:
                layer.num_batches_tracked.copy_(count)


def checkpoint(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)`` whose activations are recomputed in the backward instead of stored."""
    if torch.compiler.is_compiling():
        # Under torch.compile the partitioner recomputes pure ops only; the running-stat
        # update is a mutation and is not replayed, so the plain form is already right.
        return torch.utils.checkpoint.checkpoint(module, x, use_reentrant=False)
    layers = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return torch.utils.checkpoint.checkpoint(
        module, x, use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), _running_stats_frozen(layers)))
