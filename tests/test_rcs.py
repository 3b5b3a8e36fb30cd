"""Rare-class sampling (DAFormer's RCS): class probabilities, the sampler, the rare-class crop."""

import numpy as np
import pytest

from t2sda.data import rcs, transforms


def test_rare_crop_contains_the_rare_class():
    label = np.zeros((100, 100), np.uint8)
    label[70:, 70:] = 7  # class 7 in a 30x30 corner
    image = np.zeros((100, 100, 3), np.uint8)

    def hits(rare_class):
        crops = [transforms.random_crop(rcs.draw_generator(0, draw), image, label, crop=50,
                                        rare_class=rare_class, rare_pixels=100)[1] for draw in range(40)]
        return sum(np.count_nonzero(c == 7) >= 100 for c in crops)

    assert hits(7) >= 32 and hits(-1) <= 16  # ~20 % per crop: ten tries find it ~90 % of draws


def test_rare_class_probabilities_and_images():
    pixels = np.array([[900, 0, 100], [800, 50, 150], [1000, 0, 0]])  # 3 images, 3 classes
    prob, images = rcs.class_probabilities(pixels, temperature=0.1, min_pixels=100)
    freq = pixels.sum(0) / pixels.sum()
    assert [list(i) for i in images] == [[0, 1, 2], [], [1]]  # > 100, as DAFormer
    logits = np.array([(1 - freq[0]) / 0.1, -np.inf, (1 - freq[2]) / 0.1])
    want = np.exp(logits - logits.max())
    assert np.allclose(prob, want / want.sum()) and prob[1] == 0 and prob[2] > prob[0]


def test_rare_class_sampler_frequencies_and_resume():
    pixels = np.array([[5000, 0], [4000, 3000], [6000, 0]])
    sampler = rcs.RareClassSampler(pixels, temperature=0.05, min_pixels=3000, seed=3)
    keys = [k for k, _ in zip(sampler, range(3000))]
    classes = np.array([c for _, _, c in keys])
    assert abs((classes == 1).mean() - sampler.prob[1]) < 0.03
    assert all(i == 1 for _, i, c in keys if c == 1)  # only image 1 holds class 1
    resumed = rcs.RareClassSampler(pixels, temperature=0.05, min_pixels=3000, seed=3, start=100)
    assert [k for k, _ in zip(resumed, range(50))] == keys[100:150]
    ranks = [rcs.RareClassSampler(pixels, temperature=0.05, min_pixels=3000, seed=3, rank=r,
                                  world_size=2) for r in (0, 1)]
    assert [k for k, _ in zip(ranks[1], range(5))] == keys[1:10:2]


def test_rare_class_count_is_strictly_above_min_pixels_like_daformer():
    """An image counts for class c when it holds > min_pixels of c (DAFormer), and a class
    with no source pixels gets probability 0 even at min_pixels=0 (issue 11 §4)."""
    pixels = np.array([[100, 5, 0], [50, 101, 0]])
    prob, images = rcs.class_probabilities(pixels, temperature=0.1, min_pixels=100)
    assert list(images[0]) == [] and list(images[1]) == [1]  # exactly 100 no longer counts
    assert prob[0] == 0.0 and prob[1] == 1.0
    with pytest.raises(ValueError, match="rcs_min_pixels"):
        rcs.class_probabilities(np.array([[3, 0]]), temperature=0.1, min_pixels=3)
    prob, images = rcs.class_probabilities(pixels, temperature=0.1, min_pixels=0)
    assert prob[2] == 0.0 and list(images[2]) == []
    assert prob[:2].sum() == pytest.approx(1.0)
