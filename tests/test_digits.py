"""DigitScenes -> DigitScenes-M benchmark and its export to dataset folder layouts."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from t2sda.data.digits import (
    CLASS_NAMES,
    IGNORE_INDEX,
    NUM_CLASSES,
    DigitScenes,
    digit_split,
    photo_column_range,
    render_scene,
    sample_layout,
    sample_photo_crop,
)
from t2sda.data.write_layouts import TRAIN_ID_TO_LABEL_ID, main, write_layout

VALID_LABELS = set(range(NUM_CLASSES)) | {IGNORE_INDEX}
DIGIT_VALUES = load_digits().target  # (1797,) digit 0..9 of each load_digits() image


def _colourfulness(image: np.ndarray) -> float:
    """Mean absolute deviation of the channels from their mean: 0 for a grey image."""
    return float(np.abs(image - image.mean(0, keepdims=True)).mean())


def test_class_names():
    assert NUM_CLASSES == len(CLASS_NAMES) == 11
    assert CLASS_NAMES[0] == "background" and CLASS_NAMES[1:] == tuple("0123456789")


@pytest.mark.parametrize("domain", ["source", "target"])
@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("image_size", [64, 96])
def test_items_shapes_dtypes_ranges(domain, split, image_size):
    ds = DigitScenes(domain=domain, split=split, length=5, image_size=image_size)
    assert len(ds) == 5
    n_digit_pixels = 0
    for i in range(len(ds)):
        image, label = ds[i]
        assert image.shape == (3, image_size, image_size) and image.dtype == torch.float32
        assert label.shape == (image_size, image_size) and label.dtype == torch.int64
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert set(label.unique().tolist()) <= VALID_LABELS
        n_digit_pixels += int(((label > 0) & (label < IGNORE_INDEX)).sum())
    assert n_digit_pixels > 0
    assert torch.equal(ds[-1][0], ds[4][0])
    with pytest.raises(IndexError):
        ds[5]


@pytest.mark.parametrize("kwargs, match", [
    (dict(domain="real", split="train"), "domain"),
    (dict(domain="source", split="val"), "split"),
    (dict(domain="target", split="train", strength=1.5), "strength"),
    (dict(domain="target", split="train", length=0), "length"),
    (dict(domain="target", split="train", image_size=16), "image_size"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitScenes(**{"length": 4, **kwargs})


def test_deterministic_from_seed():
    def items(seed, split="train"):
        ds = DigitScenes(domain="target", split=split, length=4, seed=seed, cache=False)
        return [ds[i] for i in range(len(ds))]

    a, b, c, d = items(3), items(3), items(4), items(3, "test")
    for (ia, la), (ib, lb) in zip(a, b, strict=True):
        assert torch.equal(ia, ib) and torch.equal(la, lb)
    assert not any(torch.equal(ia, ic) for (ia, _), (ic, _) in zip(a, c, strict=True))
    assert not any(torch.equal(ia, id_) for (ia, _), (id_, _) in zip(a, d, strict=True))
    # scene i does not depend on the dataset length or on which items were read before
    longer = DigitScenes(domain="target", split="train", length=9, seed=3)
    assert torch.equal(longer[2][0], a[2][0])


@pytest.mark.parametrize("domain", ["source", "target"])
def test_cache_and_no_cache_agree(domain):
    cached = DigitScenes(domain=domain, split="test", length=6, strength=0.7, cache=True)
    fresh = DigitScenes(domain=domain, split="test", length=6, strength=0.7, cache=False)
    for i in [3, 0, 5, 1]:
        (ci, cl), (fi, fl) = cached[i], fresh[i]
        assert torch.equal(ci, fi) and torch.equal(cl, fl)
    # items are copies: editing one must not corrupt the cache
    cached[0][0].zero_()
    assert torch.equal(cached[0][0], fresh[0][0])


def test_disk_cache_round_trip_and_recovery(tmp_path, monkeypatch, caplog):
    """The rendered set is written once, read back identical by the next instance without
    rendering, named by its parameters; a corrupt file is rendered again and replaced; an
    unwritable folder leaves the scenes in memory with a warning."""
    kwargs = dict(domain="target", split="train", length=5, strength=0.6, seed=3, image_size=32)
    first = DigitScenes(**kwargs, cache_dir=tmp_path)
    items = [first[i] for i in range(5)]
    path = first.cache_file()
    assert path.is_file() and path.parent == tmp_path and list(tmp_path.iterdir()) == [path]
    for other in (dict(seed=4), dict(length=6), dict(strength=0.5), dict(domain="source")):
        assert DigitScenes(**{**kwargs, **other}, cache_dir=tmp_path).cache_file() != path

    def no_render(self, i):
        raise AssertionError("rendered although the cache file exists")

    with monkeypatch.context() as m:
        m.setattr(DigitScenes, "_render", no_render)
        again = DigitScenes(**kwargs, cache_dir=tmp_path)
        for i, (image, label) in enumerate(items):
            assert torch.equal(again[i][0], image) and torch.equal(again[i][1], label)

    path.write_bytes(b"not an array")
    with caplog.at_level("WARNING"):
        repaired = DigitScenes(**kwargs, cache_dir=tmp_path)
        assert torch.equal(repaired[2][0], items[2][0])
    assert "unreadable" in caplog.text and str(path) in caplog.text
    assert np.load(path).shape == (5, 4, 32, 32)

    blocked = tmp_path / "a_file"
    blocked.write_text("")
    caplog.clear()
    with caplog.at_level("WARNING"):
        in_memory = DigitScenes(**kwargs, cache_dir=blocked / "sub")
        assert torch.equal(in_memory[4][1], items[4][1])
    assert "could not keep the digits scenes" in caplog.text
    assert not list(tmp_path.glob(".*.tmp"))


def test_labels_follow_coverage_with_ignored_rim():
    rng = np.random.default_rng(7)
    for _ in range(20):
        alpha, label, used = sample_layout(rng, split="train", image_size=64)
        digit = (label > 0) & (label < IGNORE_INDEX)
        rim = label == IGNORE_INDEX
        assert np.all(alpha[digit] >= 0.5)
        assert np.all((alpha[rim] > 0.2) & (alpha[rim] < 0.5))
        assert np.all(alpha[label == 0] <= 0.2)
        if used:
            assert rim.any() and digit.any()  # anti-aliased digits always have a rim
        # every digit class present belongs to a digit that was placed
        placed = {int(d) + 1 for d in DIGIT_VALUES[used]}
        assert set(np.unique(label[digit]).tolist()) <= placed


def test_source_labels_consistent_with_pixels():
    ds = DigitScenes(domain="source", split="train", length=30)
    checked = 0
    for i in range(len(ds)):
        image, label = ds[i]
        grey, label = image.mean(0).numpy(), label.numpy()
        digit = grey[(label > 0) & (label < IGNORE_INDEX)]
        background, rim = grey[label == 0], grey[label == IGNORE_INDEX]
        if digit.size == 0:
            continue
        checked += 1
        # flat bright digits on flat grey: the labelled digit is clearly brighter everywhere
        assert np.percentile(digit, 1) > np.percentile(background, 99)
        assert digit.mean() > rim.mean() > background.mean()
    assert checked > 20


def test_train_and_test_digits_disjoint():
    train, test = digit_split()
    assert len(set(train.tolist()) & set(test.tolist())) == 0
    assert sorted([*train, *test]) == list(range(1797))
    assert len(train) == 1198 and len(test) == 599
    rng = np.random.default_rng(0)
    for split, pool in [("train", set(train.tolist())), ("test", set(test.tolist()))]:
        used = [i for _ in range(50) for i in sample_layout(rng, split=split, image_size=64)[2]]
        assert used and set(used) <= pool


@pytest.mark.parametrize("image_size", [64, 128, 256])
def test_train_and_test_photo_regions_disjoint(image_size):
    h, w = 427, 640
    (a0, a1), (b0, b1) = photo_column_range(w, "train"), photo_column_range(w, "test")
    assert a0 == 0 and a1 == b0 and b1 == w
    rng = np.random.default_rng(0)
    for split, (c0, c1) in [("train", (a0, a1)), ("test", (b0, b1))]:
        for _ in range(200):
            top, left, side = sample_photo_crop(rng, split=split, photo_hw=(h, w),
                                                image_size=image_size)
            assert c0 <= left and left + side <= c1 and 0 <= top and top + side <= h
            assert side >= min(image_size, c1 - c0)


def test_strength_zero_target_is_source_rendering():
    for k in range(5):
        kw = dict(split="test", image_size=64)
        src = render_scene(np.random.default_rng(k), domain="source", strength=1.0, **kw)
        tgt0 = render_scene(np.random.default_rng(k), domain="target", strength=0.0, **kw)
        tgt1 = render_scene(np.random.default_rng(k), domain="target", strength=1.0, **kw)
        assert np.array_equal(src[0], tgt0[0]) and np.array_equal(src[1], tgt0[1])
        assert np.array_equal(src[1], tgt1[1]) and not np.allclose(src[0], tgt1[0], atol=0.05)


def test_domain_gap_grows_with_strength():
    def colourfulness(domain, strength):
        ds = DigitScenes(domain=domain, split="test", length=24, strength=strength)
        return np.array([_colourfulness(ds[i][0].numpy()) for i in range(len(ds))])

    source, half, full = colourfulness("source", 0.5), colourfulness("target", 0.5), \
        colourfulness("target", 1.0)
    assert source.max() < 0.02  # grey up to per-channel noise
    assert full.min() > source.max()  # every full-strength target image is visibly coloured
    assert full.mean() > 1.5 * half.mean() > 2 * source.mean()


@pytest.mark.parametrize("layout, split, image_rel, label_rel", [
    ("gta5", "train", "images/00002.png", "labels/00002.png"),
    ("cityscapes", "test", "leftImg8bit/val/digits/digits_000000_000002_leftImg8bit.png",
     "gtFine/val/digits/digits_000000_000002_gtFine_labelIds.png"),
    ("cityscapes", "train", "leftImg8bit/train/digits/digits_000000_000002_leftImg8bit.png",
     "gtFine/train/digits/digits_000000_000002_gtFine_labelIds.png"),
])
def test_export_layout_reads_back(tmp_path, layout, split, image_rel, label_rel):
    kw = dict(domain="target", split=split, strength=0.8, seed=5, image_size=64)
    paths = write_layout(tmp_path, layout=layout, num_images=3, **kw)
    assert len(paths) == 3 and paths[2] == tmp_path / image_rel
    assert len([p for p in tmp_path.rglob("*.png")]) == 6
    ds = DigitScenes(length=3, **kw)
    image, label = ds[2]
    with Image.open(tmp_path / image_rel) as im:
        assert im.mode == "RGB"
        rgb = np.array(im)
    with Image.open(tmp_path / label_rel) as im:
        assert im.mode == "L"
        label_ids = np.array(im)
    assert np.array_equal(rgb, (image.numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8))
    expected = np.vectorize(TRAIN_ID_TO_LABEL_ID.__getitem__)(label.numpy())
    assert np.array_equal(label_ids, expected)
    assert set(np.unique(label_ids).tolist()) <= set(TRAIN_ID_TO_LABEL_ID.values())


def test_label_id_mapping_is_cityscapes():
    # Cityscapes label ids of train ids 0..10 (road .. sky); ignore goes to "unlabeled" (0)
    assert [TRAIN_ID_TO_LABEL_ID[t] for t in range(NUM_CLASSES)] == [
        7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23]
    assert TRAIN_ID_TO_LABEL_ID[IGNORE_INDEX] == 0


def test_export_cli(tmp_path, capsys):
    out = tmp_path / "gta"
    argv = ["--layout", "gta5", "--domain", "source", "--split", "train", "--num-images", "2",
            "--out", str(out)]
    assert main(argv) == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == ["00000.png", "00001.png"]
    capsys.readouterr()
    assert main(argv) == 2  # non-empty output directory
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err
    assert main([*argv, "--overwrite"]) == 0
    assert main([*argv[:-3], "0", "--out", str(tmp_path / "x"), "--overwrite"]) == 2
    assert "num_images" in capsys.readouterr().err


def test_export_cli_module_entry_point(tmp_path):
    (tmp_path / "junk").write_text("x")
    proc = subprocess.run(
        [sys.executable, "-m", "t2sda.data.write_layouts", "--layout", "cityscapes", "--domain",
         "target", "--split", "test", "--num-images", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not empty" in proc.stderr
