"""DeepLabV2 with a ResNet-101 backbone, the classic baseline of domain-adaptive segmentation."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from t2sda.models import Segmentor
from t2sda.models.recompute import checkpoint


class ASPPClassifier(nn.Module):
    """DeepLabV2's classifier: parallel dilated 3x3 convs straight to logits, summed.

    Unlike DeepLabV3's ASPP there is no BN, no fusion conv and no intermediate feature: each
    branch already predicts class scores at its own field of view.
    """

    def __init__(self, in_channels: int, num_classes: int,
                 dilations: tuple[int, ...] = (6, 12, 18, 24)):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=d, dilation=d) for d in dilations
        )
        for conv in self.branches:
            # The reference implementation's init: small logits at the start of training.
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        return sum(branch(x) for branch in self.branches)


class DeepLabV2(Segmentor):
    """ResNet-101 at output stride 8 (dilated layer3/4) + the ASPP classifier.

    The decoder feature is the backbone's last stage (2048 ch): DeepLabV2 has no decoder, and
    the classifier maps that feature linearly to logits, so it is the representation the
    classes are read from; pulling it towards source prototypes shapes the logits directly.
    """

    feature_dim = 2048
    output_stride = 8

    def __init__(self, num_classes: int, *, pretrained_timm: bool = False):
        super().__init__()
        import timm  # here: importing timm costs about a second that small_cnn runs need not pay

        self.backbone = timm.create_model(
            "resnet101", features_only=True, out_indices=(4,), output_stride=8,
            pretrained=pretrained_timm,
        )
        self.head = ASPPClassifier(self.feature_dim, num_classes)
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        # Per residual block of layer1-4 (timm's own flag would checkpoint whole stages, skip
        # layer4, and update BatchNorm statistics twice; see models/recompute.py).
        self.grad_checkpointing = enable

    def encode(self, image: Tensor) -> Tensor:
        x = self.normalise(image)
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            # The features_only wrapper is the stem then layer1..layer4 in order, layer4 last.
            for name, module in self.backbone.items():
                if name.startswith("layer"):
                    for block in module:
                        x = checkpoint(block, x)
                else:
                    x = module(x)
            return x
        (feature,) = self.backbone(x)  # (B, 2048, H/8, W/8)
        return feature

    def apply_head(self, head: nn.Module, features: Tensor) -> tuple[Tensor, Tensor]:
        return head(features), features

    def last_stage(self, features: Tensor) -> Tensor:
        return features

    def attention_head(self, out_channels: int) -> ASPPClassifier:
        return ASPPClassifier(self.feature_dim, out_channels)  # HRDA: a DeepLabV2 head

    def forward(self, image: Tensor, with_bottleneck: bool = False) -> tuple[Tensor, ...]:
        feature = self.encode(image)
        out = self.head(feature), feature  # logits (B, C, H/8, W/8)
        return (*out, feature) if with_bottleneck else out


def deeplabv2_r101(num_classes: int, *, pretrained_timm: bool = False) -> DeepLabV2:
    return DeepLabV2(num_classes, pretrained_timm=pretrained_timm)
