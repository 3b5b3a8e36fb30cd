"""Mean teacher: an exponential moving average of the student (segmentor + projection head)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from t2sda import dist


class EMATeacher(nn.Module):
    """EMA copy of the *unwrapped* student, built before DDP so every rank holds the same one.

    The teacher never trains: it stays in eval mode (BatchNorm uses its averaged running
    statistics, dropout is off) and has no gradients.
    """

    def __init__(self, student: nn.Module):
        super().__init__()
        self.model = copy.deepcopy(student)
        self.model.requires_grad_(False)
        self.model.eval()

    def train(self, mode: bool = True) -> EMATeacher:  # the teacher never leaves eval mode
        super().train(False)
        return self

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    @torch.no_grad()
    def update(self, student: nn.Module, *, momentum: float) -> None:
        """theta_t <- momentum * theta_t + (1 - momentum) * theta_s, buffers included.

        Float buffers (BN running statistics) are averaged like weights, then averaged over DDP
        ranks (each rank's student BN saw a different batch shard, so they would drift apart);
        integer ones (BN's batch counter) are copied.
        """
        teacher_params = list(self.model.parameters())
        student_params = [p.detach() for p in student.parameters()]
        torch._foreach_lerp_(teacher_params, student_params, 1.0 - momentum)
        for t_buf, s_buf in zip(self.model.buffers(), student.buffers(), strict=True):
            if t_buf.dtype.is_floating_point:
                t_buf.lerp_(s_buf, 1.0 - momentum)
            else:
                t_buf.copy_(s_buf)
        dist.all_reduce_mean_([b for b in self.model.buffers() if b.dtype.is_floating_point])
