"""The DAFormer recipe's data pipeline: resize to fit a scale, random crop (optionally
containing a rare class), horizontal flip; evaluation images resized, labels kept full size.

Images are PIL RGB, labels (H, W) uint8 train ids; outputs are a float32 (3, H, W) image in
[0, 1] (the models normalise) and an int64 (H, W) label, like the digits datasets.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from t2sda.data.labels import IGNORE

CROP_TRIES = 10  # mmseg's RandomCrop and DAFormer's rare-class crop both try 10 times


def fit_size(size: tuple[int, int], scale: tuple[int, int] | None) -> tuple[int, int]:
    """(w, h) scaled to fit inside ``scale`` = (W, H) keeping the aspect ratio (mmcv's
    keep_ratio rescale: 1914x1052 -> 1280x704, 2048x1024 -> 1024x512); None keeps it."""
    if scale is None:
        return size
    (w, h), (big, small) = size, (max(scale), min(scale))
    factor = min(big / max(w, h), small / min(w, h))
    return int(w * factor + 0.5), int(h * factor + 0.5)


def resize(image: Image.Image, label: np.ndarray | None, scale: tuple[int, int] | None):
    size = fit_size(image.size, scale)
    if size == image.size:
        return image, label
    image = image.resize(size, Image.BILINEAR)
    if label is not None:  # nearest: no invented classes on boundaries
        label = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))
    return image, label


def to_tensors(image: Image.Image | np.ndarray, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    rgb = np.array(image)  # (H, W, 3) uint8, a writable copy (PIL and flips give views)
    return (torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255),
            torch.from_numpy(np.array(label)).long())


def _crop_box(rng: np.random.Generator, h: int, w: int, crop: int) -> tuple[int, int]:
    return int(rng.integers(0, max(h - crop, 0) + 1)), int(rng.integers(0, max(w - crop, 0) + 1))


def _balanced(label: np.ndarray, cat_max_ratio: float) -> bool:
    """mmseg's test: no single class covers more than ``cat_max_ratio`` of the labelled crop."""
    counts = np.bincount(label[label != IGNORE].ravel())
    counts = counts[counts > 0]
    return len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio


def random_crop(rng: np.random.Generator, image: np.ndarray, label: np.ndarray, *, crop: int,
                cat_max_ratio: float = 1.0, rare_class: int = -1, rare_pixels: int = 0):
    """Crop (H, W, 3) / (H, W) to crop x crop (padding 0 / IGNORE where smaller).

    Retries up to 10 times while one class dominates (``cat_max_ratio`` < 1) or, with rare-class
    sampling, while the crop holds fewer than ``rare_pixels`` of ``rare_class``; keeps the last.
    """
    h, w = label.shape
    for _ in range(CROP_TRIES):
        y, x = _crop_box(rng, h, w, crop)
        crop_label = label[y:y + crop, x:x + crop]
        if rare_class >= 0 and np.count_nonzero(crop_label == rare_class) < rare_pixels:
            continue
        if cat_max_ratio >= 1.0 or _balanced(crop_label, cat_max_ratio):
            break
    crop_image = image[y:y + crop, x:x + crop]
    if crop_label.shape != (crop, crop):
        ch, cw = crop_label.shape
        crop_image = np.pad(crop_image, ((0, crop - ch), (0, crop - cw), (0, 0)))
        crop_label = np.pad(crop_label, ((0, crop - ch), (0, crop - cw)), constant_values=IGNORE)
    return crop_image, crop_label


def train_sample(rng: np.random.Generator, image: Image.Image, label: np.ndarray | None, *,
                 scale: tuple[int, int] | None, crop: int, flip: bool, cat_max_ratio: float = 1.0,
                 rare_class: int = -1, rare_pixels: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize -> random crop -> flip. ``label`` None (unlabelled target): an all-IGNORE map."""
    image, label = resize(image, label, scale)
    rgb = np.asarray(image.convert("RGB"))
    if label is None:  # target images: their labels are never used
        label = np.full(rgb.shape[:2], IGNORE, np.uint8)
        cat_max_ratio, rare_class = 1.0, -1
    if crop:
        rgb, label = random_crop(rng, rgb, label, crop=crop, cat_max_ratio=cat_max_ratio,
                                 rare_class=rare_class, rare_pixels=rare_pixels)
    if flip and rng.random() < 0.5:
        rgb, label = rgb[:, ::-1], label[:, ::-1]
    return to_tensors(rgb, label)


def eval_sample(image: Image.Image, label: np.ndarray, *, scale: tuple[int, int] | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The image resized to ``scale``; the label at its full size (scored at full resolution)."""
    image, _ = resize(image, None, scale)
    return to_tensors(np.asarray(image.convert("RGB")), label)
