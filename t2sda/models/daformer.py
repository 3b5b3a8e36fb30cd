"""DAFormer: a MiT-B5 encoder with the context-aware fusion decoder (Hoyer et al., CVPR 2022).

timm has no SegFormer "MiT", but its ``pvt_v2_b5`` is essentially the same network (overlapping
patch embeddings, spatial-reduction attention, Mix-FFN with a depthwise conv; channels 64/128/
320/512 at strides 4/8/16/32), so it stands in for MiT-B5 and can load timm's ImageNet weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from t2sda.models import Segmentor


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 1, *,
                 dilation: int = 1, groups: int = 1) -> nn.Sequential:
    # No conv bias: the BN right after it has its own.
    padding = dilation * (kernel_size // 2)
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation,
                  groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def aspp_branch(in_channels: int, out_channels: int, dilation: int) -> nn.Sequential:
    """A 1x1 conv for dilation 1, else a depthwise-separable dilated 3x3 (mmcv's
    DepthwiseSeparableConvModule: BN + ReLU after both the depthwise and the pointwise conv)."""
    if dilation == 1:
        return conv_bn_relu(in_channels, out_channels, 1)
    return nn.Sequential(
        conv_bn_relu(in_channels, in_channels, 3, dilation=dilation, groups=in_channels),
        conv_bn_relu(in_channels, out_channels, 1),
    )


class DAFormerHead(nn.Module):
    """Embed each stage to ``embed_dim``, upsample to stride 4, concatenate, then fuse with
    parallel depthwise-separable ASPP branches and a 3x3 bottleneck.

    DAFormer's fusion ("aspp", sep=True, dilations 1/6/12/18, pool=False) reads context at several
    rates across all scales at once, which its ablation found better for adaptation than
    SegFormer's all-MLP head. As in DAFormer there is no image-pooling branch.
    """

    def __init__(self, in_channels: tuple[int, ...], num_classes: int, *, embed_dim: int = 256,
                 dilations: tuple[int, ...] = (1, 6, 12, 18), dropout: float = 0.1,
                 fusion: str = "aspp"):
        super().__init__()
        # DAFormer's "mlp" embedding: a linear layer per pixel, no norm / activation.
        self.embed = nn.ModuleList(nn.Conv2d(c, embed_dim, 1) for c in in_channels)
        fused = embed_dim * len(in_channels)
        if fusion == "conv":  # HRDA's scale attention: one 1x1 conv + BN + ReLU, no bottleneck
            self.aspp = nn.ModuleList([conv_bn_relu(fused, embed_dim, 1)])
            self.bottleneck = nn.Identity()
        else:
            self.aspp = nn.ModuleList(aspp_branch(fused, embed_dim, d) for d in dilations)
            self.bottleneck = conv_bn_relu(embed_dim * len(dilations), embed_dim, 3)
        self.dropout = nn.Dropout2d(dropout)  # mmseg's decode-head dropout before the classifier
        self.classifier = nn.Conv2d(embed_dim, num_classes, 1)
        nn.init.normal_(self.classifier.weight, std=0.01)  # mmseg's init for the final conv
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features: list[Tensor]) -> tuple[Tensor, Tensor]:
        size = features[0].shape[-2:]  # stride 4
        embedded = []
        for embed, x in zip(self.embed, features, strict=True):
            x = embed(x)  # (B, E, H/s, W/s)
            if x.shape[-2:] != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            embedded.append(x)
        x = torch.cat(embedded, dim=1)  # (B, 4E, H/4, W/4)
        x = torch.cat([branch(x) for branch in self.aspp], dim=1)  # (B, len(dilations) E, ...)
        feature = self.bottleneck(x)  # (B, E, H/4, W/4)
        return self.classifier(self.dropout(feature)), feature


class DAFormer(Segmentor):
    feature_dim = 256
    output_stride = 4

    def __init__(self, num_classes: int, *, pretrained_timm: bool = False):
        super().__init__()
        import timm  # here: importing timm costs about a second that small_cnn runs need not pay

        self.backbone = timm.create_model(
            "pvt_v2_b5", features_only=True, out_indices=(0, 1, 2, 3), pretrained=pretrained_timm
        )
        channels = tuple(self.backbone.feature_info.channels())  # (64, 128, 320, 512)
        self.head = DAFormerHead(channels, num_classes, embed_dim=self.feature_dim)
        self.channels = channels

    def attention_head(self, out_channels: int) -> DAFormerHead:
        # HRDA: the DAFormer head with its ASPP fusion replaced by a 1x1 conv (embed dim 256)
        return DAFormerHead(self.channels, out_channels, embed_dim=256, fusion="conv")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        # timm's per-block checkpointing inside each of the four stages (the features_only
        # wrapper's own flag would checkpoint whole stages and skip the first and last).
        # The MiT / PVTv2 blocks hold LayerNorms only, so the recomputation is exact.
        for module in self.backbone.modules():
            if module is not self.backbone and hasattr(module, "grad_checkpointing"):
                module.grad_checkpointing = enable

    def forward(self, image: Tensor, with_bottleneck: bool = False) -> tuple[Tensor, ...]:
        features = self.backbone(self.normalise(image))  # 4 maps at strides 4, 8, 16, 32
        out = self.head(features)  # logits (B, C, H/4, W/4), feature (B, 256, H/4, W/4)
        return (*out, features[-1]) if with_bottleneck else out


def daformer_mitb5(num_classes: int, *, pretrained_timm: bool = False) -> DAFormer:
    return DAFormer(num_classes, pretrained_timm=pretrained_timm)
