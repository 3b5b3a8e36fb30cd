"""DAFormer's ImageNet feature distance (Hoyer et al., CVPR 2022, Sec. 3.3).

The student's bottleneck features (the backbone's last stage) on source images are pulled
toward those of a frozen copy of the ImageNet-pretrained backbone, on feature pixels whose
(downscaled) source label is a "thing" class, so adaptation does not forget what ImageNet
taught about objects. As in DAFormer's dacs.py: the distance is the per-pixel L2 norm of the
difference, averaged over the masked pixels, and the label is downscaled by the ratio rule
(a cell takes its majority class when that class covers at least ``min_ratio`` of it).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

IGNORE = 255


def downscale_label_ratio(label: torch.Tensor, factor: int, *, min_ratio: float,
                          num_classes: int) -> torch.Tensor:
    """(B, H, W) train ids -> (B, H // factor, W // factor).

    Each ``factor`` x ``factor`` cell takes its most frequent value (ignore counts as a value
    of its own, and a cell whose majority is ignore stays ignore); a cell whose majority
    covers less than ``min_ratio`` of it becomes ignore (255). Ids >= ``num_classes`` count as
    ignore. Rows/columns beyond a whole number of cells are dropped. Ties go to the lower id.
    """
    if factor == 1:
        return torch.where(label < num_classes, label, IGNORE)
    b, h, w = label.shape
    gh, gw = h // factor, w // factor
    value = label[:, : gh * factor, : gw * factor].long()
    value = torch.where((value >= 0) & (value < num_classes), value, num_classes)  # ignore slot
    dev = label.device
    rows = torch.arange(gh * factor, device=dev) // factor
    cols = torch.arange(gw * factor, device=dev) // factor
    cell = rows[:, None] * gw + cols[None, :] + torch.arange(b, device=dev)[:, None, None] * gh * gw
    counts = torch.zeros(b * gh * gw * (num_classes + 1), device=dev)
    counts.index_add_(0, (cell * (num_classes + 1) + value).reshape(-1),
                      torch.ones(value.numel(), device=dev))
    counts = counts.view(b, gh, gw, num_classes + 1)
    top, out = counts.max(dim=-1)  # first maximum on ties
    out[(out == num_classes) | (top < min_ratio * factor * factor)] = IGNORE
    return out


def masked_feat_dist(student: torch.Tensor, frozen: torch.Tensor,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over pixels (those where ``mask`` (B, h, w) is True) of ||student - frozen||_2 over
    channels; features (B, C, h, w). With no masked pixel the result is 0 (still in the graph)."""
    dist = torch.linalg.vector_norm(student.float() - frozen.float(), dim=1)  # (B, h, w)
    if mask is None:
        return dist.mean()
    if not mask.any():
        return dist.sum() * 0.0
    return dist[mask].mean()


def feature_distance(student: torch.Tensor, frozen: torch.Tensor, label: torch.Tensor, *,
                     classes: tuple[int, ...], min_ratio: float, num_classes: int) -> torch.Tensor:
    """The FD loss on bottleneck features (B, C, h, w) for full-resolution labels (B, H, W)."""
    factor = max(label.shape[-1] // student.shape[-1], 1)
    small = downscale_label_ratio(label, factor, min_ratio=min_ratio, num_classes=num_classes)
    if small.shape[-2:] != student.shape[-2:]:  # sizes not a whole multiple: nearest cell
        small = nn.functional.interpolate(small[:, None].float(), size=student.shape[-2:],
                                          mode="nearest")[:, 0].long()
    wanted = torch.tensor(classes, device=label.device)
    mask = (small[..., None] == wanted).any(-1)
    return masked_feat_dist(student, frozen, mask)


class FrozenBackbone(nn.Module):
    """A frozen copy of a Segmentor's backbone (and its input normalisation): eval mode, no
    grad. ``forward(image in [0, 1])`` -> its bottleneck feature (the last stage)."""

    def __init__(self, segmentor: nn.Module):
        super().__init__()
        self.backbone = copy.deepcopy(segmentor.backbone)
        self.register_buffer("mean", segmentor.mean.clone(), persistent=False)
        self.register_buffer("std", segmentor.std.clone(), persistent=False)
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> FrozenBackbone:
        return super().train(False)  # BN statistics stay those of the pretrained weights

    @torch.no_grad()
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.backbone((image - self.mean) / self.std)[-1]
