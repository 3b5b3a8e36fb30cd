"""DigitScenes -> DigitScenes-M: the embedded default benchmark (a segmentation MNIST -> MNIST-M).

Everything is built from real data that installed wheels ship, so nothing is downloaded:

* digits: scikit-learn's ``load_digits()`` (1797 real 8x8 handwritten digits, values 0..16);
* photos: scikit-learn's ``load_sample_images()`` (china.jpg, flower.jpg, 427x640 RGB).

A scene is a 2x2 grid of cells; each cell holds a digit with probability 0.8, bicubic-upsampled
to a random square size at a random offset inside its cell. The upsampled intensity / 16 is a
coverage ``alpha`` in [0, 1] from which the labels follow exactly:

    alpha >= 0.5        -> digit class (digit + 1)
    0.2 < alpha < 0.5   -> IGNORE_INDEX (anti-aliased rim: neither clearly digit nor background)
    alpha <= 0.2        -> 0 (background)

The source domain renders a flat bright digit on a flat grey background. The target domain is
the MNIST-M recipe: a random photo crop, inverted under the digit (|photo - alpha|), with
per-channel gain, gamma, occasional blur and noise; ``strength`` blends it with the source
rendering of the same scene, so strength=0 is the source domain and 1 is full MNIST-M style.

Train and test never share a digit (seeded split of ``load_digits``) nor a photo pixel (train
crops come from the left 60 % of each photo's columns, test crops from the right 40 %).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import logging
import operator
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

log = logging.getLogger(__name__)

NUM_CLASSES = 11
CLASS_NAMES: tuple[str, ...] = ("background", *(str(d) for d in range(10)))
IGNORE_INDEX = 255

DOMAINS = ("source", "target")
SPLITS = ("train", "test")
DIGIT_SPLIT_SEED = 0  # fixed, independent of the scene seed: the held-out digits never change
PHOTO_TRAIN_FRACTION = 0.6  # train crops: columns [0, 0.6 W); test crops: [0.6 W, W)

# Sizes below are for a 64 px canvas and scale linearly with image_size.
_DIGIT_SIZE = (16, 28)  # upsampled digit side, inclusive; fits a 32 px cell
_CROP_SIZE = (64, 160)  # photo crop side before resizing to the canvas, inclusive
_P_DIGIT = 0.8


@functools.cache
def _code_hash() -> str:
    """Short hash of what a scene depends on besides its parameters: this module's source
    (the renderer) and scikit-learn's version (its digits and sample photos)."""
    text = Path(__file__).read_bytes() + importlib.metadata.version("scikit-learn").encode()
    return hashlib.sha256(text).hexdigest()[:12]


@functools.cache
def _digit_alphas() -> np.ndarray:
    """(1797, 8, 8) float32 coverage in [0, 1]; digit values are 0..16."""
    from sklearn.datasets import load_digits  # only to render: cached scenes need no sklearn

    return (load_digits().images / 16.0).astype(np.float32)


@functools.cache
def _digit_targets() -> np.ndarray:
    """(1797,) int64 digit value 0..9 of each image."""
    from sklearn.datasets import load_digits

    return load_digits().target.astype(np.int64)


@functools.cache
def _photos() -> tuple[np.ndarray, ...]:
    """The sample photos, each (427, 640, 3) uint8."""
    from sklearn.datasets import load_sample_images

    return tuple(load_sample_images().images)


@functools.cache
def digit_split() -> tuple[np.ndarray, np.ndarray]:
    """Indices into ``load_digits()`` for (train, test) scenes: ~2/3 and ~1/3, disjoint."""
    perm = np.random.default_rng(DIGIT_SPLIT_SEED).permutation(len(_digit_alphas()))
    n_train = round(len(perm) * 2 / 3)
    train, test = np.sort(perm[:n_train]), np.sort(perm[n_train:])
    for a in (train, test):
        a.setflags(write=False)  # cached and shared: callers must not mutate it
    return train, test


def _scaled(size_range: tuple[int, int], image_size: int) -> tuple[int, int]:
    return tuple(max(1, round(s * image_size / 64)) for s in size_range)


def photo_column_range(width: int, split: str) -> tuple[int, int]:
    """Half-open column range [start, stop) of a photo that ``split`` may crop from."""
    cut = int(width * PHOTO_TRAIN_FRACTION)
    return (0, cut) if split == "train" else (cut, width)


def sample_photo_crop(rng: np.random.Generator, *, split: str, photo_hw: tuple[int, int],
                      image_size: int) -> tuple[int, int, int]:
    """A square crop (top, left, side) inside the photo region reserved for ``split``."""
    h, w = photo_hw
    c0, c1 = photo_column_range(w, split)
    lo, hi = _scaled(_CROP_SIZE, image_size)
    hi = min(hi, h, c1 - c0)  # large canvases: the crop must still fit the region
    side = int(rng.integers(min(lo, hi), hi + 1))
    top = int(rng.integers(0, h - side + 1))
    left = int(rng.integers(c0, c1 - side + 1))
    return top, left, side


def sample_layout(rng: np.random.Generator, *, split: str, image_size: int
                  ) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Place digits: returns alpha (H, W) float32, label (H, W) uint8, used digit indices."""
    pool = digit_split()[SPLITS.index(split)]
    alpha = np.zeros((image_size, image_size), np.float32)
    cls = np.zeros((image_size, image_size), np.uint8)  # digit class over each digit's box
    cell = image_size // 2
    lo, hi = _scaled(_DIGIT_SIZE, image_size)
    used = []
    for cy in range(2):
        for cx in range(2):
            if rng.random() >= _P_DIGIT:
                continue
            idx = int(pool[rng.integers(len(pool))])
            side = int(rng.integers(lo, hi + 1))
            y = cy * cell + int(rng.integers(0, cell - side + 1))
            x = cx * cell + int(rng.integers(0, cell - side + 1))
            small = torch.from_numpy(_digit_alphas()[idx])[None, None]  # (1, 1, 8, 8)
            up = F.interpolate(small, size=(side, side), mode="bicubic", align_corners=False)
            # bicubic overshoots slightly outside [0, 1]; coverage must stay a fraction
            alpha[y:y + side, x:x + side] = up[0, 0].clamp_(0, 1).numpy()
            cls[y:y + side, x:x + side] = _digit_targets()[idx] + 1
            used.append(idx)
    label = np.where(alpha >= 0.5, cls, 0).astype(np.uint8)
    label[(alpha > 0.2) & (alpha < 0.5)] = IGNORE_INDEX
    return alpha, label, used


def _render_source(rng: np.random.Generator, alpha: np.ndarray) -> np.ndarray:
    """Flat bright digit on flat grey: (H, W, 3) float32 in [0, 1]."""
    bg, fg = rng.uniform(0.25, 0.45), rng.uniform(0.8, 1.0)
    img = (bg + (fg - bg) * alpha)[..., None]  # (H, W, 1), broadcast to 3 grey channels
    img = img + 0.02 * rng.standard_normal((*alpha.shape, 3), dtype=np.float32)
    return np.clip(img, 0, 1, dtype=np.float32)


def _render_target(rng: np.random.Generator, alpha: np.ndarray, split: str) -> np.ndarray:
    """MNIST-M style: photo crop inverted under the digit, then colour jitter and noise."""
    size = alpha.shape[0]
    photos = _photos()
    photo = photos[rng.integers(len(photos))]
    top, left, side = sample_photo_crop(rng, split=split, photo_hw=photo.shape[:2],
                                        image_size=size)
    crop = Image.fromarray(photo[top:top + side, left:left + side])
    bgd = np.asarray(crop.resize((size, size), Image.BILINEAR), np.float32) / 255  # (H, W, 3)
    img = np.abs(bgd - alpha[..., None])
    img = img ** rng.uniform(0.7, 1.4) * rng.uniform(0.7, 1.3, size=3).astype(np.float32)
    if rng.random() < 0.3:
        from scipy.ndimage import gaussian_filter

        img = gaussian_filter(img, sigma=(rng.uniform(0.5, 1.2),) * 2 + (0,))
    img = img + 0.03 * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(img, 0, 1, dtype=np.float32)


def render_scene(rng: np.random.Generator, *, domain: str, split: str, strength: float,
                 image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene: image (H, W, 3) float32 in [0, 1], label (H, W) uint8 (0..10 or 255).

    Draws the layout, then the source rendering, then (target only) the target rendering, so
    a target scene at strength 0 equals the source scene drawn from the same generator.
    """
    _check(domain=domain, split=split, strength=strength, image_size=image_size)
    alpha, label, _ = sample_layout(rng, split=split, image_size=image_size)
    img = _render_source(rng, alpha)
    if domain == "target":
        img = strength * _render_target(rng, alpha, split) + (1 - strength) * img
    return img.astype(np.float32), label


def _check(*, domain: str, split: str, strength: float, image_size: int) -> None:
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength!r}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size!r}")


class DigitScenes(torch.utils.data.Dataset):
    """``length`` deterministic scenes of one (domain, split); see the module docstring.

    Scene i depends only on (seed, domain, split, i, strength, image_size). With ``cache`` all
    scenes are generated on first access and kept as uint8; without it each item is rendered
    on demand and quantised the same way, so both modes return identical items.

    ``cache_dir``: the rendered set is also kept there as one ``.npy`` file, so the next
    process (every trial of a search) loads it in milliseconds instead of rendering it again
    (about a second per thousand scenes). The file name holds the parameters and a hash of
    this module's source and of scikit-learn's version, so a change to either renders anew.
    """

    def __init__(self, *, domain: str, split: str, length: int, strength: float = 0.5,
                 seed: int = 0, image_size: int = 64, cache: bool = True,
                 cache_dir: str | Path | None = None):
        _check(domain=domain, split=split, strength=strength, image_size=image_size)
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length!r}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed!r}")
        self.domain, self.split, self.length = domain, split, int(length)
        self.strength, self.seed, self.image_size = float(strength), int(seed), int(image_size)
        self.cache = cache
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._images: np.ndarray | None = None  # (N, 3, H, W) uint8, filled on first access
        self._labels: np.ndarray | None = None  # (N, H, W) uint8

    def __len__(self) -> int:
        return self.length

    def _render(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Scene i as (3, H, W) uint8 image and (H, W) uint8 label."""
        rng = np.random.default_rng(
            [self.seed, DOMAINS.index(self.domain), SPLITS.index(self.split), i])
        img, label = render_scene(rng, domain=self.domain, split=self.split,
                                  strength=self.strength, image_size=self.image_size)
        return np.rint(img * 255).astype(np.uint8).transpose(2, 0, 1), label

    def _fill_cache(self) -> None:
        path = self.cache_file()
        if path is not None and path.is_file():
            loaded = self._load(path)
            if loaded is not None:
                self._images, self._labels = loaded
                return
        s = self.image_size
        images = np.empty((self.length, 3, s, s), np.uint8)
        labels = np.empty((self.length, s, s), np.uint8)
        for i in range(self.length):
            images[i], labels[i] = self._render(i)
        self._images, self._labels = images, labels
        if path is not None:
            self._save(path, images, labels)

    def cache_file(self) -> Path | None:
        """Where the rendered set is kept on disk (None without ``cache_dir``)."""
        if self.cache_dir is None:
            return None
        return self.cache_dir / (f"digits-{self.domain}-{self.split}-seed{self.seed}-n{self.length}"
                                 f"-strength{self.strength:g}-px{self.image_size}-{_code_hash()}.npy")

    def _load(self, path: Path) -> tuple[np.ndarray, np.ndarray] | None:
        s = self.image_size
        try:
            packed = np.load(path)
            if packed.shape != (self.length, 4, s, s) or packed.dtype != np.uint8:
                raise ValueError(f"array {packed.shape} {packed.dtype}, expected "
                                 f"{(self.length, 4, s, s)} uint8")
        except (OSError, ValueError, EOFError) as err:
            log.warning("digits cache %s is unreadable (%s); rendering the scenes again", path, err)
            return None
        return packed[:, :3], packed[:, 3]

    @staticmethod
    def _save(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
        # Written under a private name, then renamed: a reader never sees half a file, and two
        # processes rendering the same set at once both leave a complete one.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:  # one (N, 4, H, W) uint8 array: RGB and the label
                np.save(f, np.concatenate([images, labels[:, None]], axis=1))
            os.replace(tmp, path)
        except OSError as err:
            with contextlib.suppress(OSError):
                tmp.unlink()
            log.warning("could not keep the digits scenes in %s (%s); they stay in memory only",
                        path.parent, err)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = operator.index(i)
        if not -self.length <= i < self.length:
            raise IndexError(f"index {i} out of range for {self.length} scenes")
        i %= self.length
        if self.cache:
            if self._images is None:
                self._fill_cache()
            img, label = self._images[i], self._labels[i]
        else:
            img, label = self._render(i)
        # image float32 (3, H, W) in [0, 1]; label int64 (H, W); both copies, never cache views
        return torch.from_numpy(img).float().div_(255), torch.from_numpy(label).long()
