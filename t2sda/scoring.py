"""Scoring a segmentor: confusion matrix (all-reduced across ranks), mIoU, whole and sliding-window
prediction. The `evaluate` command is t2sda/cli/evaluate.py; training calls this during its runs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from t2sda import dist


def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, num_classes: int,
                     ignore_index: int = 255) -> torch.Tensor:
    """(C, C) counts, rows = ground truth, columns = prediction; ignore pixels skipped."""
    valid = label != ignore_index
    index = label[valid] * num_classes + pred[valid]
    return torch.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


def iou_from_confusion(conf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class IoU (C,) (NaN for classes absent from both truth and prediction) and the
    mean over the classes that are present."""
    conf = conf.double()
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(inter, float("nan")))
    return iou, iou.nanmean()


def slide_logits(model, image: torch.Tensor, *, num_classes: int, crop: int,
                 stride: int) -> torch.Tensor:
    """Logits at full resolution (B, C, H, W) from overlapping ``crop``² windows.

    Windows whose logits overlap are averaged. An image no larger than ``crop`` is one window.
    ``model(x)`` must return (logits at any resolution, ...).
    """
    b, _, h, w = image.shape
    out = image.new_zeros(b, num_classes, h, w)
    count = image.new_zeros(1, 1, h, w)
    rows = max(h - crop + stride - 1, 0) // stride + 1
    cols = max(w - crop + stride - 1, 0) // stride + 1
    for r in range(rows):
        for c in range(cols):
            y0, x0 = min(r * stride, max(h - crop, 0)), min(c * stride, max(w - crop, 0))
            y1, x1 = min(y0 + crop, h), min(x0 + crop, w)
            logits = model(image[:, :, y0:y1, x0:x1])[0].float()
            out[:, :, y0:y1, x0:x1] += F.interpolate(logits, size=(y1 - y0, x1 - x0),
                                                     mode="bilinear", align_corners=False)
            count[:, :, y0:y1, x0:x1] += 1
    return out / count


@torch.no_grad()
def logits_of(model, image: torch.Tensor, *, num_classes: int, crop: int = 0,
              stride: int = 0) -> torch.Tensor:
    """float logits (B, C, h, w): the model's own output resolution for whole images, full
    resolution with a sliding ``crop`` (used when the image is larger than it)."""
    if crop and (image.shape[-2] > crop or image.shape[-1] > crop):
        return slide_logits(model, image, num_classes=num_classes, crop=crop,
                            stride=stride or crop // 2)
    return model(image)[0].float()


def classes_at(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) argmax of ``logits`` bilinearly brought to ``size`` first."""
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
    return logits.argmax(dim=1)


@torch.no_grad()
def predict(model, image: torch.Tensor, *, num_classes: int, crop: int = 0,
            stride: int = 0, size: tuple[int, int] | None = None) -> torch.Tensor:
    """(B, H, W) predicted classes; whole-image inference unless a sliding ``crop`` is given.

    ``size`` (H, W): predict at another resolution than the image's, e.g. the full-size label
    of a downscaled validation image (logits are upsampled before the argmax).
    """
    logits = logits_of(model, image, num_classes=num_classes, crop=crop, stride=stride)
    return classes_at(logits, size or image.shape[-2:])


@torch.no_grad()
def evaluate(models: dict, loader, *, num_classes: int, device: torch.device,
             crop: int = 0, stride: int = 0, observe=None) -> dict[str, torch.Tensor]:
    """Confusion matrices of several models over one pass of ``loader`` (summed over ranks).

    ``models`` maps a name to a callable returning (logits, ...); each is put in eval mode by
    the caller. ``observe({name: logits})``, if given, sees every batch's logits (those of
    :func:`logits_of`), so label-free scores share this pass. Returns name -> (C, C)
    confusion matrix.
    """
    confs = {name: torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
             for name in models}
    for image, label in loader:
        image, label = image.to(device, non_blocking=True), label.to(device, non_blocking=True)
        logits = {name: logits_of(model, image, num_classes=num_classes, crop=crop, stride=stride)
                  for name, model in models.items()}
        if observe is not None:
            observe(logits)
        for name, value in logits.items():
            confs[name] += confusion_matrix(classes_at(value, label.shape[-2:]), label, num_classes)
    for conf in confs.values():
        dist.all_reduce_sum(conf)
    return confs
