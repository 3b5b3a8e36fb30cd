"""Rare-class sampling (DAFormer) and the keyed draws that make crops resumable.

A source draw first picks a class c with probability softmax((1 - f_c) / T) over the
classes' pixel frequencies f_c, then an image holding more than ``min_pixels`` of c
(DAFormer's ``>``); the crop is then retried until it holds some of c (see
``transforms.random_crop``). Low T favours rare classes; T -> inf is uniform over classes.

Samplers here yield keys ``(draw, index, rare_class)``: ``draw`` is the position in the
global stream, from which the dataset seeds the crop and flip, so a resumed run draws the
same crops as the uninterrupted one, however many loader workers there are.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


def class_probabilities(pixels: np.ndarray, *, temperature: float, min_pixels: int
                        ) -> tuple[np.ndarray, list[np.ndarray]]:
    """From (N, C [+ 1]) per-image class pixels (an extra last column, ignored pixels, is
    dropped by the caller): (C,) class probabilities and, per class, the images holding more
    than ``min_pixels`` of it (DAFormer's ``>``). Classes without such an image get probability
    0, so a class absent from the source is never drawn, even at ``min_pixels=0``."""
    totals = pixels.sum(axis=0).astype(np.float64)
    freq = totals / max(totals.sum(), 1.0)
    images = [np.flatnonzero(pixels[:, c] > min_pixels) for c in range(pixels.shape[1])]
    usable = np.array([len(i) > 0 for i in images])
    if not usable.any():
        raise ValueError(f"no image holds more than {min_pixels} pixels of any class (rcs_min_pixels)")
    logits = np.where(usable, (1.0 - freq) / temperature, -np.inf)
    prob = np.exp(logits - logits[usable].max())
    return prob / prob.sum(), images


class RareClassSampler(Sampler):
    """Endless keys (draw, index, class), one rank's share: draws r, r + W, r + 2W, ...

    Each draw is a function of (seed, draw) alone, so ranks and resumed runs agree.
    """

    def __init__(self, pixels: np.ndarray, *, temperature: float, min_pixels: int, seed: int,
                 rank: int = 0, world_size: int = 1, start: int = 0):
        self.prob, self.images = class_probabilities(pixels, temperature=temperature,
                                                     min_pixels=min_pixels)
        self.seed, self.rank, self.world_size, self.start = seed, rank, world_size, start

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        i = self.start
        while True:
            draw = i * self.world_size + self.rank
            rng = np.random.default_rng([self.seed, draw])
            c = int(rng.choice(len(self.prob), p=self.prob))
            yield draw, int(self.images[c][rng.integers(len(self.images[c]))]), c
            i += 1

    def __len__(self) -> int:  # DataLoader asks; the stream itself never ends
        return 2**62


class KeyedSampler(Sampler):
    """Wraps an index sampler (e.g. ``InfiniteSampler``): keys (draw, index, -1)."""

    def __init__(self, indices: Sampler[int], *, rank: int = 0, world_size: int = 1, start: int = 0):
        self.indices, self.rank, self.world_size, self.start = indices, rank, world_size, start

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        for i, index in enumerate(self.indices, start=self.start):
            yield i * self.world_size + self.rank, index, -1

    def __len__(self) -> int:
        return len(self.indices)


def draw_generator(seed: int, draw: int) -> np.random.Generator:
    """The crop/flip randomness of one draw; ``torch`` workers' own seeds play no part."""
    return np.random.default_rng([seed, draw, 0x5EED])

