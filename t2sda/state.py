"""What one training run holds: student, teacher, optimizer and the method's running state."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from t2sda import dist, perf
from t2sda.config import Config, ConfigError
from t2sda.dist import unwrap
from t2sda.method.class_weights import ClassWeighter
from t2sda.method.feature_distance import FrozenBackbone
from t2sda.method.pull_loss import PrototypeBank
from t2sda.method.style import StyleLoadError, StyleRandomizer
from t2sda.method.teacher import EMATeacher
from t2sda.models import build_model
from t2sda.models.proj import ProjectionHead, gather_pixels


class Network(nn.Module):
    """Segmentor plus the training-only projection head: the module DDP wraps."""

    def __init__(self, segmentor: nn.Module, proj: nn.Module | None):
        super().__init__()
        self.segmentor = segmentor
        self.proj = proj

    def forward(self, image: torch.Tensor, pick: Callable | None = None,
                with_bottleneck: bool = False, **options) -> tuple[torch.Tensor, ...]:
        """image (B, 3, H, W) in [0, 1] -> logits (B, C, h, w) and projected pixels (n, P).

        ``pick((h, w)) -> index (n,)`` chooses pixels of the flattened (B*h*w) feature map to
        project; it runs inside forward, once the feature size is known, so the projection
        head is part of the graph DDP sees. Without ``pick`` (or a head) the second output is
        None. ``with_bottleneck`` appends the backbone's last-stage feature (a third output).
        ``options`` go to the segmentor (HRDA's ``detail_box``, ``context_only``; the HRDA
        training forward's detail logits come before the last-stage feature).
        """
        logits, feature, *bottleneck = self.segmentor(image, with_bottleneck=with_bottleneck,
                                                      **options)
        projected = None
        if pick is not None and self.proj is not None:
            index = pick(tuple(feature.shape[-2:]))
            projected = self.proj(gather_pixels(feature, index, consumer=logits))
        return (logits, projected, *bottleneck)


@dataclasses.dataclass
class TrainState:
    student: nn.Module  # Network, possibly wrapped in DistributedDataParallel
    teacher: EMATeacher
    optimizer: torch.optim.Optimizer
    bank: PrototypeBank | None
    weighter: ClassWeighter
    num_classes: int
    step: int = 0
    # Frozen helpers, rebuilt from the config at every start, never checkpointed.
    style: StyleRandomizer | None = None  # method.translate=style
    imnet: FrozenBackbone | None = None  # method.fd_weight > 0: the pretrained backbone
    lr_scaling: str = "none"  # optim.lr_scaling: how the lr follows the number of workers

    def state_dict(self) -> dict:
        return {
            "student": unwrap(self.student).state_dict(),
            "teacher": self.teacher.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "bank": self.bank.state_dict() if self.bank is not None else None,
            "weighter": self.weighter.state_dict(),
            "step": self.step,
            "world_size": dist.world_size(),  # the lr above was scaled for this many workers
        }

    def load_state_dict(self, state: dict) -> None:
        unwrap(self.student).load_state_dict(state["student"])
        self.teacher.model.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._rescale_lr(state.get("world_size") or dist.world_size())
        if self.bank is not None and state["bank"] is not None:
            self.bank.load_state_dict(state["bank"])
        self.weighter.load_state_dict(state["weighter"])
        self.step = state["step"]

    def _rescale_lr(self, saved_world: int) -> None:
        """An elastic run resumed on another number of workers keeps each worker's batch, so
        its global batch changes: the lr the checkpoint holds (scaled for ``saved_world``
        workers) is rescaled by ``optim.lr_scaling`` for the workers there are now."""
        factor = lr_scale(self.lr_scaling, dist.world_size()) / lr_scale(self.lr_scaling, saved_world)
        if factor != 1.0:
            for group in self.optimizer.param_groups:
                group["initial_lr"] *= factor
                group["lr"] *= factor


def lr_scale(rule: str, world_size: int) -> float:
    """Learning-rate factor for a global batch ``world_size`` times the per-process one."""
    return {"none": 1.0, "linear": float(world_size), "sqrt": world_size**0.5}[rule]


def uses_pull(cfg: Config) -> bool:
    return cfg.method.pull_weight > 0


def pull_dim(cfg: Config, feature_dim: int) -> int:
    """Size of the features the pull compares (the projection's, or the decoder feature's)."""
    return feature_dim if cfg.method.pull_feature == "decoder" else cfg.model.proj_dim


def adamw_impl(device: torch.device) -> dict[str, bool]:
    """AdamW implementation flags for `device`: one fused kernel on CUDA, multi-tensor (foreach) elsewhere.

    The fused CUDA kernel updates every parameter in one launch instead of one per tensor; on CPU the
    fused kernel is not faster than foreach, which batches the per-tensor ops. Both give the same
    update as the default loop within float tolerance.
    """
    if device.type == "cuda":
        return {"fused": True}
    return {"foreach": True}


def build_state(cfg: Config, *, num_classes: int, device: torch.device, wrap=None) -> TrainState:
    """Build everything from ``cfg`` with the model initialised from ``cfg.seed``.

    ``wrap`` (e.g. DDP or Ray's ``prepare_model``) is applied to the student only, after the
    teacher has been copied from the unwrapped student, so all ranks start identical.
    """
    torch.manual_seed(cfg.seed)
    try:
        segmentor = build_model(cfg.model.name, num_classes=num_classes,
                                pretrained=cfg.model.pretrained, hrda=cfg.model.hrda_options())
    except Exception as err:  # a missing or mismatched file, or no way to reach timm's hub
        if str(err).startswith("model.hrda"):  # a detail crop the model's strides cannot place
            raise ConfigError(str(err)) from None
        if not cfg.model.pretrained:
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"model.pretrained={cfg.model.pretrained!r}: {first}") from None
    proj = None
    if uses_pull(cfg):  # decoder: the pull reads the decoder feature itself (no parameters)
        proj = (nn.Identity() if cfg.method.pull_feature == "decoder"
                else ProjectionHead(segmentor.feature_dim, cfg.model.proj_dim))
    # DAFormer's feature distance: a frozen copy of the backbone as loaded (ImageNet weights).
    imnet = FrozenBackbone(segmentor).to(device) if cfg.method.fd_weight > 0 else None
    network = Network(segmentor, proj).to(device)
    if device.type == "cuda" and cfg.train.channels_last:
        network = network.to(memory_format=torch.channels_last)
        imnet = imnet.to(memory_format=torch.channels_last) if imnet is not None else None
    teacher = EMATeacher(network)
    perf.apply(cfg.train, student=segmentor, teacher=teacher.model.segmentor, model_name=cfg.model.name)
    backbone, head = segmentor.param_groups()
    if proj is not None:
        head = head + list(proj.parameters())
    lr = cfg.optim.lr * lr_scale(cfg.optim.lr_scaling, dist.world_size())
    groups = [
        {"params": backbone, "lr": lr},
        {"params": head, "lr": lr * cfg.optim.head_lr_mult},
    ]
    for group in groups:
        group["initial_lr"] = group["lr"]
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.optim.weight_decay,
                                  **adamw_impl(device))
    m = cfg.method
    bank = (
        PrototypeBank(num_classes, pull_dim(cfg, segmentor.feature_dim), momentum=m.proto_momentum,
                      device=device)
        if uses_pull(cfg)
        else None
    )
    weighter = ClassWeighter(
        num_classes, mode=m.weight_mode, momentum=m.weight_momentum, gamma=m.weight_gamma,
        device=device,
    )
    student = wrap(network) if wrap is not None else network
    return TrainState(student, teacher, optimizer, bank, weighter, num_classes,
                      style=build_style(cfg, device), imnet=imnet, lr_scaling=cfg.optim.lr_scaling)


def build_style(cfg: Config, device: torch.device) -> StyleRandomizer | None:
    """The frozen style network for ``method.translate=style`` (None otherwise)."""
    m = cfg.method
    if m.translate != "style":
        return None
    try:
        style = StyleRandomizer.from_folder(m.style_checkpoint, alpha=m.style_alpha,
                                            downsample=m.style_downsample)
    except StyleLoadError as err:
        raise ConfigError(f"method.style_checkpoint={m.style_checkpoint!r}: {err}") from None
    return style.to(device)
