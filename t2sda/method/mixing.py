"""ClassMix (source classes pasted onto target images) and the strong augmentation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def class_mix_mask(label: torch.Tensor, *, ignore_index: int = 255) -> torch.Tensor:
    """(B, H, W) labels -> (B, 1, H, W) float mask of a random half of each image's classes.

    Half is rounded up, so an image with one class pastes it. Ignore pixels are never
    chosen: the mixed image shows the target there.
    """
    masks = []
    for image_label in label:
        classes = image_label.unique()
        classes = classes[classes != ignore_index]
        order = torch.randperm(len(classes), device=label.device)
        chosen = classes[order[: (len(classes) + 1) // 2]]
        masks.append(torch.isin(image_label, chosen))
    return torch.stack(masks)[:, None].float()


def mix(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mask * a + (1 - mask) * b, broadcasting a (B, 1, H, W) mask over channels.

    Labels (B, H, W) are mixed with the mask's channel dimension squeezed.
    """
    if a.dim() == 3:
        mask = mask[:, 0]
    return torch.where(mask.bool(), a, b)


def _blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur with a per-image sigma (B,), as two separable depthwise convolutions."""
    b, c, h, w = images.shape
    radius = max(int(3 * float(sigma.max())), 1)
    x = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (x[None] / sigma[:, None].to(images.dtype)) ** 2)  # (B, K)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)
    flat = images.reshape(1, b * c, h, w)
    flat = F.pad(flat, (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=b * c)
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=b * c)
    return flat.reshape(b, c, h, w)


def strong_augment(
    images: torch.Tensor, *, jitter: float = 0.2, p_jitter: float = 0.8, p_blur: float = 0.5
) -> torch.Tensor:
    """Colour jitter (brightness, contrast, saturation) and Gaussian blur, random per image.

    (B, 3, H, W) in [0, 1] -> same. Geometry is untouched, so labels stay valid.
    """
    b = images.shape[0]
    dev, dt = images.device, images.dtype

    def factor() -> torch.Tensor:  # (B, 1, 1, 1): 1 for images that skip the jitter
        on = torch.rand(b, device=dev) < p_jitter
        f = 1.0 + (torch.rand(b, device=dev) * 2 - 1) * jitter
        return torch.where(on, f, torch.ones_like(f)).to(dt)[:, None, None, None]

    out = images * factor()  # brightness
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * factor() + mean  # contrast
    grey = out.mean(dim=1, keepdim=True)
    out = (out - grey) * factor() + grey  # saturation
    out = out.clamp(0.0, 1.0)
    blur = torch.rand(b, device=dev) < p_blur
    if blur.any():
        sigma = torch.empty(b, device=dev).uniform_(0.15, 1.15)
        out = out.index_put((blur,), _blur(out[blur], sigma[blur]))  # blur only those chosen
    return out
