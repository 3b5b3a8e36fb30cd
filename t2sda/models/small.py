"""A small plain CNN for the CPU presets (the 64x64 digit scenes), about 100k parameters.

Shape of the design, and why (timings: forward + backward, batch 32, 64x64, one CPU thread):

* Context is computed at stride 8, where 3x3 convs are cheap: two dilated convs (rates 2 and 4)
  give a receptive field of 111 px, enough to see a whole 28 px digit and its neighbours.
* Output stride 2 keeps thin strokes; the stride-2 stem feature supplies that detail through a
  1x1 projection that is added to the upsampled context. The fusion at stride 2 is linear (no
  BN / ReLU) on purpose: at that resolution memory-bound elementwise ops dominate CPU time
  (a BN + ReLU over the 64-ch feature would add about 8 ms to a step of about 28 ms).
* Activations are channels_last, which oneDNN runs about 1.5x faster than NCHW here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from t2sda.models import Segmentor


def conv_bn_relu(in_channels: int, out_channels: int, *, stride: int = 1,
                 dilation: int = 1) -> nn.Sequential:
    # No conv bias: the BN right after it has its own.
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=dilation,
                  dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SmallEncoder(nn.Module):
    """image -> (stem feature at stride 2, context feature at stride 8)."""

    def __init__(self, width: int):
        super().__init__()
        self.stem = conv_bn_relu(3, width // 2, stride=2)
        self.context = nn.Sequential(
            conv_bn_relu(width // 2, width, stride=2),  # stride 4
            conv_bn_relu(width, 2 * width, stride=2),  # stride 8
            conv_bn_relu(2 * width, 2 * width, dilation=2),
            conv_bn_relu(2 * width, 2 * width, dilation=4),
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        stem = self.stem(x)  # (B, W/2, H/2, W/2)
        return stem, self.context(stem)  # (B, 2W, H/8, W/8)


class SmallHead(nn.Module):
    """feature = upsample(context) + 1x1(stem) at stride 2; logits = 1x1(feature)."""

    def __init__(self, width: int, num_classes: int):
        super().__init__()
        self.detail = nn.Conv2d(width // 2, 2 * width, 1)
        self.classifier = nn.Conv2d(2 * width, num_classes, 1)

    def forward(self, stem: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        feature = self.detail(stem)  # (B, 2W, H/2, W/2)
        # In place: saves a full-resolution buffer, and neither op needs it for its backward.
        feature += F.interpolate(context, size=feature.shape[-2:], mode="bilinear",
                                 align_corners=False)
        return self.classifier(feature), feature


class SmallCNN(Segmentor):
    """Backbone: stem + context convs. Head: the stride-2 fusion and the classifier."""

    def __init__(self, num_classes: int, *, width: int = 32):
        super().__init__()
        if width < 2 or width % 2:
            raise ValueError(f"width must be an even number >= 2, got {width}")
        self.feature_dim = 2 * width
        self.output_stride = 2
        self.width = width
        self.backbone = SmallEncoder(width)
        self.head = SmallHead(width, num_classes)

    def encode(self, image: Tensor) -> tuple[Tensor, Tensor]:
        return self.backbone(self.normalise(image.contiguous(memory_format=torch.channels_last)))

    def apply_head(self, head: nn.Module, features: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        return head(*features)

    def last_stage(self, features: tuple[Tensor, Tensor]) -> Tensor:
        return features[1]

    def attention_head(self, out_channels: int) -> SmallHead:
        return SmallHead(self.width, out_channels)

    def forward(self, image: Tensor, with_bottleneck: bool = False) -> tuple[Tensor, ...]:
        # Outputs stay channels_last too; permute(0, 2, 3, 1) of them is free, .view() is not.
        image = image.contiguous(memory_format=torch.channels_last)
        stem, context = self.backbone(self.normalise(image))
        out = self.head(stem, context)  # logits (B, C, H/2, W/2), feature (B, 2W, H/2, W/2)
        return (*out, context) if with_bottleneck else out


def small_cnn(num_classes: int, *, width: int = 32, pretrained_timm: bool = False) -> SmallCNN:
    if pretrained_timm:
        raise ValueError("small_cnn has no timm weights; use pretrained='' or a checkpoint path")
    return SmallCNN(num_classes, width=width)
