"""Datasets for a config and endless, resumable, per-rank batch streams."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from t2sda.config import DataConfig
from t2sda.data import digits


@dataclasses.dataclass
class Datasets:
    source: Dataset  # labelled source images (labelled target images for the oracle)
    target: Dataset  # target images; their labels are never used for training
    val: Dataset  # held-out labelled target images
    class_names: tuple[str, ...]
    # Further labelled sets scored at each evaluation (domain generalization), by name.
    extra_val: dict[str, Dataset] = dataclasses.field(default_factory=dict)
    # Extra mean IoUs over class subsets, e.g. SYNTHIA's mIoU16 / mIoU13: name -> train ids.
    class_subsets: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    # Held-out labelled source images (data.source_val_images), never trained on; None if 0.
    source_val: Dataset | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def build_datasets(cfg: DataConfig, *, seed: int) -> Datasets:
    if cfg.name == "digits":
        def scenes(domain: str, split: str, length: int, offset: int) -> digits.DigitScenes:
            return digits.DigitScenes(domain=domain, split=split, length=length,
                                      strength=cfg.strength, seed=seed + offset,
                                      image_size=cfg.image_size)

        target = scenes("target", "train", cfg.train_scenes, 1)
        # The oracle learns from labelled target scenes drawn apart from the unlabelled stream.
        source = scenes("target", "train", cfg.train_scenes, 2) if cfg.oracle else \
            scenes("source", "train", cfg.train_scenes, 0)
        val = digits_val(cfg)
        # Held-out source scenes come from the test digits, so no digit is shared with training.
        source_val = digits.DigitScenes(domain="source", split="test", length=cfg.source_val_images,
                                        strength=cfg.strength, seed=20_000,
                                        image_size=cfg.image_size) if cfg.source_val_images else None
        return Datasets(source, target, val, digits.CLASS_NAMES, source_val=source_val)
    if cfg.name == "real":
        from t2sda.data import real  # real imports this module

        return real.build(cfg, seed=seed)
    raise ValueError(f"unknown dataset {cfg.name!r}")


def digits_val(cfg: DataConfig) -> digits.DigitScenes:
    """The digits validation scenes alone. They do not depend on the run's seed: every run is
    scored on the same set."""
    return digits.DigitScenes(domain="target", split="test", length=cfg.val_scenes,
                              strength=cfg.strength, seed=10_000, image_size=cfg.image_size)


class InfiniteSampler(Sampler[int]):
    """Endless indices: a seeded permutation per epoch, every ``world_size``-th one per rank.

    Position g of the global stream is element g % n of permutation(seed, g // n); rank r takes
    g = r, r + W, r + 2W, ... Starting at ``start`` (indices already consumed by this rank)
    makes a resumed run see exactly the batches the uninterrupted run would have seen.
    """

    def __init__(self, length: int, *, seed: int, rank: int = 0, world_size: int = 1,
                 start: int = 0):
        self.length, self.seed, self.rank, self.world_size = length, seed, rank, world_size
        self.start = start

    def __iter__(self) -> Iterator[int]:
        i, epoch, perm = self.start, -1, None
        while True:
            g = i * self.world_size + self.rank
            if g // self.length != epoch:
                epoch = g // self.length
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                perm = torch.randperm(self.length, generator=gen).tolist()
            yield perm[g % self.length]
            i += 1

    def __len__(self) -> int:  # DataLoader asks; the stream itself never ends
        return 2**62


def batch_stream(dataset: Dataset, *, batch_size: int, seed: int, num_workers: int = 0,
                 rank: int = 0, world_size: int = 1, start_step: int = 0,
                 pin_memory: bool = False) -> Iterator:
    position = {"seed": seed, "rank": rank, "world_size": world_size, "start": start_step * batch_size}
    # Folder datasets bring their own sampler: keyed draws, rare-class sampling (data/rcs.py).
    sampler = dataset.sampler(**position) if hasattr(dataset, "sampler") else \
        InfiniteSampler(len(dataset), **position)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                        num_workers=num_workers, pin_memory=pin_memory,
                        persistent_workers=num_workers > 0)
    return iter(loader)


def eval_loader(dataset: Dataset, *, batch_size: int, rank: int = 0, world_size: int = 1,
                num_workers: int = 0) -> DataLoader:
    """Each rank scores a disjoint, strided share of the validation set (counts all-reduced)."""
    subset = torch.utils.data.Subset(dataset, range(rank, len(dataset), world_size))
    return DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
