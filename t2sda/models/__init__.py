"""Segmentation models: a flat registry of name -> factory, in the style of timm.

Every model is a ``Segmentor``: it takes images in [0, 1], normalises them itself and returns
``(logits, feature)`` at the same reduced resolution; the caller upsamples the logits.

    model = build_model("daformer_mitb5", num_classes=19, pretrained="timm")
    model = MODELS["small_cnn"](num_classes=11, width=48)  # factory keywords beyond build_model's
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Segmentor(nn.Module):
    """Base class. Subclasses put the encoder in ``self.backbone`` and every other parameter in
    ``self.head``, so ``param_groups`` partitions the parameters for the "head lr x10" rule and
    ``pretrained=<path>`` knows which module a backbone checkpoint belongs to.

    ``forward(image (B, 3, H, W) in [0, 1])`` returns logits (B, C, h, w) and the decoder feature
    (B, feature_dim, h, w) at the model's output stride; ``forward(image, with_bottleneck=True)``
    adds the backbone's last-stage feature (what ``self.backbone(...)[-1]`` gives), for
    DAFormer's ImageNet feature distance.
    """

    feature_dim: int
    output_stride: int  # input pixels per logit pixel
    backbone: nn.Module
    head: nn.Module

    def __init__(self) -> None:
        super().__init__()
        # Normalising inside the model keeps data pipelines and augmentations in [0, 1] pixel
        # space; non-persistent buffers follow .to(device) but stay out of checkpoints.
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def normalise(self, image: Tensor) -> Tensor:
        return (image - self.mean) / self.std

    # The forward in two halves, for wrappers that run the head more than once or another head
    # on the same features (HRDA, models/hrda.py): encode(image) -> backbone features;
    # decode(features) = apply_head(self.head, features) -> (logits, feature).
    def encode(self, image: Tensor):
        return self.backbone(self.normalise(image))

    def decode(self, features) -> tuple[Tensor, Tensor]:
        return self.apply_head(self.head, features)

    def apply_head(self, head: nn.Module, features) -> tuple[Tensor, Tensor] | Tensor:
        return head(features)

    def last_stage(self, features) -> Tensor:
        """The backbone's last-stage feature among ``encode``'s output (the FD bottleneck)."""
        return features[-1]

    def attention_head(self, out_channels: int) -> nn.Module:
        """A new head of this model's kind (HRDA's scale attention) with ``out_channels``
        outputs, applied with ``apply_head``; its first (or only) output is the map."""
        raise NotImplementedError(f"{type(self).__name__} has no HRDA scale-attention head")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the backbone's activations in the backward (training with grad only)."""
        raise NotImplementedError(f"{type(self).__name__} has no activation checkpointing")

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(backbone parameters, head parameters)."""
        return list(self.backbone.parameters()), list(self.head.parameters())


# The model modules subclass Segmentor, so they are imported only once it exists.
from t2sda.models import convert  # noqa: E402
from t2sda.models.daformer import daformer_mitb5  # noqa: E402
from t2sda.models.deeplabv2 import deeplabv2_r101  # noqa: E402
from t2sda.models.small import small_cnn  # noqa: E402

MODELS: dict[str, Callable[..., Segmentor]] = {
    "deeplabv2_r101": deeplabv2_r101,
    "daformer_mitb5": daformer_mitb5,
    "small_cnn": small_cnn,
}


def build_model(name: str, *, num_classes: int, pretrained: str = "",
                hrda: dict | None = None) -> Segmentor:
    """Build a registered model.

    pretrained: "" random init; "timm" timm's ImageNet weights (downloaded by timm when the hub
    is reachable); anything else is a path to a backbone checkpoint (.pth/.pt/.safetensors).
    hrda: keyword arguments of :class:`t2sda.models.hrda.HRDA` to wrap the model in (HRDA's
    multi-resolution training and inference), or None.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(MODELS))}")
    model = MODELS[name](num_classes=num_classes, pretrained_timm=pretrained == "timm")
    if pretrained not in ("", "timm"):
        load_backbone(model.backbone, pretrained)
    if hrda is not None:
        from t2sda.models.hrda import HRDA

        model = HRDA(model, num_classes=num_classes, **hrda)
    return model


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a checkpoint file (.pth/.pt/.bin/.safetensors), or of a HuggingFace model
    folder's ``model.safetensors`` / ``pytorch_model.bin``, unwrapped from "state_dict" / "model"."""
    path = Path(path)
    if path.is_dir():
        files = [path / name for name in ("model.safetensors", "pytorch_model.bin")]
        if not any(f.is_file() for f in files):
            raise FileNotFoundError(f"{path}: a folder without model.safetensors or pytorch_model.bin")
        path = next(f for f in files if f.is_file())
    if not path.is_file():
        raise FileNotFoundError(f"pretrained backbone checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def load_backbone(backbone: nn.Module, path: str | Path) -> None:
    """Load a backbone state dict from ``path`` into ``backbone``.

    timm names (full model or features_only, "module." / "backbone." prefixes, i.e. also a whole
    Segmentor's state dict) load non-strictly: missing / unexpected counts are logged, and it
    raises if nothing matches. SegFormer's MiT files (mmseg ``mit_b5.pth``, HuggingFace
    ``segformer.encoder.*``, DAFormer-family ``backbone.*``, the student of a UDA checkpoint)
    are renamed by :mod:`t2sda.models.convert` and load strictly: every backbone tensor, no
    unexpected key but the classification / decode heads, every shape equal.
    """
    state = convert.select_role(read_state_dict(path))
    state = {_strip_prefixes(k): v for k, v in state.items()}
    fmt = convert.checkpoint_format(state)
    own = backbone.state_dict()
    if fmt != "timm":
        try:
            state, source = convert.convert_mit(state, fmt)
            convert.check_state(own, state, source)
        except convert.ConversionError as err:
            raise ValueError(f"{path} ({fmt} MiT names): {err}") from None
        backbone.load_state_dict(state)
        log.info("loaded all %d backbone tensors from %s (%s MiT names)", len(state), path, fmt)
        return
    matched: dict[str, Tensor] = {}
    for key in own:
        # timm's features_only wrapper flattens nested Sequentials ("stages.0" -> "stages_0"),
        # so a checkpoint of the full timm model names the same tensor differently.
        source_key = key if key in state else _full_model_key(key)
        if source_key in state:
            matched[key] = state.pop(source_key)
    bad_shapes = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}"
                  for k, v in matched.items() if v.shape != own[k].shape]
    if bad_shapes:
        raise ValueError(f"{path}: {len(bad_shapes)} backbone tensors have the wrong shape, "
                         f"e.g. {bad_shapes[:3]}")
    missing = [k for k in own if k not in matched]
    if not matched:
        raise ValueError(f"{path}: no key matches the backbone ({len(state)} checkpoint keys, "
                         f"e.g. {list(state)[:3]}; backbone keys e.g. {list(own)[:3]})")
    backbone.load_state_dict(matched, strict=False)
    log.info("loaded %d backbone tensors from %s", len(matched), path)
    if missing or state:
        log.warning("backbone checkpoint %s: %d missing keys (e.g. %s), %d unexpected keys "
                    "(e.g. %s)", path, len(missing), missing[:3], len(state), list(state)[:3])


def _strip_prefixes(key: str) -> str:
    for prefix in ("module.", "backbone."):
        key = key.removeprefix(prefix)
    return key


def _full_model_key(key: str) -> str:
    """"stages_0.blocks.0.norm1.weight" -> "stages.0.blocks.0.norm1.weight"."""
    first, dot, rest = key.partition(".")
    parent, _, child = first.rpartition("_")
    return f"{parent}.{child}{dot}{rest}" if parent else key
