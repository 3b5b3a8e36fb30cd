"""Real benchmarks from dataset folders: GTA5 / SYNTHIA -> Cityscapes, and DG evaluation sets.

``build(cfg, seed=...)`` lists and checks every file before training starts (pairing, image
headers and PNG checksums, every label decoded once; cached), so a bad file stops the run
at once with a one-line summary, never half-way through an epoch.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from t2sda.config import ConfigError, DataConfig
from t2sda.data import folders, labels, rcs, scan, transforms
from t2sda.data.base import Datasets, InfiniteSampler


class DataError(ConfigError):
    """A dataset tree that cannot be trained on; one line that points to ``data check``."""


class FolderDataset(Dataset):
    """(image, label) pairs of one split. Modes:

    * ``train``: resize -> random crop -> flip, keyed by draws (see ``rcs``), labels used;
    * ``images``: the same for unlabelled images (target): the label is all IGNORE;
    * ``eval``: images resized to ``scale``, labels at their full size.
    """

    def __init__(self, name: str, root: str | Path, files: list[tuple[str, str | None]], *,
                 mode: str, table: np.ndarray, scale: tuple[int, int] | None, crop: int = 0,
                 flip: bool = False, cat_max_ratio: float = 1.0, seed: int = 0,
                 class_pixels: np.ndarray | None = None, rcs_temperature: float = 0.0,
                 rcs_min_pixels: int = 0, rcs_min_crop_ratio: float = 0.0):
        assert mode in ("train", "images", "eval"), mode
        self.name, self.root, self.files, self.mode = name, Path(root), files, mode
        self.bits16 = folders.layout(name).bits16
        self.table = np.where(table < 0, labels.IGNORE, table).astype(np.uint8)  # (256,)
        self.scale, self.crop, self.flip, self.cat_max_ratio = scale, crop, flip, cat_max_ratio
        self.seed, self.class_pixels = seed, class_pixels
        self.rcs_temperature, self.rcs_min_pixels = rcs_temperature, rcs_min_pixels
        self.rare_pixels = int(rcs_min_pixels * rcs_min_crop_ratio)

    def __len__(self) -> int:
        return len(self.files)

    def sampler(self, *, seed: int, rank: int, world_size: int, start: int):
        """What ``loaders.batch_stream`` draws from: rare-class draws or a shuffled stream."""
        if self.rcs_temperature > 0:
            return rcs.RareClassSampler(self.class_pixels[:, :-1], temperature=self.rcs_temperature,
                                        min_pixels=self.rcs_min_pixels, seed=seed, rank=rank,
                                        world_size=world_size, start=start)
        indices = InfiniteSampler(len(self), seed=seed, rank=rank, world_size=world_size,
                                  start=start)
        return rcs.KeyedSampler(indices, rank=rank, world_size=world_size, start=start)

    def read_label(self, i: int) -> np.ndarray:
        """(H, W) uint8 train ids of file i."""
        ids = folders.read_label(self.root / self.files[i][1], bits16=self.bits16)
        return self.table[ids]

    def __getitem__(self, key):
        # An int (e.g. a fixed image panel) is its own draw; samplers pass (draw, index, class).
        draw, index, rare_class = (key, key, -1) if isinstance(key, (int, np.integer)) else key
        image_rel, label_rel = self.files[index]
        with Image.open(self.root / image_rel) as im:
            image = im.convert("RGB")
        label = self.read_label(index) if self.mode != "images" and label_rel else None
        if self.mode == "eval":
            return transforms.eval_sample(image, label, scale=self.scale)
        return transforms.train_sample(
            rcs.draw_generator(self.seed, draw), image, label, scale=self.scale, crop=self.crop,
            flip=self.flip, cat_max_ratio=self.cat_max_ratio, rare_class=rare_class,
            rare_pixels=self.rare_pixels)


def _root(cfg: DataConfig, key: str, name: str, explicit: str) -> str:
    root = explicit or folders.default_root(name)
    if not root:
        raise DataError(f"data.{key}_root is not set for {name}: pass --set data.{key}_root=DIR "
                        f"or set T2SDA_{name.upper()}_ROOT (or T2SDA_DATA to a folder holding {name}/)")
    return root


def _checked(cfg: DataConfig, key: str, name: str, root: str, split: str, *, with_labels: bool
             ) -> tuple[list, list[dict]]:
    """Files and scan records of one split, or a DataError summing up what is wrong."""
    files, problems = folders.list_files(name, root, split, with_labels=with_labels)
    records = []
    if files:
        records = scan.scan(name, root, files, full=False, workers=cfg.scan_workers,
                            cache_dir=cfg.cache_dir or scan.default_cache_dir())
        problems += scan.problems(records, files, root, folders.table(name))
    if problems:
        raise DataError(
            f"data.{key}_root={root} ({name}, split {split}): {len(problems)} problem(s), first: "
            f"{problems[0]}; see all with: python -m t2sda data check --dataset {name} "
            f"--root {root} --split {split}")
    return files, records


def split_source_val(files: list, count: int) -> tuple[list[int], list[int]]:
    """(train, held-out) indices into ``files``: the ``count`` images whose relative image path
    has the lowest SHA-1 are held out. The rule depends on the paths alone, not on list order
    or the run's seed, so every run and every rank holds out the same images."""
    if count >= len(files):
        raise DataError(f"data.source_val_images={count}: the source split has only {len(files)} "
                        "images; hold out fewer")
    digest = [hashlib.sha1(image.encode()).hexdigest() for image, _ in files]
    held = set(sorted(range(len(files)), key=lambda i: (digest[i], files[i][0]))[:count])
    return [i for i in range(len(files)) if i not in held], sorted(held)


def build(cfg: DataConfig, *, seed: int) -> Datasets:
    num_classes = cfg.num_classes or labels.NUM_CLASSES
    common = {"crop": cfg.crop_size, "flip": cfg.flip}
    src_root = _root(cfg, "source", cfg.source, cfg.source_root)
    files, records = _checked(cfg, "source", cfg.source, src_root, cfg.source_split,
                              with_labels=True)
    table = folders.table(cfg.source, num_classes=num_classes)
    train_idx, held_idx = split_source_val(files, cfg.source_val_images)
    source_val = FolderDataset(cfg.source, src_root, [files[i] for i in held_idx], mode="eval",
                               scale=cfg.size("source"), table=table) if held_idx else None
    # Held-out images are neither trained on nor counted by rare-class sampling.
    files, records = [files[i] for i in train_idx], [records[i] for i in train_idx]
    source = FolderDataset(
        cfg.source, src_root, files, mode="train", table=table, scale=cfg.size("source"),
        cat_max_ratio=cfg.cat_max_ratio, seed=seed * 3, **common,
        class_pixels=scan.class_pixels(records, table, num_classes),
        rcs_temperature=cfg.rcs_temperature, rcs_min_pixels=cfg.rcs_min_pixels,
        rcs_min_crop_ratio=cfg.rcs_min_crop_ratio)
    if cfg.target:
        tgt_root = _root(cfg, "target", cfg.target, cfg.target_root)
        tgt_files, _ = _checked(cfg, "target", cfg.target, tgt_root, cfg.target_split,
                                with_labels=False)
        target = FolderDataset(cfg.target, tgt_root, tgt_files, mode="images", seed=seed * 3 + 1,
                               table=folders.table(cfg.target), scale=cfg.size("target"), **common)
    else:  # domain generalization: the "target" stream is other source images, unlabelled
        target = FolderDataset(cfg.source, src_root, files, mode="images", seed=seed * 3 + 1,
                               table=table, scale=cfg.size("source"), **common)
    vals = build_val(cfg)
    names = cfg.val.split(",")
    return Datasets(source, target, vals.pop(names[0]), labels.CLASS_NAMES[:num_classes],
                    extra_val=vals, class_subsets=class_subsets(cfg), source_val=source_val)


def class_subsets(cfg: DataConfig) -> dict[str, tuple[int, ...]]:
    """SYNTHIA's mIoU16 / mIoU13 for a 19-class SYNTHIA run, else none."""
    if cfg.source == "synthia" and (cfg.num_classes or labels.NUM_CLASSES) == labels.NUM_CLASSES:
        return {"mIoU16": labels.SYNTHIA_16, "mIoU13": labels.SYNTHIA_13}
    return {}


def build_val(cfg: DataConfig) -> dict[str, FolderDataset]:
    """The labelled validation sets alone (``data.val`` order), checked like the others; what
    ``evaluate`` scores, without needing the training sets' folders."""
    num_classes = cfg.num_classes or labels.NUM_CLASSES
    names = cfg.val.split(",")
    roots = cfg.val_roots.split(",") if cfg.val_roots else []
    vals = {}
    for i, name in enumerate(names):
        explicit = roots[i] if i < len(roots) and roots[i] else ""
        if not explicit and name == cfg.target:
            explicit = cfg.target_root
        root = _root(cfg, "val", name, explicit)
        val_files, _ = _checked(cfg, "val", name, root, cfg.val_split, with_labels=True)
        vals[name] = FolderDataset(name, root, val_files, mode="eval", scale=cfg.size("val"),
                                   table=folders.table(name, num_classes=num_classes))
    return vals
