"""HRDA: multi-resolution training and inference around any registered Segmentor
(Hoyer et al., ECCV 2022; docs/METHOD.md, "HRDA").

A training image (the *context crop*) is seen twice: downscaled by ``context_scale`` (0.5) as a
whole, and at full resolution inside a *detail crop* of side ``detail_crop`` (512 in 1024 px
crops). The same encoder and head predict both; a second head of the model's kind, the *scale
attention*, reads the context features and gives a sigmoid weight per class (or one per pixel)
for the detail prediction. Fused logits at the detail prediction's resolution:

    fused = up(a) * detail_in_place + up((1 - a) * context_logits)

with ``a`` zero outside the detail crop during training (there is no detail prediction there)
and ``detail_in_place`` the detail logits written into their crop location (zeros elsewhere);
``up`` is bilinear by 1 / context_scale. Without a detail box (inference, pseudo labels) the
detail logits cover the whole image from overlapping ``detail_crop`` windows at stride
``detail_stride`` (HRDA: crop / 2), averaged where they overlap, and ``a`` is not masked.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from t2sda.models import Segmentor


def downscale(image: Tensor, scale: float) -> Tensor:
    """Bilinear resize by ``scale`` (HRDA's context image); scale 1 returns the image."""
    if scale == 1:
        return image
    return F.interpolate(image, scale_factor=scale, mode="bilinear", align_corners=False)


def slide_boxes(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """HRDA's detail windows (y0, y1, x0, x1): a grid at ``stride``, the last row and column
    moved back inside the image; one window for an image no larger than ``crop``."""
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y1, x1 = min(r * stride + crop, height), min(c * stride + crop, width)
            boxes.append((max(y1 - crop, 0), y1, max(x1 - crop, 0), x1))
    return boxes


def draw_boxes(parts: int, per_part: int, *, height: int, width: int, crop: int,
               divisible: int) -> Tensor:
    """Random detail-crop corners (parts * per_part, 2) as (y0, x0), one draw per part shared by
    its ``per_part`` images (HRDA draws one box per forward of a batch), multiples of
    ``divisible`` so the box falls on whole pixels of the context logits. On the CPU (from
    torch's seeded generator): the corners are Python numbers to the code that crops."""
    high = torch.tensor([(max(height - crop, 0) + 1) // divisible,
                         (max(width - crop, 0) + 1) // divisible])
    corners = (torch.rand(parts, 2) * high).floor().long() * divisible
    return corners.repeat_interleave(per_part, dim=0)


def crop_each(x: Tensor, boxes: Tensor, size: int, *, scale: int = 1) -> Tensor:
    """Per-image crops (B, ..., size, size) of x (B, ..., H, W) at corners ``boxes // scale``."""
    corners = (boxes // scale).tolist()
    return torch.stack([x[i, ..., y:y + size, c:c + size] for i, (y, c) in enumerate(corners)])


class HRDA(Segmentor):
    """A Segmentor (``self.base``) trained and run HRDA's way; see the module docstring.

    ``forward(image)``: HRDA inference, (fused logits (B, C, H/os, W/os), context decoder
    feature (B, D, H*s/os, W*s/os)[, context last-stage feature]). ``forward(image, detail_box=
    (B, 2) corners)``: the training forward, which also returns the detail logits (B, C,
    crop/os, crop/os) as the third output. ``context_only=True``: the base model on the context
    image alone (logits, feature[, last stage]), for what needs no detail (the pull's keys).
    """

    def __init__(self, base: Segmentor, *, num_classes: int, context_scale: float = 0.5,
                 detail_crop: int = 512, detail_stride: int = 0, classwise: bool = True):
        super().__init__()
        os_ = base.output_stride
        divisible = os_ / context_scale
        if not divisible.is_integer() or detail_crop % divisible or detail_crop <= 0:
            raise ValueError(f"model.hrda_detail_crop={detail_crop}: must be a multiple of the "
                             f"output stride / context scale = {divisible:g}")
        self.base = base
        self.scale_attention = base.attention_head(num_classes if classwise else 1)
        self.feature_dim, self.output_stride = base.feature_dim, os_
        self.context_scale, self.detail_crop = context_scale, detail_crop
        self.detail_stride = detail_stride or detail_crop // 2
        self.divisible = int(divisible)  # HRDA's crop_coord_divisible (8 for DAFormer at 0.5)

    @property
    def backbone(self) -> nn.Module:  # what FD's frozen copy and pretrained weights address
        return self.base.backbone

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        backbone, head = self.base.param_groups()
        return backbone, head + list(self.scale_attention.parameters())  # HRDA: head lr x10 too

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.base.set_grad_checkpointing(enable)

    def encode(self, image: Tensor):
        return self.base.encode(image)

    def last_stage(self, features) -> Tensor:
        return self.base.last_stage(features)

    def detail_logits(self, image: Tensor) -> Tensor:
        """Detail logits over the whole image (B, C, H/os, W/os) from overlapping windows, run
        as one batch, averaged where they overlap (HRDA's ``hr_slide_inference``)."""
        b, (h, w), os_ = image.shape[0], image.shape[-2:], self.output_stride
        boxes = slide_boxes(h, w, self.detail_crop, self.detail_stride)
        crops = torch.cat([image[:, :, y0:y1, x0:x1] for y0, y1, x0, x1 in boxes])
        logits = self.base.decode(self.base.encode(crops))[0]
        out = logits.new_zeros(b, logits.shape[1], h // os_, w // os_)
        count = logits.new_zeros(1, 1, h // os_, w // os_)
        for i, (y0, y1, x0, x1) in enumerate(boxes):
            out[:, :, y0 // os_:y1 // os_, x0 // os_:x1 // os_] += logits[i * b:(i + 1) * b]
            count[:, :, y0 // os_:y1 // os_, x0 // os_:x1 // os_] += 1
        return out / count

    def forward(self, image: Tensor, with_bottleneck: bool = False, *, detail_box: Tensor | None = None,
                context_only: bool = False) -> tuple[Tensor, ...]:
        features = self.base.encode(downscale(image, self.context_scale))
        context, feature = self.base.decode(features)
        extra = (self.base.last_stage(features),) if with_bottleneck else ()
        if context_only:
            return (context, feature, *extra)
        attention = self.base.apply_head(self.scale_attention, features)
        attention = torch.sigmoid(attention[0] if isinstance(attention, tuple) else attention)
        os_ = self.output_stride
        size = (image.shape[-2] // os_, image.shape[-1] // os_)
        if detail_box is None:
            detail = placed = self.detail_logits(image)
        else:
            detail = self.base.decode(self.base.encode(crop_each(image, detail_box, self.detail_crop)))[0]
            side = self.detail_crop // self.divisible  # the crop in context-logit pixels
            inside = torch.zeros_like(attention[:, :1])
            placed = detail.new_zeros(detail.shape[0], detail.shape[1], *size)
            for i, (y, x) in enumerate(detail_box.tolist()):
                inside[i, :, y // self.divisible:, x // self.divisible:][..., :side, :side] = 1
                placed[i, :, y // os_:, x // os_:][..., :detail.shape[-2], :detail.shape[-1]] = detail[i]
            attention = attention * inside
        up = dict(size=size, mode="bilinear", align_corners=False)
        fused = (F.interpolate(attention, **up) * placed
                 + F.interpolate((1 - attention) * context, **up))
        if detail_box is None:
            return (fused, feature, *extra)
        return (fused, feature, detail, *extra)
