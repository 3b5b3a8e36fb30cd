"""The projection head of the contrastive "pull" loss."""

from __future__ import annotations

from torch import Tensor, nn


class ProjectionHead(nn.Module):
    """Per-pixel MLP (linear -> ReLU -> linear) from decoder features to the loss's space.

    Training-only and kept outside the Segmentor: as in SimCLR-style contrastive learning the
    loss acts on a projection, so the decoder feature is shaped without being forced onto the
    unit sphere, and inference needs the segmenter alone. It runs on the *sampled* pixels
    only, (n, in_dim) -> (n, out_dim), never on whole feature maps: projecting every pixel
    would cost more than the rest of the step on small models. The output is not normalised;
    the loss normalises it.
    """

    def __init__(self, in_dim: int, out_dim: int = 128):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, in_dim),
            nn.ReLU(inplace=True),
            nn.Linear(in_dim, out_dim),
        )

    def forward(self, pixels: Tensor) -> Tensor:
        return self.net(pixels)  # (n, in_dim) -> (n, out_dim)
