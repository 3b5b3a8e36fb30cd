"""Dataset folders: layouts on tiny generated trees, label tables, the recipe's transforms,
rare-class sampling, the scan cache, full-resolution sliding-window evaluation, and the
digits written in these layouts trained through these loaders."""

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from t2sda.config import Config
from t2sda.data import folders, labels, rcs, scan, transforms
from t2sda.data.loaders import batch_stream, build_datasets
from t2sda.data.real import FolderDataset
from t2sda.presets import PRESETS, get_preset
from t2sda.scoring import evaluate
from tests.test_evaluate import _Pointwise

# Image i of a split, written where the official layout keeps it; the label path beside it
# is spelled out independently of the code under test.
IMAGE_PATH = {
    "cityscapes": lambda s, i: f"leftImg8bit/{s}/aachen/aachen_{i:06d}_000019_leftImg8bit.png",
    "gta5": lambda s, i: f"images/{i:05d}.png",
    "synthia": lambda s, i: f"RGB/{i:07d}.png",
    "bdd100k": lambda s, i: f"images/10k/{s}/{i:08x}-c0ffee.jpg",
    "mapillary": lambda s, i: f"{'training' if s == 'train' else 'validation'}/images/m{i}.jpg",
    "acdc": lambda s, i: f"rgb_anon/fog/{s}/GOPR0475/GOPR0475_frame_{i:06d}_rgb_anon.png",
    "dark_zurich": lambda s, i: f"rgb_anon/{s}/night/GOPR0356/GOPR0356_frame_{i:06d}_rgb_anon.png",
}
LABEL_PATH_0 = {
    "cityscapes": "gtFine/val/aachen/aachen_000000_000019_gtFine_labelIds.png",
    "gta5": "labels/00000.png",
    "synthia": "GT/LABELS/0000000.png",
    "bdd100k": "labels/sem_seg/masks/val/00000000-c0ffee.png",
    "mapillary": "validation/labels/m0.png",
    "acdc": "gt/fog/val/GOPR0475/GOPR0475_frame_000000_gt_labelIds.png",
    "dark_zurich": "gt/val/night/GOPR0356/GOPR0356_frame_000000_gt_labelIds.png",
}


def write_png16(path: Path, array: np.ndarray) -> None:
    """A 16-bit RGB PNG as SYNTHIA ships them (Pillow cannot write these). Rows use the Sub
    filter, whose 6-byte pixel stride a decoder must get right."""
    h, w, c = array.shape
    raw = array.astype(">u2").view(np.uint8).reshape(h, w * c * 2).astype(np.int16)
    sub = raw.copy()
    sub[:, c * 2:] -= raw[:, :-c * 2]
    rows = b"".join(b"\x01" + (row % 256).astype(np.uint8).tobytes() for row in sub)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def write_label(path: Path, ids: np.ndarray, name: str, rng) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if name == "synthia":  # class in channel 0, an instance id in channel 1
        instance = rng.integers(0, 60_000, ids.shape)
        write_png16(path, np.stack([ids, instance, np.zeros_like(ids)], axis=-1).astype(np.uint16))
    elif name in ("gta5", "mapillary"):  # palette PNGs: the index is the id
        im = Image.fromarray(ids.astype(np.uint8), mode="P")
        im.putpalette(list(range(256)) * 3)
        im.save(path)
    else:
        Image.fromarray(ids.astype(np.uint8)).save(path)


def make_tree(root: Path, name: str, split: str = "val", *, n: int = 2, size=(40, 24), seed=0,
              ids: list[int] | None = None) -> list[np.ndarray]:
    """Write n random image/label pairs; returns the label-id maps (H, W)."""
    rng = np.random.default_rng(seed)
    spec = folders.layout(name)
    ids = ids if ids is not None else list(range(spec.num_ids)) + list(spec.ignore_ids)
    maps = []
    for i in range(n):
        image_path = root / IMAGE_PATH[name](split, i)
        image_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(image_path)
        label = rng.choice(ids, (size[1], size[0]))
        write_label(root / spec.label_of(IMAGE_PATH[name](split, i)), label, name, rng)
        maps.append(label)
    return maps


def expected_train_ids(name: str, ids: np.ndarray) -> np.ndarray:
    table = {**{i: 255 for i in range(256)}, **folders.layout(name).train_ids}
    return np.vectorize(table.get)(ids)


def test_cityscapes_table_matches_torchvision():
    official = [c for c in torchvision.datasets.Cityscapes.classes if c.id >= 0]
    for name in ("cityscapes", "gta5", "acdc", "dark_zurich"):
        table = folders.table(name)
        for c in official:
            want = c.train_id if 0 <= c.train_id < 19 else labels.IGNORE
            assert table[c.id] == want, (name, c.name)
        assert (table[34:] == labels.UNKNOWN).all()
    by_train_id = sorted((c.train_id, c.name) for c in official if 0 <= c.train_id < 19)
    assert tuple(n for _, n in by_train_id) == labels.CLASS_NAMES


def test_synthia_table_by_class_names():
    synthia = ["void", "sky", "building", "road", "sidewalk", "fence", "vegetation", "pole", "car",
               "traffic sign", "pedestrian", "bicycle", "motorcycle", "parking-slot", "road-work",
               "traffic light", "terrain", "rider", "truck", "bus", "train", "wall", "lanemarking"]
    table = folders.table("synthia")
    for label_id, name in enumerate(synthia):
        name = "person" if name == "pedestrian" else name
        want = labels.CLASS_NAMES.index(name) if name in labels.CLASS_NAMES else labels.IGNORE
        assert table[label_id] == want, name
    names16 = {labels.CLASS_NAMES[c] for c in labels.SYNTHIA_16}
    assert len(names16) == 16 and not names16 & {"terrain", "truck", "train"}
    assert {labels.CLASS_NAMES[c] for c in labels.SYNTHIA_13} == names16 - {"wall", "fence", "pole"}


def test_mapillary_table_spot_checks():
    table = folders.table("mapillary")
    for vistas_id, name in [(13, "road"), (24, "road"), (15, "sidewalk"), (2, "sidewalk"),
                            (17, "building"), (6, "wall"), (3, "fence"), (45, "pole"),
                            (48, "traffic light"), (50, "traffic sign"), (30, "vegetation"),
                            (29, "terrain"), (27, "sky"), (19, "person"), (20, "rider"),
                            (55, "car"), (61, "truck"), (54, "bus"), (58, "train"),
                            (57, "motorcycle"), (52, "bicycle")]:
        assert table[vistas_id] == labels.CLASS_NAMES.index(name), vistas_id
    for ignored in (0, 4, 10, 12, 16, 56, 60, 63, 64, 65):  # bird, guard rail, parking, ..., void
        assert table[ignored] == labels.IGNORE
    assert table[66] == labels.UNKNOWN
    assert sorted(set(table[:66]) - {labels.IGNORE}) == list(range(19))


@pytest.mark.parametrize("name", sorted(folders.LAYOUTS))
def test_layout_reads_back(tmp_path, name):
    maps = make_tree(tmp_path, name, "val" if name not in ("gta5", "synthia") else "train")
    split = "val" if name not in ("gta5", "synthia") else "train"
    files, problems = folders.list_files(name, tmp_path, split)
    assert problems == [] and len(files) == 2
    if split == "val":
        assert files[0][1] == LABEL_PATH_0[name]
    ds = FolderDataset(name, tmp_path, files, mode="eval", table=folders.table(name), scale=None)
    for i, ids in enumerate(maps):
        image, label = ds[i]
        assert image.shape == (3, 24, 40) and image.dtype == torch.float32
        assert np.array_equal(label.numpy(), expected_train_ids(name, ids)), name


def test_synthia_16bit_ids_are_exact(tmp_path):
    ids = np.array([[3, 21, 300], [0, 22, 1]])
    write_png16(tmp_path / "l.png", np.stack([ids, ids * 1000, ids], -1).astype(np.uint16))
    assert np.array_equal(folders.read_label(tmp_path / "l.png", bits16=True, exact=True), ids)
    assert np.array_equal(folders.read_label(tmp_path / "l.png", bits16=True), ids % 256)


def test_roots_from_config_or_environment():
    env = {"T2SDA_DATA": "/data", "T2SDA_GTA5_ROOT": "/fast/gta"}
    assert folders.default_root("gta5", env) == "/fast/gta"
    assert folders.default_root("cityscapes", env) == "/data/cityscapes"
    assert folders.default_root("synthia", {}) == ""


def test_explicit_root_beats_environment(tmp_path, monkeypatch):
    make_tree(tmp_path / "gta", "gta5", "train")
    make_tree(tmp_path / "cs", "cityscapes", "train")
    make_tree(tmp_path / "cs", "cityscapes", "val")
    monkeypatch.setenv("T2SDA_GTA5_ROOT", str(tmp_path / "missing"))
    monkeypatch.setenv("T2SDA_CITYSCAPES_ROOT", str(tmp_path / "cs"))
    cfg = Config().with_overrides([
        "data.name=real", f"data.source_root={tmp_path / 'gta'}", "data.source_val_images=0",
        f"data.cache_dir={tmp_path / 'c'}",
        "data.source_size=", "data.target_size=", "data.val_size=", "data.crop_size=16"])
    data = build_datasets(cfg.data, seed=0)
    assert data.source.root == tmp_path / "gta" and data.val.root == tmp_path / "cs"
    image, label = next(batch_stream(data.source, batch_size=2, seed=0))
    assert image.shape == (2, 3, 16, 16) and label.shape == (2, 16, 16)
    assert (next(batch_stream(data.target, batch_size=2, seed=0))[1] == 255).all()


def test_fit_size_follows_the_recipes():
    assert transforms.fit_size((1914, 1052), (1280, 720)) == (1280, 704)
    assert transforms.fit_size((2048, 1024), (1024, 512)) == (1024, 512)
    assert transforms.fit_size((1280, 760), (1280, 760)) == (1280, 760)
    assert transforms.fit_size((1280, 720), (1024, 512)) == (910, 512)


def test_train_sample_is_a_function_of_the_draw():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (60, 100, 3), dtype=np.uint8))
    label = rng.integers(0, 19, (60, 100)).astype(np.uint8)

    def sample(draw):
        return transforms.train_sample(rcs.draw_generator(1, draw), image, label, scale=(50, 30),
                                       crop=20, flip=True)

    a, b = sample(5), sample(5)
    assert a[0].shape == (3, 20, 20) and a[1].shape == (20, 20)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert any(not torch.equal(a[0], sample(d)[0]) for d in range(6, 10))
    small = transforms.train_sample(rcs.draw_generator(0, 0), image, label, scale=(20, 10),
                                    crop=16, flip=False)
    assert small[0].shape == (3, 16, 16) and (small[1][10:] == 255).all()  # padded: ignored


def test_class_statistics_and_cache(tmp_path, monkeypatch):
    maps = make_tree(tmp_path, "gta5", "train", n=3)
    files, _ = folders.list_files("gta5", tmp_path, "train")
    records = scan.scan("gta5", tmp_path, files, full=False, cache_dir=tmp_path / "cache")
    table = folders.table("gta5")
    pixels = scan.class_pixels(records, table, 19)
    train_ids = [expected_train_ids("gta5", m) for m in maps]
    want = np.array([[np.count_nonzero(t == c) for c in range(19)] + [np.count_nonzero(t == 255)]
                     for t in train_ids])
    assert np.array_equal(pixels, want)

    calls = []
    real_scan_file = scan.scan_file
    monkeypatch.setattr(scan, "scan_file", lambda *a, **k: calls.append(a[1]) or real_scan_file(*a, **k))
    assert scan.scan("gta5", tmp_path, files, full=False, cache_dir=tmp_path / "cache") == records
    assert calls == []  # every file came from the cache
    make_tree(tmp_path, "gta5", "train", n=1, seed=9)  # rewrites image 0 and its label
    scan.scan("gta5", tmp_path, files, full=False, cache_dir=tmp_path / "cache")
    assert calls == ["images/00000.png"]


def test_sliding_window_equals_whole_image_at_full_resolution(tmp_path):
    make_tree(tmp_path, "cityscapes", "val", n=2, size=(64, 32), ids=[0, 7, 8, 11, 12, 13])
    files, _ = folders.list_files("cityscapes", tmp_path, "val")
    ds = FolderDataset("cityscapes", tmp_path, files, mode="eval", table=folders.table("cityscapes"),
                       scale=(32, 16))
    image, label = ds[0]
    assert image.shape == (3, 16, 32) and label.shape == (32, 64)  # scored at full size
    torch.manual_seed(0)
    model = _Pointwise()  # per-pixel: any window gives the same logits for its pixels
    loader = torch.utils.data.DataLoader(ds, batch_size=2)
    whole = evaluate({"m": model}, loader, num_classes=5, device=torch.device("cpu"))["m"]
    assert whole.sum() == (torch.stack([ds[i][1] for i in range(2)]) != 255).sum()
    for crop, stride in ((32, 16), (64, 64)):  # windows covering the image
        slid = evaluate({"m": model}, loader, num_classes=5, device=torch.device("cpu"),
                        crop=crop, stride=stride)["m"]
        assert torch.equal(slid, whole)


def test_presets_are_the_recipes():
    for name in ("gta2cs_daformer", "gta2cs_deeplabv2", "syn2cs_daformer", "syn2cs_deeplabv2",
                 "gta_dg_daformer"):
        cfg = get_preset(name)
        assert Config.from_dict(cfg.to_dict()) == cfg and name in PRESETS
        d = cfg.data
        assert (d.name, d.crop_size, d.batch_size, d.target_size, d.rcs_temperature) == \
            ("real", 512, 2, "1024x512", 0.01)
        assert (cfg.method.pseudo_ignore_top, cfg.method.pseudo_ignore_bottom) == (15, 120)
        assert cfg.train.iters == 40000 and cfg.optim.warmup_iters == 1500
    assert get_preset("syn2cs_daformer").data.size("source") == (1280, 760)
    assert get_preset("gta2cs_deeplabv2").data.size("source") == (1280, 720)
    dg = get_preset("gta_dg_daformer")
    assert dg.data.target == "" and dg.data.val == "cityscapes,bdd100k,mapillary"


def _digits_in_layouts(tmp_path, cfg):
    """The digits datasets of ``cfg`` written as GTA5 (source) and Cityscapes (target, val)."""
    from t2sda.data.write_layouts import write_layout

    d, kw = cfg.data, {"strength": cfg.data.strength, "image_size": cfg.data.image_size}
    write_layout(tmp_path / "gta", layout="gta5", domain="source", split="train",
                 num_images=d.train_scenes, seed=cfg.seed, **kw)
    write_layout(tmp_path / "cs", layout="cityscapes", domain="target", split="train",
                 num_images=d.train_scenes, seed=cfg.seed + 1, **kw)
    write_layout(tmp_path / "cs", layout="cityscapes", domain="target", split="test",
                 num_images=d.val_scenes, seed=10_000, **kw)
    return cfg.with_overrides([
        "data.name=real", f"data.source_root={tmp_path / 'gta'}", "data.source_val_images=0",
        f"data.target_root={tmp_path / 'cs'}",
        "data.source_size=", "data.target_size=", "data.val_size=", "data.crop_size=0",
        "data.flip=false", "data.cat_max_ratio=1", "data.num_classes=11",
        f"data.cache_dir={tmp_path / 'cache'}"])


def test_digits_through_folder_loaders_give_the_same_batches(tmp_path, tiny_cfg):
    real_cfg = _digits_in_layouts(tmp_path, tiny_cfg)
    builtin, folder = (build_datasets(c.data, seed=c.seed) for c in (tiny_cfg, real_cfg))
    assert folder.num_classes == builtin.num_classes == 11
    for i in range(3):
        for a, b in zip(builtin.val[i], folder.val[i]):
            assert torch.equal(a, b)
    for which in ("source", "target"):
        streams = [batch_stream(getattr(d, which), batch_size=4, seed=7, start_step=2)
                   for d in (builtin, folder)]
        for _ in range(3):
            (a_img, a_label), (b_img, b_label) = (next(s) for s in streams)
            assert torch.equal(a_img, b_img)
            if which == "source":
                assert torch.equal(a_label, b_label)


def test_digits_through_folder_loaders_train_the_same(tmp_path, tiny_cfg):
    from t2sda.train import train

    real_cfg = _digits_in_layouts(tmp_path, tiny_cfg)
    a = train(tiny_cfg, device="cpu", run_dir=tmp_path / "builtin")
    b = train(real_cfg, device="cpu", run_dir=tmp_path / "folders")
    assert "val/IoU/road" in b  # scored through the Cityscapes table: digit "0" is sidewalk
    assert a["val/mIoU"] == b["val/mIoU"] and a["val/mIoU_teacher"] == b["val/mIoU_teacher"]
    ious = [[v for k, v in m.items() if k.startswith("val/IoU/")] for m in (a, b)]
    assert ious[0] == ious[1]


def test_source_val_split_is_disjoint_order_free_and_outside_rcs(tmp_path):
    from t2sda.data.real import DataError, split_source_val

    files = [(f"images/{i:03d}.png", f"labels/{i:03d}.png") for i in range(40)]
    train, held = split_source_val(files, 7)
    assert len(held) == 7 and not set(train) & set(held) and sorted(train + held) == list(range(40))
    shuffled = files[::-1]  # the rule follows the paths, not the list order
    assert {files[i] for i in held} == {shuffled[i] for i in split_source_val(shuffled, 7)[1]}
    with pytest.raises(DataError, match="data.source_val_images=40"):
        split_source_val(files, 40)

    make_tree(tmp_path / "gta", "gta5", "train", n=6)
    make_tree(tmp_path / "cs", "cityscapes", "train")
    make_tree(tmp_path / "cs", "cityscapes", "val")
    cfg = Config().with_overrides([
        "data.name=real", f"data.source_root={tmp_path / 'gta'}", f"data.target_root={tmp_path / 'cs'}",
        "data.source_val_images=2", f"data.cache_dir={tmp_path / 'c'}", "data.rcs_temperature=0.5",
        "data.rcs_min_pixels=1", "data.source_size=", "data.target_size=", "data.val_size=",
        "data.crop_size=16"])
    data = build_datasets(cfg.data, seed=0)
    held_files, train_files = set(data.source_val.files), set(data.source.files)
    assert len(held_files) == 2 and len(train_files) == 4 and not held_files & train_files
    assert data.source_val.mode == "eval"
    # Rare-class sampling counts, and draws, only training images.
    assert len(data.source.class_pixels) == 4
    sampler = data.source.sampler(seed=0, rank=0, world_size=1, start=0)
    draws = [key for key, _ in zip(sampler, range(50))]
    assert {data.source.files[index] for _, index, _ in draws} <= train_files


def test_digits_source_val_is_held_out_source_scenes(tiny_cfg):
    from t2sda.data import digits

    data = build_datasets(tiny_cfg.with_overrides({"data.source_val_images": 3}).data, seed=0)
    assert len(data.source_val) == 3 and data.source_val.domain == "source"
    assert data.source_val.split == "test"  # digits never used by the training scenes
    assert not set(digits.digit_split()[0]) & set(digits.digit_split()[1])
    again = build_datasets(tiny_cfg.with_overrides({"seed": 5, "data.source_val_images": 3}).data, seed=5)
    assert torch.equal(data.source_val[0][0], again.source_val[0][0])  # the same for every run
    none = build_datasets(tiny_cfg.with_overrides({"data.source_val_images": 0}).data, seed=0)
    assert none.source_val is None
