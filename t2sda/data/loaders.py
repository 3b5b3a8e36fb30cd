"""Datasets for a config and endless, resumable, per-rank batch streams."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from t2sda.config import DataConfig
from t2sda.data import digits, real, scan
from t2sda.data.base import Datasets, InfiniteSampler

__all__ = ["Datasets", "InfiniteSampler", "batch_stream", "build_datasets", "eval_loader"]


def build_datasets(cfg: DataConfig, *, seed: int) -> Datasets:
    if cfg.name == "digits":
        def scenes(domain: str, split: str, length: int, offset: int) -> digits.DigitScenes:
            return digits.DigitScenes(domain=domain, split=split, length=length,
                                      strength=cfg.strength, seed=seed + offset,
                                      image_size=cfg.image_size, cache_dir=_cache_dir(cfg))

        target = scenes("target", "train", cfg.train_scenes, 1)
        # The oracle learns from labelled target scenes drawn apart from the unlabelled stream.
        source = scenes("target", "train", cfg.train_scenes, 2) if cfg.oracle else \
            scenes("source", "train", cfg.train_scenes, 0)
        val = digits_val(cfg)
        # Held-out source scenes come from the test digits, so no digit is shared with training.
        source_val = digits.DigitScenes(domain="source", split="test", length=cfg.source_val_images,
                                        strength=cfg.strength, seed=20_000, image_size=cfg.image_size,
                                        cache_dir=_cache_dir(cfg)) if cfg.source_val_images else None
        return Datasets(source, target, val, digits.CLASS_NAMES, source_val=source_val)
    if cfg.name == "real":
        return real.build(cfg, seed=seed)
    raise ValueError(f"unknown dataset {cfg.name!r}")


def digits_val(cfg: DataConfig) -> digits.DigitScenes:
    """The digits validation scenes alone. They do not depend on the run's seed: every run is
    scored on the same set."""
    return digits.DigitScenes(domain="target", split="test", length=cfg.val_scenes,
                              strength=cfg.strength, seed=10_000, image_size=cfg.image_size,
                              cache_dir=_cache_dir(cfg))


def _cache_dir(cfg: DataConfig):
    """The digits scenes, like the folder scans, are kept under ``data.cache_dir``."""
    return cfg.cache_dir or scan.default_cache_dir()


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
