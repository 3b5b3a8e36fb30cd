"""Reference networks and generated checkpoints in other codebases' formats, for the MiT /
DAFormer conversion tests and ``scripts/check_mit_equivalence.py``.

Nothing here uses t2sda.models.convert (only ``stage_errors`` calls the loader under test):
the SegFormer/mmseg names are produced from the
HuggingFace hub names by an independent inverse map, and DAFormer's head by its layer list.
"""

from __future__ import annotations

import re
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import Tensor

# name: (transformers SegformerConfig fields, timm model + kwargs computing the same function).
# timm's pvt_v2_b0..b4 use MLP ratios 8/8/4/4, MiT's are 4 everywhere (pvt_v2_b5 already is).
MIT = {
    "mit_b0": (dict(depths=[2, 2, 2, 2], hidden_sizes=[32, 64, 160, 256]),
               ("pvt_v2_b0", dict(mlp_ratios=(4, 4, 4, 4)))),
    "mit_b5": (dict(depths=[3, 6, 40, 3], hidden_sizes=[64, 128, 320, 512]), ("pvt_v2_b5", {})),
}


def segformer(name: str, *, seed: int = 0):
    """transformers' SegformerForImageClassification with MiT config ``name``, random weights
    (biases and norms too, so a swapped or dropped tensor shows in the output), eval mode."""
    from transformers import SegformerConfig, SegformerForImageClassification

    config = SegformerConfig(**MIT[name][0], num_attention_heads=[1, 2, 5, 8], num_labels=7)
    torch.manual_seed(seed)
    model = SegformerForImageClassification(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


def timm_backbone(name: str):
    variant, kwargs = MIT[name][1]
    return timm.create_model(variant, features_only=True, pretrained=False, **kwargs).eval()


def hub_state(model, folder: Path) -> dict[str, Tensor]:
    """Save with transformers' save_pretrained (the model hub's file format and key names)
    and read the tensors back."""
    from safetensors.torch import load_file

    model.save_pretrained(folder)
    return load_file(folder / "model.safetensors")


_HF_TO_MMSEG_BLOCK = {
    "layer_norm_1": "norm1", "layer_norm_2": "norm2", "attention.self.query": "attn.q",
    "attention.self.sr": "attn.sr", "attention.self.layer_norm": "attn.norm",
    "attention.output.dense": "attn.proj", "mlp.dense1": "mlp.fc1", "mlp.dense2": "mlp.fc2",
    "mlp.dwconv.dwconv": "mlp.dwconv.dwconv",
}


def mmseg_from_hub(hub: dict[str, Tensor]) -> dict[str, Tensor]:
    """SegFormer's own (mmseg) names for a hub state dict, as in ``mit_b5.pth``: stages count
    from 1, key and value are one ``kv`` linear, the ImageNet classifier is ``head``."""
    out = {}
    for hub_key, value in hub.items():
        key = hub_key.removeprefix("segformer.")
        if m := re.fullmatch(r"encoder\.patch_embeddings\.(\d)\.(proj|layer_norm)\.(\w+)", key):
            out[f"patch_embed{int(m[1]) + 1}.{'proj' if m[2] == 'proj' else 'norm'}.{m[3]}"] = value
        elif m := re.fullmatch(r"encoder\.layer_norm\.(\d)\.(\w+)", key):
            out[f"norm{int(m[1]) + 1}.{m[2]}"] = value
        elif m := re.fullmatch(r"encoder\.block\.(\d)\.(\d+)\.(.+)\.(weight|bias)", key):
            block = f"block{int(m[1]) + 1}.{m[2]}"
            if m[3] == "attention.self.key":
                value_half = hub[hub_key.replace(".self.key.", ".self.value.")]
                out[f"{block}.attn.kv.{m[4]}"] = torch.cat([value, value_half])
            elif m[3] != "attention.self.value":
                out[f"{block}.{_HF_TO_MMSEG_BLOCK[m[3]]}.{m[4]}"] = value
        elif m := re.fullmatch(r"classifier\.(\w+)", key):
            out[f"head.{m[1]}"] = value
        else:
            raise KeyError(key)
    return out


def hub_stage_features(model, image: Tensor) -> list[Tensor]:
    with torch.no_grad():
        return list(model.segformer(image, output_hidden_states=True).hidden_states)


def stage_errors(name: str, fmt: str, image: Tensor, tmp: Path) -> list[float]:
    """Max abs difference per stage between transformers' SegFormer ``name`` and the timm
    encoder loaded through t2sda's ``load_backbone`` from the same weights saved as ``fmt``:
    "hf" (a save_pretrained folder, as downloaded from the hub) or "mmseg" (``mit_b*.pth``)."""
    from t2sda.models import load_backbone

    hf = segformer(name)
    path = tmp / f"{name}_hub"
    hub = hub_state(hf, path)
    if fmt == "mmseg":
        path = tmp / f"{name}.pth"
        torch.save({"state_dict": mmseg_from_hub(hub)}, path)
    backbone = timm_backbone(name)
    load_backbone(backbone, path)
    with torch.no_grad():
        ours = backbone(image)
    theirs = hub_stage_features(hf, image)
    assert [o.shape for o in ours] == [t.shape for t in theirs]
    return [(o - t).abs().max().item() for o, t in zip(ours, theirs, strict=True)]


# DAFormer's DAFormerHead with the daformer_sepaspp_mitb5 fusion, as mmseg names its tensors.
def _conv_module(prefix: str, cin: int, cout: int, k: int, groups: int = 1) -> dict[str, Tensor]:
    return {f"{prefix}.conv.weight": torch.randn(cout, cin // groups, k, k) / (cin // groups * k * k) ** 0.5,
            f"{prefix}.bn.weight": 1 + 0.1 * torch.randn(cout), f"{prefix}.bn.bias": 0.1 * torch.randn(cout),
            f"{prefix}.bn.running_mean": 0.1 * torch.randn(cout),
            f"{prefix}.bn.running_var": 1 + torch.rand(cout),
            f"{prefix}.bn.num_batches_tracked": torch.tensor(1000)}


def daformer_head_state(in_channels, num_classes: int, embed: int = 256,
                        dilations=(1, 6, 12, 18)) -> dict[str, Tensor]:
    """Random tensors under DAFormer's real ``decode_head.*`` names and shapes."""
    state = {}
    for i, c in enumerate(in_channels):
        state[f"embed_layers.{i}.proj.weight"] = torch.randn(embed, c) / c ** 0.5
        state[f"embed_layers.{i}.proj.bias"] = 0.1 * torch.randn(embed)
    fused = embed * len(in_channels)
    for i, d in enumerate(dilations):
        base = f"fuse_layer.aspp_modules.{i}"
        if d == 1:
            state.update(_conv_module(base, fused, embed, 1))
        else:
            state.update(_conv_module(f"{base}.depthwise_conv", fused, fused, 3, groups=fused))
            state.update(_conv_module(f"{base}.pointwise_conv", fused, embed, 1))
    state.update(_conv_module("fuse_layer.bottleneck", embed * len(dilations), embed, 3))
    state["conv_seg.weight"] = torch.randn(num_classes, embed, 1, 1) / embed ** 0.5
    state["conv_seg.bias"] = 0.1 * torch.randn(num_classes)
    return {f"decode_head.{k}": v for k, v in state.items()}


def _cbr(x: Tensor, s: dict[str, Tensor], prefix: str, *, dilation: int = 1, groups: int = 1) -> Tensor:
    w = s[f"{prefix}.conv.weight"]
    x = F.conv2d(x, w, padding=dilation * (w.shape[-1] // 2), dilation=dilation, groups=groups)
    x = F.batch_norm(x, s[f"{prefix}.bn.running_mean"], s[f"{prefix}.bn.running_var"],
                     s[f"{prefix}.bn.weight"], s[f"{prefix}.bn.bias"], training=False, eps=1e-5)
    return F.relu(x)


def daformer_head_forward(state: dict[str, Tensor], features: list[Tensor],
                          dilations=(1, 6, 12, 18)) -> Tensor:
    """DAFormer's head (eval mode) computed straight from its mmseg-named tensors: a Linear
    per pixel per level, bilinear to stride 4, concat, sep-ASPP, 3x3 bottleneck, conv_seg."""
    s = {k.removeprefix("decode_head."): v for k, v in state.items()}
    size = features[0].shape[-2:]
    embedded = []
    for i, x in enumerate(features):
        b, _, h, w = x.shape
        x = F.linear(x.flatten(2).transpose(1, 2), s[f"embed_layers.{i}.proj.weight"],
                     s[f"embed_layers.{i}.proj.bias"]).transpose(1, 2).reshape(b, -1, h, w)
        embedded.append(F.interpolate(x, size=size, mode="bilinear", align_corners=False))
    x = torch.cat(embedded, dim=1)
    outs = []
    for i, d in enumerate(dilations):
        base = f"fuse_layer.aspp_modules.{i}"
        if d == 1:
            outs.append(_cbr(x, s, base))
        else:
            y = _cbr(x, s, f"{base}.depthwise_conv", dilation=d, groups=x.shape[1])
            outs.append(_cbr(y, s, f"{base}.pointwise_conv"))
    x = _cbr(torch.cat(outs, dim=1), s, "fuse_layer.bottleneck")
    return F.conv2d(x, s["conv_seg.weight"], s["conv_seg.bias"])
