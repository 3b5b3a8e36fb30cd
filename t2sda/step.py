"""One T2S-DA training step, in one straight function.

translate -> pseudo-label -> mix (and MIC's masked target) -> losses (CE, mix CE, MIC, pull,
feature distance) -> one backward -> optimizer -> EMA.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from t2sda import schedules
from t2sda.config import Config
from t2sda.dist import unwrap
from t2sda.method.feature_distance import feature_distance
from t2sda.method.masking import block_mask, mask_image
from t2sda.method.mixing import class_mix_mask, mix, strong_augment
from t2sda.method.pseudo_label import pseudo_label
from t2sda.method.pull_loss import pull_loss, sample_index
from t2sda.method.translate import translate
from t2sda.models import IMAGENET_MEAN
from t2sda.models.hrda import crop_each, downscale, draw_boxes
from t2sda.state import TrainState

IGNORE = 255


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or inf; the message names the step and the term."""


def _resize_label(label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour (B, H, W) -> (B, h, w): no invented classes on boundaries.

    For whole-number factors this is a strided slice (what "nearest" picks anyway), which is
    much cheaper than interpolating a float copy.
    """
    (height, width), (h, w) = label.shape[-2:], size
    if height % h == 0 and width % w == 0:
        return label[:, :: height // h, :: width // w]
    return F.interpolate(label[:, None].float(), size=size, mode="nearest")[:, 0].long()


class _Picker:
    """Chooses the pixels to project once the network knows its feature size (h, w).

    Each named group gives label maps (B, H, W) for the leading parts of the batch (later
    parts are never picked), 255 on pixels it must not pick, and a per-class count. The call
    returns the groups' positions concatenated; ``split(projected)`` cuts the projection back
    into groups and ``label[name]`` holds each group's labels.
    """

    def __init__(self, **groups: tuple[list[torch.Tensor], int, bool]):
        self.groups = {name: (torch.cat(maps), n, bal) for name, (maps, n, bal) in groups.items()}
        self.label: dict[str, torch.Tensor] = {}

    def __call__(self, size: tuple[int, int]) -> torch.Tensor:
        picks = []
        for name, (full_label, per_class, balanced) in self.groups.items():
            label = _resize_label(full_label, size).reshape(-1)
            picks.append(sample_index(label, per_class=per_class, balanced=balanced))
            self.label[name] = label[picks[-1]]
        return torch.cat(picks)

    def split(self, projected: torch.Tensor) -> dict[str, torch.Tensor]:
        sizes = [len(label) for label in self.label.values()]
        return dict(zip(self.label, projected.split(sizes), strict=True))


def _weighted_ce(logits: torch.Tensor, label: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean over all pixels of weight * CE (ignore pixels contribute 0), DAFormer style."""
    loss = F.cross_entropy(logits, label, ignore_index=IGNORE, reduction="none")
    return (loss * weight).mean()


def _seg_loss(logits: torch.Tensor, label: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is None:
        return F.cross_entropy(logits, label, ignore_index=IGNORE)
    return _weighted_ce(logits, label, weight)


def _autocast(device: torch.device, amp: str):
    use_bf16 = amp == "bf16" or (amp == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def train_step(
    state: TrainState,
    src_img: torch.Tensor,
    src_label: torch.Tensor,
    tgt_img: torch.Tensor,
    cfg: Config,
) -> dict[str, float]:
    """src_img, tgt_img (B, 3, H, W) in [0, 1]; src_label (B, H, W). Returns scalar logs
    (losses, schedule values and ``class_weight/<c>`` for every class)."""
    m, step = cfg.method, state.step
    device, (b, _, h, w) = src_img.device, src_img.shape
    lr_scale = schedules.lr_factor(
        step, total=cfg.train.iters, warmup=cfg.optim.warmup_iters, power=cfg.optim.poly_power
    )
    for group in state.optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lr_scale
    adapt = m.self_training and step >= m.self_training_start
    pull_weight = m.pull_weight * schedules.ramp(step, start=m.self_training_start, length=m.pull_warmup)
    pulling = state.bank is not None and pull_weight > 0

    if adapt and m.teacher_reset and step == m.self_training_start:
        state.teacher.update(unwrap(state.student), momentum=0.0)  # a copy: EMA acts from here

    # 1. Target-like source: same content and labels as x_s, target appearance.
    use_src_like = m.src_ce_on_translated or pulling
    ref = tgt_img[torch.randperm(b, device=device)]
    src_like = src_img  # unused unless use_src_like: skip the (style network's) cost
    if use_src_like:
        src_like = translate(src_img, ref, mode=m.translate, fda_beta=m.fda_beta,
                             color_space=m.color_space, style=state.style)
    if m.translate == "none" and m.src_ce_on_translated:
        src_like = strong_augment(src_img)

    # 2. Teacher (no grad): by default the pull's keys on x_s, and pseudo labels on x_t.
    teacher_keys = pulling and m.pull_key_net == "teacher"
    teacher_in = ([src_img] if teacher_keys else []) + ([tgt_img] if adapt else [])
    key_group = ([src_label], m.num_negatives, m.negative_sampling == "balanced")
    key_picker = _Picker(key=key_group) if teacher_keys else None
    tgt_label = tgt_weight = tgt_conf = None
    hrda = cfg.model.hrda
    if teacher_in:
        with torch.no_grad(), _autocast(device, cfg.train.amp):
            if not hrda:
                t_logits, t_proj = state.teacher(torch.cat(teacher_in), key_picker)
            else:  # keys: the context pass alone; pseudo labels: HRDA inference (detail windows)
                if teacher_keys:
                    t_proj = state.teacher(src_img, key_picker, context_only=True)[1]
                if adapt:
                    t_logits = state.teacher(tgt_img)[0]
        if adapt:
            t_up = F.interpolate(t_logits[-b:].float(), size=(h, w), mode="bilinear",
                                 align_corners=False)
            tgt_label, tgt_weight, tgt_conf = pseudo_label(
                t_up, threshold=m.pseudo_threshold, weight_mode=m.pseudo_weight,
                ignore_top=m.pseudo_ignore_top, ignore_bottom=m.pseudo_ignore_bottom,
            )

    # 3. Mixed image: half of each source image's classes pasted onto a target image.
    if adapt:
        if m.mix == "classmix":
            mask = class_mix_mask(src_label)
            mix_img = mix(mask, src_img, tgt_img)
            mix_label = mix(mask, src_label, tgt_label)
            mix_weight = mix(mask, torch.ones_like(tgt_weight), tgt_weight)
        else:
            mask = torch.zeros_like(src_img[:, :1])
            mix_img, mix_label, mix_weight = tgt_img, tgt_label, tgt_weight
        if m.strong_aug:
            mix_img = strong_augment(mix_img)
    query_img = strong_augment(src_like) if pulling and m.query_aug else src_like
    # MIC: the target image (colour-augmented) with random blocks hidden; its labels and
    # weights are the teacher's pseudo labels of the whole target image made above.
    masking = adapt and m.mic_weight > 0
    if masking:
        mic_img = strong_augment(tgt_img) if m.mic_augment else tgt_img
        mic_img = mask_image(mic_img, block_mask(b, h, w, ratio=m.mic_mask_ratio, block=m.mic_block,
                                                 device=device), IMAGENET_MEAN)

    # 4. Student: one forward over every image it learns from (one graph, one backward).
    # Queries: target-like source pixels (labels y_s) and, optionally, confident target
    # pixels of the mixed image (teacher labels); only the picked pixels are projected.
    student_in = [src_img] + ([query_img] if use_src_like else [])
    mix_at = len(student_in)  # the mixed image's part of the batch
    student_in += ([mix_img] if adapt else []) + ([mic_img] if masking else [])
    picker = None
    if pulling:
        query_label = [torch.full_like(src_label, IGNORE),
                       src_label if m.pull_source_pixels else torch.full_like(src_label, IGNORE)]
        if adapt and m.pull_target_pixels:
            confident = (tgt_conf >= m.pull_target_threshold) & (mask[:, 0] == 0)
            query_label.append(torch.where(confident, tgt_label, IGNORE))
        groups = {"query": (query_label, m.num_queries, True)}
        if not teacher_keys:  # keys from the student's own x_s pass, detached below
            groups["key"] = key_group
        picker = _Picker(**groups)
    feat_dist = state.imnet is not None and m.fd_weight > 0
    options = {}
    if hrda:  # HRDA: one random detail crop per part of the batch (one per forward in HRDA)
        boxes = draw_boxes(len(student_in), b, height=h, width=w, crop=cfg.model.hrda_detail_crop,
                           divisible=unwrap(state.student).segmentor.divisible)
        options["detail_box"] = boxes
    with _autocast(device, cfg.train.amp):
        raw_logits, projected, *bottleneck = state.student(torch.cat(student_in), picker,
                                                           with_bottleneck=feat_dist, **options)
        detail = bottleneck.pop(0) if hrda else None
        if feat_dist:  # DAFormer's ImageNet feature distance on the source images x_s (HRDA:
            # on the context image, where the student's bottleneck comes from)
            imnet_feature = state.imnet(downscale(src_img, cfg.model.hrda_context_scale)
                                        if hrda else src_img)
    logits = F.interpolate(raw_logits.float(), size=(h, w), mode="bilinear", align_corners=False)
    parts = logits.split(b)

    def seg_loss(i: int, label: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """CE of part i (weighted by ``weight`` if given); HRDA: (1 - lambda_d) x the fused
        prediction's + lambda_d x the detail crop's against the label cropped to it."""
        fused = _seg_loss(parts[i], label, weight)
        if not hrda:
            return fused
        side, box = cfg.model.hrda_detail_crop, boxes[i * b:(i + 1) * b]
        crop_logits = F.interpolate(detail[i * b:(i + 1) * b].float(), size=(side, side),
                                    mode="bilinear", align_corners=False)
        crop = _seg_loss(crop_logits, crop_each(label, box, side),
                         None if weight is None else crop_each(weight, box, side))
        lam = cfg.model.hrda_detail_loss_weight
        return (1 - lam) * fused + lam * crop

    losses = {"loss_src": seg_loss(0, src_label)}
    if use_src_like and m.src_ce_on_translated:
        losses["loss_src"] = 0.5 * (losses["loss_src"] + seg_loss(1, src_label))
    if adapt:
        losses["loss_mix"] = seg_loss(mix_at, mix_label, mix_weight)
    if masking:
        losses["loss_mic"] = seg_loss(len(parts) - 1, tgt_label, tgt_weight)
    if feat_dist:
        losses["loss_fd"] = feature_distance(
            bottleneck[0][:b], imnet_feature, src_label, min_ratio=m.fd_min_ratio,
            classes=tuple(int(c) for c in m.fd_classes.split(",")), num_classes=state.num_classes)

    # 5. Pull target(-like) features toward source prototypes, weighted per class.
    blend = schedules.weight_blend(
        step, schedule=m.weight_schedule, start=m.self_training_start, length=m.weight_warmup
    )
    class_weight = state.weighter.weights(blend)
    if pulling:
        projected = picker.split(projected)
        query, query_label = projected["query"].float(), picker.label["query"]
        if teacher_keys:
            key, key_label = t_proj.float(), key_picker.label["key"]
        else:
            key, key_label = projected["key"].detach().float(), picker.label["key"]
        state.bank.update(key, key_label)
        if m.negatives == "prototypes":
            key = state.bank.get()
            key_label = torch.where(state.bank.seen, torch.arange(len(key), device=device), IGNORE)
        losses["loss_pull"] = pull_loss(
            query, query_label, key, key_label, temperature=m.pull_temperature,
            class_weight=class_weight, num_queries=m.num_queries, num_negatives=m.num_negatives,
            prototypes=state.bank.get() if m.pull_keys == "bank" else None,
        )
    if use_src_like:  # the re-weighting score: student on the target-like source batch, at the
        # logits' own resolution (a quarter of the pixels of the upsampled map, same IoU trend)
        like = raw_logits[b : 2 * b].detach()
        state.weighter.update(like, _resize_label(src_label, tuple(like.shape[-2:])))

    total = losses["loss_src"] + losses.get("loss_mix", 0.0)
    if "loss_pull" in losses:
        total = total + pull_weight * losses["loss_pull"]
    if "loss_fd" in losses:
        total = total + m.fd_weight * losses["loss_fd"]
    if "loss_mic" in losses:
        total = total + m.mic_weight * losses["loss_mic"]
    for name, value in {**losses, "loss": total}.items():
        if not torch.isfinite(value):
            raise NonFiniteLossError(f"step {step}: loss term '{name}' is {value.item()}")
    state.optimizer.zero_grad(set_to_none=True)
    total.backward()
    state.optimizer.step()
    momentum = schedules.ema_momentum(step, momentum=m.ema_momentum)
    state.teacher.update(unwrap(state.student), momentum=momentum)
    state.step += 1

    logs = {name: value.item() for name, value in losses.items()}
    logs.update(loss=total.item(), lr=state.optimizer.param_groups[0]["lr"], ema_momentum=momentum,
                pull_weight=pull_weight)
    if tgt_conf is not None:
        logs["pseudo_conf_frac"] = (tgt_conf >= m.pseudo_threshold).float().mean().item()
    logs.update({f"class_weight/{c}": v for c, v in enumerate(class_weight.tolist())})
    return logs
