"""Dynamic class re-weighting: focus the pull on the classes that currently under-perform."""

from __future__ import annotations

import torch

from t2sda import dist


class ClassWeighter:
    """Keeps a per-class score a_c (EMA of IoU or confidence) and turns it into weights.

    w_c ∝ (1 - a_c)^gamma, normalised to mean 1 over the classes seen so far; unseen classes
    get 1. Statistics are all-reduced, so every DDP rank computes identical weights.
    """

    def __init__(self, num_classes: int, *, mode: str, momentum: float, gamma: float,
                 ignore_index: int = 255, device=None):
        self.num_classes = num_classes
        self.mode = mode
        self.momentum = momentum
        self.gamma = gamma
        self.ignore_index = ignore_index
        self.score = torch.zeros(num_classes, device=device)  # a_c
        self.seen = torch.zeros(num_classes, dtype=torch.bool, device=device)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, label: torch.Tensor) -> None:
        """Fold in one batch: student logits (B, C, H, W) and ground truth (B, H, W)."""
        if self.mode == "uniform":
            return
        c = self.num_classes
        valid = label != self.ignore_index
        target = label[valid]
        if self.mode == "iou":
            pred = logits.argmax(dim=1)[valid]
            inter = torch.bincount(target[pred == target], minlength=c).float()
            area_pred = torch.bincount(pred, minlength=c).float()
            area_true = torch.bincount(target, minlength=c).float()
            stats = dist.all_reduce_sum(torch.stack([inter, area_pred + area_true - inter, area_true]))
            present = stats[2] > 0
            value = stats[0] / stats[1].clamp_min(1)
        else:  # confidence: mean probability the student gives the true class
            prob = torch.softmax(logits.float(), dim=1).permute(0, 2, 3, 1)[valid]
            p_true = prob.gather(1, target[:, None]).squeeze(1)
            sums = torch.zeros(c, device=logits.device).index_add_(0, target, p_true)
            stats = dist.all_reduce_sum(torch.stack([sums, torch.bincount(target, minlength=c).float()]))
            present = stats[1] > 0
            value = stats[0] / stats[1].clamp_min(1)
        m = self.momentum
        blended = torch.where(self.seen, m * self.score + (1 - m) * value, value)
        self.score = torch.where(present, blended, self.score)
        self.seen |= present

    def weights(self, blend: float = 1.0) -> torch.Tensor:
        """(C,) weights: (1 - blend) * uniform + blend * dynamic; mean 1 over seen classes."""
        ones = torch.ones(self.num_classes, device=self.score.device)
        if self.mode == "uniform" or not self.seen.any():
            return ones
        raw = (1.0 - self.score).clamp_min(1e-3) ** self.gamma
        dynamic = torch.where(self.seen, raw / raw[self.seen].mean(), ones)
        return (1.0 - blend) * ones + blend * dynamic

    def state_dict(self) -> dict:
        return {"score": self.score.cpu(), "seen": self.seen.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.score = state["score"].to(self.score.device)
        self.seen = state["seen"].to(self.seen.device)
