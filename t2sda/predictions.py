"""Inference shared by ``evaluate`` and ``predict``: test-time augmentation, and the files a
prediction is written as (colour mask, overlay, raw class ids in train ids or Cityscapes ids).

TTA follows mmseg's ``--aug-test`` (DAFormer's test-time augmentation): the image is resized
by each scale, optionally flipped, run whole or by sliding window, and the softmax
probabilities, upsampled to the output size, are averaged over all views.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from t2sda.config import ConfigError
from t2sda.data import labels
from t2sda.scoring import predict, slide_logits
from t2sda.tb import palette

TTA_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # mmseg's aug-test img_ratios (DAFormer)
FORMATS = ("trainids", "cityscapes")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
# Dataset suffixes dropped from output names: x_leftImg8bit.png -> x_labelIds.png.
_STRIP = ("_leftImg8bit", "_rgb_anon")

# Train id -> Cityscapes label id (what the official scripts and the test server read);
# ignore (255) -> 0 "unlabeled".
LABEL_IDS = np.zeros(256, np.uint8)
for _label_id, _train_id in labels.CITYSCAPES_TRAIN_IDS.items():
    LABEL_IDS[_train_id] = _label_id


def parse_scales(text: str) -> tuple[float, ...]:
    """``0.5,1.0,1.5`` -> (0.5, 1.0, 1.5); a ConfigError naming the flag otherwise."""
    try:
        scales = tuple(float(s) for s in text.split(","))
    except ValueError:
        raise ConfigError(f"--tta-scales {text!r}: expected comma-separated numbers, "
                          "e.g. 0.5,1.0,1.5") from None
    if not scales or any(not (0 < s <= 8) for s in scales):
        raise ConfigError(f"--tta-scales {text!r}: every scale must be in (0, 8]")
    return scales


def _logits(model, image: torch.Tensor, num_classes: int, crop: int, stride: int) -> torch.Tensor:
    if crop and (image.shape[-2] > crop or image.shape[-1] > crop):
        return slide_logits(model, image, num_classes=num_classes, crop=crop, stride=stride or crop // 2)
    return model(image)[0].float()


@torch.no_grad()
def probabilities(model, image: torch.Tensor, *, num_classes: int, crop: int = 0, stride: int = 0,
                  size: tuple[int, int] | None = None, scales: tuple[float, ...] = (1.0,),
                  flip: bool = False) -> torch.Tensor:
    """(B, C, H, W) softmax probabilities at ``size`` (default: the image's), averaged over
    every scale x (no flip, flip) view of the image."""
    h, w = image.shape[-2:]
    size = tuple(size or (h, w))
    total, views = None, 0
    for scale in scales:
        scaled = image if scale == 1.0 else F.interpolate(
            image, size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="bilinear",
            align_corners=False)
        for flipped in (False, True) if flip else (False,):
            logits = _logits(model, scaled.flip(-1) if flipped else scaled, num_classes, crop, stride)
            if flipped:
                logits = logits.flip(-1)
            if tuple(logits.shape[-2:]) != size:
                logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            probs = logits.softmax(dim=1)
            total = probs if total is None else total + probs
            views += 1
    return total / views


def segment(model, image: torch.Tensor, *, num_classes: int, crop: int = 0, stride: int = 0,
            size: tuple[int, int] | None = None, tta: tuple[float, ...] | None = None,
            flip: bool = True) -> torch.Tensor:
    """(B, H, W) classes: plain inference (as in training's validation), or TTA over the
    scales ``tta`` (with flips unless ``flip`` is False)."""
    if tta is None:
        return predict(model, image, num_classes=num_classes, crop=crop, stride=stride, size=size)
    return probabilities(model, image, num_classes=num_classes, crop=crop, stride=stride, size=size,
                         scales=tta, flip=flip).argmax(dim=1)


def mode_name(crop: int, stride: int, tta: tuple[float, ...] | None, flip: bool) -> str:
    mode = f"sliding {crop}/{stride or crop // 2}" if crop else "whole"
    if tta is not None:
        mode += f", tta scales {','.join(f'{s:g}' for s in tta)}" + (" + flip" if flip else "")
    return mode


def to_label_ids(pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Train ids (255 = ignore) -> Cityscapes label ids (uint8)."""
    if num_classes > labels.NUM_CLASSES:
        raise ConfigError(f"--format cityscapes: the model has {num_classes} classes, Cityscapes "
                          f"{labels.NUM_CLASSES}")
    return LABEL_IDS[pred]


def colour(pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 palette colours (black for ignore)."""
    index = np.where(pred == labels.IGNORE, num_classes, np.minimum(pred, num_classes))
    return palette(num_classes).numpy()[index]


def overlay(rgb: np.ndarray, mask_rgb: np.ndarray, opacity: float) -> np.ndarray:
    """The colour mask blended over the image, ``opacity`` of the mask (0..1)."""
    mixed = (1 - opacity) * rgb.astype(np.float32) + opacity * mask_rgb.astype(np.float32)
    return np.clip(mixed + 0.5, 0, 255).astype(np.uint8)


def output_paths(out: Path, rel: str, fmt: str) -> dict[str, Path]:
    """Where the files of the input at relative path ``rel`` go: ``color/``, ``overlay/`` and
    ``trainIds/`` or ``labelIds/`` (each a tree mirroring the input's, so ``labelIds/`` is a
    results folder the Cityscapes scripts can read on its own)."""
    rel_path = Path(rel)
    stem = rel_path.stem
    for suffix in _STRIP:
        stem = stem.removesuffix(suffix)
    raw = "labelIds" if fmt == "cityscapes" else "trainIds"
    return {kind: out / kind / rel_path.parent / f"{stem}_{kind}.png"
            for kind in ("color", "overlay", raw)}


def first_existing(paths) -> Path | None:
    return next((p for p in paths if p.exists()), None)


def write_prediction(paths: dict[str, Path], rgb: np.ndarray, pred: np.ndarray, *, num_classes: int,
                     fmt: str, opacity: float) -> None:
    """Write the colour mask, the overlay on ``rgb`` (H, W, 3 uint8) and the raw ids of ``pred``."""
    mask = colour(pred, num_classes)
    raw = to_label_ids(pred, num_classes) if fmt == "cityscapes" else pred.astype(np.uint8)
    for kind, array in (("color", mask), ("overlay", overlay(rgb, mask, opacity)),
                        ("labelIds" if fmt == "cityscapes" else "trainIds", raw)):
        path = paths[kind]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)


def legend(class_names: tuple[str, ...], path: Path, *, row: int = 20) -> None:
    """A palette legend PNG: one swatch and class name per row."""
    from PIL import ImageDraw

    colours = palette(len(class_names)).numpy()
    width = 40 + 7 * max(len(n) for n in class_names) + 60
    image = Image.new("RGB", (width, row * len(class_names) + 8), "white")
    draw = ImageDraw.Draw(image)
    for i, name in enumerate(class_names):
        y = 4 + i * row
        draw.rectangle([4, y + 2, 32, y + row - 2], fill=tuple(int(c) for c in colours[i]), outline="black")
        draw.text((40, y + 4), f"{name}  (id {i})", fill="black")
    image.save(path)


class Progress:
    """``what done/total images  rate images/s  ETA`` on stderr: redrawn in place on a terminal,
    a line every ``every`` seconds otherwise."""

    def __init__(self, total: int, what: str, *, every: float = 10.0, stream=None):
        self.total, self.what, self.done = total, what, 0
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.every = 0.2 if self.tty else every
        self.start = self.last = time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last < self.every and self.done < self.total:
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        text = (f"{self.what} {self.done}/{self.total} images  {rate:.1f} images/s  "
                f"ETA {(self.total - self.done) / max(rate, 1e-9):.0f} s")
        print(("\r" + text) if self.tty else text, end="" if self.tty else "\n", file=self.stream,
              flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=self.stream)
