"""The projection head of the contrastive "pull" loss."""

from __future__ import annotations

from torch import Tensor, nn


class ProjectionHead(nn.Module):
    """Per-pixel MLP (1x1 conv -> ReLU -> 1x1 conv) from decoder features to the loss's space.

    Training-only and kept outside the Segmentor: as in SimCLR-style contrastive learning the
    loss acts on a projection, so the decoder feature is shaped without being forced onto the
    unit sphere, and inference needs the segmenter alone.
    The output is not normalised; the loss normalises it.
    """

    def __init__(self, in_dim: int, out_dim: int = 128):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_dim, in_dim, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_dim, out_dim, 1),
        )

    def forward(self, feature: Tensor) -> Tensor:
        return self.net(feature)  # (B, in_dim, h, w) -> (B, out_dim, h, w)
