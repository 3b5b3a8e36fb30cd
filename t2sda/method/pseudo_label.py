"""Teacher pseudo labels with a confidence weight (DAFormer style)."""

from __future__ import annotations

import torch


@torch.no_grad()
def pseudo_label(
    logits: torch.Tensor,
    *,
    threshold: float,
    weight_mode: str = "fraction",
    ignore_top: int = 0,
    ignore_bottom: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Turn teacher logits (B, C, H, W) into labels, pixel weights and confidences.

    Returns ``label`` (B, H, W) int64 = argmax, ``weight`` (B, H, W) float and ``conf``
    (B, H, W) = max softmax probability. ``weight_mode``:
      - ``batch_fraction``: every pixel gets q = the fraction of the whole batch's pixels
        with conf >= threshold (DAFormer's ``dacs.py``: one q per batch).
      - ``fraction``: the same fraction per image: an unsure image counts less than a sure
        one in the same batch.
      - ``pixel``: 1 where conf >= threshold, else 0.
    Rows within ``ignore_top`` / ``ignore_bottom`` of the border get weight 0 (DAFormer drops
    the ego-car hood and the rectification border of Cityscapes crops this way).
    """
    prob = torch.softmax(logits.float(), dim=1)
    conf, label = prob.max(dim=1)
    confident = conf >= threshold
    if weight_mode == "batch_fraction":
        weight = torch.full_like(conf, confident.float().mean().item())
    elif weight_mode == "fraction":
        q = confident.flatten(1).float().mean(dim=1)  # (B,)
        weight = q[:, None, None].expand_as(conf).clone()
    elif weight_mode == "pixel":
        weight = confident.float()
    else:
        raise ValueError(f"unknown pseudo-label weight mode {weight_mode!r}")
    if ignore_top > 0:
        weight[:, :ignore_top] = 0.0
    if ignore_bottom > 0:
        weight[:, weight.shape[1] - ignore_bottom :] = 0.0
    return label, weight, conf
