"""Key maps from other codebases' MiT and DAFormer checkpoints to t2sda's module names.

``daformer_mitb5``'s encoder is timm's ``pvt_v2_b5`` (features_only), which computes the same
function as SegFormer's MiT-B5; only the parameter names differ:

    SegFormer / mmseg (mit_b5.pth)      HuggingFace (segformer.encoder.*)       timm features_only
    patch_embed1.{proj,norm}            patch_embeddings.0.{proj,layer_norm}    patch_embed.{proj,norm}
    patch_embed{i+1}.{proj,norm}        patch_embeddings.i.{proj,layer_norm}    stages_i.downsample.*
    block{i+1}.j.norm1 / norm2          block.i.j.layer_norm_1 / layer_norm_2   stages_i.blocks.j.norm1/2
    block{i+1}.j.attn.q                 ...attention.self.query                 ...attn.q
    block{i+1}.j.attn.kv                ...attention.self.key ++ value          ...attn.kv
    block{i+1}.j.attn.sr / attn.norm    ...attention.self.sr / .layer_norm      ...attn.sr / attn.norm
    block{i+1}.j.attn.proj              ...attention.output.dense               ...attn.proj
    block{i+1}.j.mlp.fc1 / fc2          ...mlp.dense1 / dense2                  ...mlp.fc1 / fc2
    block{i+1}.j.mlp.dwconv.dwconv      ...mlp.dwconv.dwconv                    ...mlp.dwconv
    norm{i+1}                           layer_norm.i                            stages_i.norm

The maps are generic over depths, so MiT-B0..B5 map onto pvt_v2_b0..b5 alike. A released
DAFormer checkpoint (mmseg ``backbone.*`` + ``decode_head.*``) maps onto the whole segmentor:
see :func:`daformer_head_key` for the head.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

State = dict[str, Tensor]

# Classification heads of ImageNet backbone files, and decode heads of segmentation files, are
# not part of a backbone: a backbone load drops them by name (and only them).
BACKBONE_IGNORED = ("head.", "classifier.", "decode_head.", "auxiliary_head.")
# DAFormer's UDA checkpoints hold three networks; "model" (the student) is what DAFormer's own
# test.py evaluates, "ema_model" is the mean teacher, "imnet_model" the frozen ImageNet copy
# for the feature distance.
ROLES = {"student": "model.", "teacher": "ema_model."}


class ConversionError(ValueError):
    """A checkpoint that does not map onto the model; the message is one line."""


def checkpoint_format(state: State) -> str:
    """"mmseg" (SegFormer's MiT names), "hf" (HuggingFace SegFormer) or "timm" (anything else)."""
    if any(re.match(r"(patch_embed\d|block\d)\.", k) for k in state):
        return "mmseg"
    if any(k.removeprefix("segformer.").startswith(("encoder.block.", "encoder.patch_embeddings."))
           for k in state):
        return "hf"
    return "timm"


def _stage(number: str, one_based: bool) -> str:
    return f"stages_{int(number) - one_based}"


# HuggingFace block-relative names -> timm's, first matching prefix wins.
_HF_BLOCK = (
    ("layer_norm_1.", "norm1."), ("layer_norm_2.", "norm2."),
    ("attention.self.query.", "attn.q."), ("attention.self.sr.", "attn.sr."),
    ("attention.self.layer_norm.", "attn.norm."), ("attention.output.dense.", "attn.proj."),
    ("mlp.dense1.", "mlp.fc1."), ("mlp.dense2.", "mlp.fc2."), ("mlp.dwconv.dwconv.", "mlp.dwconv."),
)
_MMSEG_INNER = ("norm1.", "norm2.", "attn.q.", "attn.kv.", "attn.proj.", "attn.sr.", "attn.norm.",
                "mlp.fc1.", "mlp.fc2.", "mlp.dwconv.dwconv.")


def mit_key(key: str, fmt: str) -> str | None:
    """The timm features_only name of one MiT parameter, or None if ``key`` is not one.

    HuggingFace's ``attention.self.key`` / ``value`` map to the half-names ``attn.k`` /
    ``attn.v``; :func:`convert_mit` concatenates them into timm's ``attn.kv``.
    """
    if fmt == "mmseg":
        if m := re.fullmatch(r"patch_embed(\d)\.(proj|norm)\.(\w+)", key):
            first = m[1] == "1"
            prefix = "patch_embed" if first else f"{_stage(m[1], True)}.downsample"
            return f"{prefix}.{m[2]}.{m[3]}"
        if m := re.fullmatch(r"norm(\d)\.(weight|bias)", key):
            return f"{_stage(m[1], True)}.norm.{m[2]}"
        if m := re.fullmatch(r"block(\d)\.(\d+)\.(.+)", key):
            if not m[3].startswith(_MMSEG_INNER):
                return None
            inner = m[3].replace("mlp.dwconv.dwconv.", "mlp.dwconv.")
            return f"{_stage(m[1], True)}.blocks.{m[2]}.{inner}"
        return None
    key = key.removeprefix("segformer.")
    if m := re.fullmatch(r"encoder\.patch_embeddings\.(\d)\.(proj|layer_norm)\.(\w+)", key):
        part = "proj" if m[2] == "proj" else "norm"
        prefix = "patch_embed" if m[1] == "0" else f"{_stage(m[1], False)}.downsample"
        return f"{prefix}.{part}.{m[3]}"
    if m := re.fullmatch(r"encoder\.layer_norm\.(\d)\.(weight|bias)", key):
        return f"{_stage(m[1], False)}.norm.{m[2]}"
    if m := re.fullmatch(r"encoder\.block\.(\d)\.(\d+)\.(.+)", key):
        inner = m[3]
        half = re.fullmatch(r"attention\.self\.(key|value)\.(weight|bias)", inner)
        if half:
            inner = f"attn.{half[1][0]}.{half[2]}"
        else:
            for old, new in _HF_BLOCK:
                if inner.startswith(old):
                    inner = new + inner[len(old):]
                    break
            else:
                return None
        return f"{_stage(m[1], False)}.blocks.{m[2]}.{inner}"
    return None


def convert_mit(state: State, fmt: str) -> tuple[State, dict[str, str]]:
    """Rename a SegFormer-format MiT state dict to timm features_only names.

    Returns (converted state, timm name -> checkpoint name). Keys under BACKBONE_IGNORED are
    dropped; any other key that is not a MiT parameter raises ConversionError naming it.
    """
    out: State = {}
    source: dict[str, str] = {}
    for key, value in state.items():
        if key.removeprefix("segformer.").startswith(BACKBONE_IGNORED):
            continue
        new = mit_key(key, fmt)
        if new is None:
            raise ConversionError(f"checkpoint key {key!r} is not a MiT ({fmt}) backbone parameter")
        out[new], source[new] = value, key
    # HuggingFace keeps key and value apart; timm (like mmseg) has one kv = [key; value] linear.
    for half_k in [k for k in out if ".attn.k." in k]:
        half_v = half_k.replace(".attn.k.", ".attn.v.")
        if half_v not in out:
            raise ConversionError(f"checkpoint has {source[half_k]!r} but not its value half")
        kv = half_k.replace(".attn.k.", ".attn.kv.")
        out[kv] = torch.cat([out.pop(half_k), out.pop(half_v)], dim=0)
        source[kv] = source.pop(half_k).replace(".key.", ".key+value.")
        source.pop(half_v)
    for half_v in [k for k in out if ".attn.v." in k]:
        raise ConversionError(f"checkpoint has {source[half_v]!r} but not its key half")
    return out, source


def check_state(own: State, state: State, source: dict[str, str]) -> None:
    """Raise ConversionError (one line) on the first missing key, unexpected key or shape
    mismatch between a converted ``state`` and a module's own state dict ``own``."""
    for key in state:
        if key not in own:
            raise ConversionError(f"unexpected key {source.get(key, key)!r} "
                                  f"(as {key!r}; the model has no such parameter)")
    for key, value in own.items():
        if key not in state:
            raise ConversionError(f"missing key {key!r} (the checkpoint has no tensor for it)")
        if state[key].shape != value.shape:
            raise ConversionError(f"key {source.get(key, key)!r} has shape "
                                  f"{tuple(state[key].shape)}, the model's {key!r} has {tuple(value.shape)}")


def select_role(state: State, role: str = "student") -> State:
    """The ``model.*`` (student) or ``ema_model.*`` (teacher) network of a DAFormer-family UDA
    checkpoint, prefix removed; other state dicts are returned unchanged."""
    if not any(k.startswith(tuple(ROLES.values())) for k in state):
        return state
    prefix = ROLES[role]
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def daformer_head_key(key: str) -> str | None:
    """The ``DAFormerHead`` name of one parameter of DAFormer's mmseg ``DAFormerHead`` with the
    ``daformer_sepaspp_mitb5`` fusion (aspp, sep=True, dilations 1/6/12/18, pool=False), or None.

    Layer for layer: ``embed_layers.i.proj`` (a Linear on flattened pixels) is ``embed.i`` (a 1x1
    conv); ``fuse_layer.aspp_modules.0`` (ConvModule 1x1) is ``aspp.0``; ``aspp_modules.k``
    (DepthwiseSeparableConvModule) is ``aspp.k`` = (depthwise, pointwise); ``fuse_layer.
    bottleneck`` is ``bottleneck``; ``conv_seg`` is ``classifier``. mmcv's ConvModule holds
    ``conv`` then ``bn``, our Sequentials hold them as ``0`` and ``1``.
    """
    unit = {"conv": "0", "bn": "1"}
    if m := re.fullmatch(r"embed_layers\.(\d+)\.proj\.(weight|bias)", key):
        return f"embed.{m[1]}.{m[2]}"
    if m := re.fullmatch(r"fuse_layer\.aspp_modules\.(\d+)\.(conv|bn)\.(\w+)", key):
        return f"aspp.{m[1]}.{unit[m[2]]}.{m[3]}"
    if m := re.fullmatch(r"fuse_layer\.aspp_modules\.(\d+)\.(depthwise|pointwise)_conv\.(conv|bn)"
                         r"\.(\w+)", key):
        part = "0" if m[2] == "depthwise" else "1"
        return f"aspp.{m[1]}.{part}.{unit[m[3]]}.{m[4]}"
    if m := re.fullmatch(r"fuse_layer\.(conv|bn)\.(\w+)", key):  # HRDA's attention: a 1x1 fusion
        return f"aspp.0.{unit[m[1]]}.{m[2]}"
    if m := re.fullmatch(r"fuse_layer\.bottleneck\.(conv|bn)\.(\w+)", key):
        return f"bottleneck.{unit[m[1]]}.{m[2]}"
    if m := re.fullmatch(r"conv_seg\.(weight|bias)", key):
        return f"classifier.{m[1]}"
    return None


def is_mmseg_segmentor(state: State) -> bool:
    """A DAFormer-family (mmseg) segmentor state dict: ``backbone.*`` and ``decode_head.*``
    keys, bare or under the UDA prefixes ``model.`` / ``ema_model.``."""
    prefixes = ("", *ROLES.values())
    return (any(k.startswith(tuple(p + "backbone.block" for p in prefixes)) for k in state)
            and any(k.startswith(tuple(p + "decode_head." for p in prefixes)) for k in state))


HRDA_HEADS = {"decode_head.head.": "base.head.", "decode_head.scale_attention.": "scale_attention."}


def is_hrda(state: State) -> bool:
    """An HRDA / MIC release: its decode head is HRDA's (``decode_head.head.*`` and
    ``decode_head.scale_attention.*``), bare or under the UDA prefixes."""
    return any("decode_head.scale_attention." in k for k in state)


def convert_segmentor(state: State, role: str = "student") -> tuple[State, dict[str, str]]:
    """A DAFormer-family segmentor state dict as ``daformer_mitb5``'s (``backbone.*`` and
    ``head.*``), or an HRDA / MIC one as ``daformer_mitb5`` with model.hrda (``base.backbone.*``,
    ``base.head.*``, ``scale_attention.*``); the ``role`` network of a UDA checkpoint. Returns
    (state, our name -> theirs). Raises ConversionError naming the first key that does not map.
    """
    uda = any(k.startswith(tuple(ROLES.values())) for k in state)
    picked = select_role(state, role)
    if not picked:
        raise ConversionError(f"no {ROLES[role]}* ({role}) weights in this UDA checkpoint")
    prefix = ROLES[role] if uda else ""
    backbone = {k[len("backbone."):]: v for k, v in picked.items() if k.startswith("backbone.")}
    out, mit_source = convert_mit(backbone, "mmseg")
    out = {f"backbone.{k}": v for k, v in out.items()}
    source = {f"backbone.{k}": f"{prefix}backbone.{v}" for k, v in mit_source.items()}
    rest = {k: v for k, v in picked.items() if not k.startswith("backbone.")}
    unknown = next((k for k in rest if not k.startswith("decode_head.")), None)
    if unknown is not None:
        raise ConversionError(f"checkpoint key {prefix + unknown!r} is neither backbone.* nor decode_head.*")
    if not is_hrda(picked):
        head, head_source = convert_daformer_head({k[len("decode_head."):]: v for k, v in rest.items()},
                                                  prefix=f"{prefix}decode_head.")
        out.update({f"head.{k}": v for k, v in head.items()})
        source.update({f"head.{k}": v for k, v in head_source.items()})
        return out, source
    out = {f"base.{k}": v for k, v in out.items()}  # HRDA wraps the network as ``base``
    source = {f"base.{k}": v for k, v in source.items()}
    for theirs, ours in HRDA_HEADS.items():
        part = {k[len(theirs):]: v for k, v in rest.items() if k.startswith(theirs)}
        head, head_source = convert_daformer_head(part, prefix=prefix + theirs)
        out.update({ours + k: v for k, v in head.items()})
        source.update({ours + k: v for k, v in head_source.items()})
    unknown = next((k for k in rest if not k.startswith(tuple(HRDA_HEADS))), None)
    if unknown is not None:
        raise ConversionError(f"checkpoint key {prefix + unknown!r} is not part of HRDA's head "
                              "(decode_head.head.*, decode_head.scale_attention.*)")
    return out, source


def convert_daformer_head(state: State, *, prefix: str = "decode_head.") -> tuple[State, dict[str, str]]:
    """DAFormer's mmseg head tensors (names without ``decode_head.``) as ``DAFormerHead``'s.
    Returns (state, our name -> theirs, ``prefix`` added back for messages)."""
    out: State = {}
    source: dict[str, str] = {}
    for key, value in state.items():
        new = daformer_head_key(key)
        if new is None:
            raise ConversionError(f"checkpoint key {prefix + key!r} does not map onto DAFormerHead "
                                  "(DAFormer's sep-ASPP head and HRDA's scale attention map; for "
                                  "another head load the backbone with model.pretrained=PATH)")
        if new.startswith("embed.") and new.endswith("weight"):
            value = value[:, :, None, None]  # Linear (out, in) -> 1x1 conv (out, in, 1, 1)
        out[new], source[new] = value, prefix + key
    return out, source
