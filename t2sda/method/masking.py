"""MIC's masked image consistency (Hoyer et al., CVPR 2023): hide random square blocks of the
target image; the student must still predict the teacher's pseudo labels of the whole image.

The mask is drawn on a grid of ``block``-pixel cells (``round(side / block)`` cells per side,
at least one); each cell stays visible with probability ``1 - ratio`` and the grid is
nearest-upsampled to the image. Hidden pixels take the value the model's normalisation maps
to 0 (the ImageNet mean colour): MIC multiplies the *normalised* image by the mask, and our
images reach the model in [0, 1] and are normalised inside it (t2sda/models).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def block_mask(batch: int, height: int, width: int, *, ratio: float, block: int,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, 1, H, W) float mask, 1 = visible, 0 = hidden; one torch.rand call (seeded runs
    repeat it)."""
    grid = (max(round(height / block), 1), max(round(width / block), 1))
    visible = (torch.rand(batch, 1, *grid, device=device) > ratio).float()
    return F.interpolate(visible, size=(height, width), mode="nearest")


def mask_image(images: torch.Tensor, mask: torch.Tensor, mean: tuple[float, ...]) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] with hidden pixels set to the model's normalisation ``mean``
    colour (0 once normalised)."""
    fill = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return torch.where(mask.bool(), images, fill)
