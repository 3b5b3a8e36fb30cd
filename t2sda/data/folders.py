"""The official folder layouts: where each dataset keeps its images and labels, how a label
file is read, and where a dataset's root comes from (config key or environment).

Layouts (``<s>`` is the split folder):

=============  ============================================  ===========================================
dataset        image                                         label
=============  ============================================  ===========================================
cityscapes     leftImg8bit/<s>/<city>/X_leftImg8bit.png      gtFine/<s>/<city>/X_gtFine_labelIds.png
gta5           images/X.png                                  labels/X.png
synthia        RGB/X.png                                     GT/LABELS/X.png (16-bit, class in channel 0)
bdd100k        images/10k/<s>/X.jpg                          labels/sem_seg/masks/<s>/X.png (train ids)
mapillary      <training|validation>/images/X.jpg            <training|validation>/labels/X.png (v1.2 ids)
acdc           rgb_anon/<cond>/<s>/<seq>/X_rgb_anon.png      gt/<cond>/<s>/<seq>/X_gt_labelIds.png
dark_zurich    rgb_anon/<s>/<time>/<seq>/X_rgb_anon.png      gt/<s>/<time>/<seq>/X_gt_labelIds.png
=============  ============================================  ===========================================

GTA5 and SYNTHIA have no official split: every image is ``train``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from t2sda.data import labels


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str
    splits: dict[str, str]  # split name -> folder name used in the glob
    image_glob: str  # relative to the root; {split} is the split's folder
    label_of: Callable[[str], str]  # image path relative to the root -> label path
    train_ids: dict[int, int]
    num_ids: int  # ids 0..num_ids-1 are the dataset's own table; others are unknown
    ignore_ids: tuple[int, ...] = ()  # further ids that are defined, and ignored
    bits16: bool = False  # SYNTHIA: 16-bit RGB labels, class id in the first channel
    unlabelled: tuple[str, ...] = ()  # splits shipped without labels


def _swap(image_dir: str, label_dir: str, image_end: str, label_end: str):
    def label_of(rel: str) -> str:
        tail = rel[len(image_dir) + 1:]  # the glob guarantees image_dir/ ... image_end
        return f"{label_dir}/{tail[: -len(image_end)]}{label_end}"
    return label_of


LAYOUTS: dict[str, Layout] = {
    "cityscapes": Layout(
        "cityscapes", {s: s for s in ("train", "val", "test")}, "leftImg8bit/{split}/*/*_leftImg8bit.png",
        _swap("leftImg8bit", "gtFine", "_leftImg8bit.png", "_gtFine_labelIds.png"),
        labels.CITYSCAPES_TRAIN_IDS, labels.CITYSCAPES_NUM_IDS),
    "gta5": Layout(
        "gta5", {"train": ""}, "images/*.png", _swap("images", "labels", ".png", ".png"),
        labels.CITYSCAPES_TRAIN_IDS, labels.CITYSCAPES_NUM_IDS),
    "synthia": Layout(
        "synthia", {"train": ""}, "RGB/*.png", _swap("RGB", "GT/LABELS", ".png", ".png"),
        labels.SYNTHIA_TRAIN_IDS, labels.SYNTHIA_NUM_IDS, bits16=True),
    "bdd100k": Layout(
        "bdd100k", {"train": "train", "val": "val"}, "images/10k/{split}/*.jpg",
        _swap("images/10k", "labels/sem_seg/masks", ".jpg", ".png"), labels.BDD100K_TRAIN_IDS,
        labels.NUM_CLASSES, ignore_ids=(labels.IGNORE,)),
    "mapillary": Layout(
        "mapillary", {"train": "training", "val": "validation"}, "{split}/images/*.jpg",
        lambda rel: rel.replace("/images/", "/labels/")[: -len(".jpg")] + ".png",
        labels.MAPILLARY_TRAIN_IDS, labels.MAPILLARY_NUM_IDS),
    "acdc": Layout(
        "acdc", {"train": "train", "val": "val"}, "rgb_anon/*/{split}/*/*_rgb_anon.png",
        _swap("rgb_anon", "gt", "_rgb_anon.png", "_gt_labelIds.png"),
        labels.CITYSCAPES_TRAIN_IDS, labels.CITYSCAPES_NUM_IDS),
    "dark_zurich": Layout(
        "dark_zurich", {"train": "train", "val": "val"}, "rgb_anon/{split}/*/*/*_rgb_anon.png",
        _swap("rgb_anon", "gt", "_rgb_anon.png", "_gt_labelIds.png"),
        labels.CITYSCAPES_TRAIN_IDS, labels.CITYSCAPES_NUM_IDS, unlabelled=("train",)),
}



def layout(name: str) -> Layout:
    if name not in LAYOUTS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(LAYOUTS)}")
    return LAYOUTS[name]


def table(name: str, *, num_classes: int = labels.NUM_CLASSES) -> np.ndarray:
    spec = layout(name)
    return labels.lookup_table(spec.train_ids, num_ids=spec.num_ids, ignore_ids=spec.ignore_ids,
                               num_classes=num_classes)


def default_root(name: str, environ=os.environ) -> str:
    """``$T2SDA_<NAME>_ROOT``, else ``$T2SDA_DATA/<name>``, else "" (not configured)."""
    explicit = environ.get(f"T2SDA_{name.upper()}_ROOT", "")
    if explicit:
        return explicit
    base = environ.get("T2SDA_DATA", "")
    return str(Path(base) / name) if base else ""


def list_files(name: str, root: str | Path, split: str, *, with_labels: bool = True
               ) -> tuple[list[tuple[str, str | None]], list[str]]:
    """Sorted (image, label) paths relative to ``root``, and a list of layout problems
    ("path: what is wrong"). Labels are None when not wanted, when the split has none, and
    for images without their label (each also a problem)."""
    spec, root = layout(name), Path(root)
    if split not in spec.splits:
        return [], [f"{root}: {name} has no split {split!r} (splits: {', '.join(spec.splits)})"]
    if not root.is_dir():
        return [], [f"{root}: dataset root does not exist" if not root.exists()
                    else f"{root}: dataset root is not a directory"]
    pattern = spec.image_glob.format(split=spec.splits[split]).lstrip("/")
    images = sorted(p.relative_to(root).as_posix() for p in root.glob(pattern) if p.is_file())
    if not images:
        return [], [f"{root}: no images matching {pattern} (is this the {name} layout?)"]
    if not with_labels or split in spec.unlabelled:
        return [(image, None) for image in images], []
    files, problems = [], []
    for image in images:
        label = spec.label_of(image)
        if (root / label).is_file():
            files.append((image, label))
        else:
            files.append((image, None))
            problems.append(f"{root / image}: no label (expected {root / label})")
    expected = {spec.label_of(i) for i in images}
    label_pattern = spec.label_of(pattern.replace("*", "\0")).replace("\0", "*")
    for stray in sorted(p.relative_to(root).as_posix() for p in root.glob(label_pattern)):
        if stray not in expected:
            problems.append(f"{root / stray}: label without an image")
    return files, problems


def read_label(path: str | Path, *, bits16: bool = False, exact: bool = False) -> np.ndarray:
    """Label ids of one file: (H, W) uint8, or uint16 for 16-bit labels read with ``exact``.

    SYNTHIA's labels are 16-bit RGB PNGs with the class id in the first channel. Pillow
    decodes 16-bit RGB to 8 bits by keeping each sample's *high* byte (all zeros for ids
    below 256), so the tile is re-declared little-endian: the same bytes and PNG filters, but
    Pillow then keeps the *low* byte. ``exact`` decodes twice and returns the full 16-bit id
    (for checking that no id is 256 or more).
    """
    with Image.open(path) as im:
        if not bits16:
            if im.mode not in ("L", "P"):
                raise ValueError(f"expected an 8-bit single-channel label image, got mode {im.mode}")
            return np.asarray(im)
        if im.mode in ("I;16", "I;16B", "I"):  # single-channel 16-bit: the value is the id
            return np.asarray(im).astype(np.uint16)
        if im.mode not in ("RGB", "RGBA") or not im.tile or not im.tile[0].args.endswith(";16B"):
            raise ValueError(f"expected a 16-bit PNG label, got mode {im.mode}")
        high = np.asarray(im)[..., 0] if exact else None
    with Image.open(path) as im:
        im.tile = [t._replace(args=t.args.replace(";16B", ";16L")) for t in im.tile]
        low = np.asarray(im)[..., 0]
    return low if high is None else high.astype(np.uint16) << 8 | low
