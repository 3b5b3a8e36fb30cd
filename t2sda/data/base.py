"""What the dataset modules share: the datasets of a run and the endless per-rank sampler.

``loaders`` (which builds datasets for a config) and ``real`` (folder datasets) both import
this module, so neither imports the other's internals.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, Sampler


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
