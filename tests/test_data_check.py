"""``python -m t2sda data check`` on clean and broken trees, and training refusing bad data."""

import json

import numpy as np
import pytest
from PIL import Image

from t2sda.__main__ import main
from t2sda.config import ConfigError
from t2sda.data import folders, labels
from t2sda.data.check import check
from t2sda.data.loaders import build_datasets
from t2sda.presets import get_preset
from tests.test_datasets import expected_train_ids, make_tree, write_png16


def test_clean_tree_histogram(tmp_path, capsys):
    maps = make_tree(tmp_path, "cityscapes", "val", n=3)
    assert main(["data", "check", "--dataset", "cityscapes", "--root", str(tmp_path),
                 "--split", "val", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"dataset", "num_images", "class_pixels", "ignored_pixels", "problems"}
    train_ids = np.stack([expected_train_ids("cityscapes", m) for m in maps])
    assert report["num_images"] == 3 and report["problems"] == []
    assert list(report["class_pixels"]) == list(labels.CLASS_NAMES)
    assert report["class_pixels"]["traffic light"] == np.count_nonzero(train_ids == 6)
    assert report["ignored_pixels"] == np.count_nonzero(train_ids == 255)
    assert main(["data", "check", "--dataset", "cityscapes", "--root", str(tmp_path),
                 "--split", "val"]) == 0
    text = capsys.readouterr().out
    assert "3 images" in text and "traffic light" in text and "0 problem(s)" in text


def _break_gta5(root):
    """A GTA5 tree with one of each problem; returns the bad paths."""
    make_tree(root, "gta5", "train", n=6, ids=[7, 8, 26])
    (root / "labels/00001.png").unlink()  # image without label
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(root / "labels/00002.png")  # size mismatch
    Image.fromarray(np.full((24, 40), 40, np.uint8)).save(root / "labels/00003.png")  # id 40
    data = (root / "images/00004.png").read_bytes()
    (root / "images/00004.png").write_bytes(data[: len(data) // 2])  # truncated PNG
    Image.fromarray(np.zeros((24, 40), np.uint8)).save(root / "labels/99999.png")  # label alone
    return ["images/00001.png", "labels/00002.png", "labels/00003.png", "images/00004.png",
            "labels/99999.png"]


def test_broken_tree_lists_every_problem(tmp_path):
    bad = _break_gta5(tmp_path)
    report = check("gta5", tmp_path, "train")
    assert report["num_images"] == 6 and len(report["problems"]) == len(bad)
    for path, problem in zip(sorted(bad), report["problems"]):
        assert problem.startswith(str(tmp_path / path)), (path, problem)
    text = "\n".join(report["problems"])
    assert "no label" in text and "5x5" in text and "outside the table: 40" in text
    assert "unreadable" in text and "label without an image" in text


def test_missing_root_and_wrong_layout(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert check("gta5", missing)["problems"] == [f"{missing}: dataset root does not exist"]
    make_tree(tmp_path, "cityscapes", "train")
    [problem] = check("gta5", tmp_path)["problems"]
    assert "images/*.png" in problem and "gta5 layout" in problem
    assert main(["data", "check", "--dataset", "gta5", "--root", str(tmp_path), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["num_images"] == 0


def test_synthia_ids_beyond_8_bits_are_unknown(tmp_path):
    make_tree(tmp_path, "synthia", "train", n=1)
    ids = np.full((24, 40), 3)
    ids[0, 0] = 256 + 3  # the low byte alone would read as road
    write_png16(tmp_path / "GT/LABELS/0000000.png", np.stack([ids, ids, ids], -1).astype(np.uint16))
    [problem] = check("synthia", tmp_path)["problems"]
    assert problem.endswith("label ids outside the table: 259")


def _real_cfg(tmp_path, source_root):
    make_tree(tmp_path / "cs", "cityscapes", "train")
    make_tree(tmp_path / "cs", "cityscapes", "val")
    return get_preset("gta2cs_deeplabv2").with_overrides([
        f"data.source_root={source_root}", f"data.target_root={tmp_path / 'cs'}",
        f"data.cache_dir={tmp_path / 'cache'}"])


def test_training_refuses_a_broken_tree_in_one_line(tmp_path):
    _break_gta5(tmp_path / "gta")
    cfg = _real_cfg(tmp_path, tmp_path / "gta")
    with pytest.raises(ConfigError) as err:
        build_datasets(cfg.data, seed=0)
    message = str(err.value)
    assert "\n" not in message and "5 problem(s)" in message
    assert f"python -m t2sda data check --dataset gta5 --root {tmp_path / 'gta'} --split train" in message


def test_training_cli_exits_2_on_bad_data(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("T2SDA_DATA", raising=False)
    monkeypatch.delenv("T2SDA_GTA5_ROOT", raising=False)
    assert main(["train", "--preset", "gta2cs_deeplabv2", "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "data.source_root is not set" in err and "T2SDA_GTA5_ROOT" in err
    _real_cfg(tmp_path, tmp_path / "missing")
    assert main(["train", "--preset", "gta2cs_deeplabv2", "--run-dir", str(tmp_path / "run2"),
                 "--set", f"data.source_root={tmp_path / 'missing'}",
                 f"data.target_root={tmp_path / 'cs'}", f"data.cache_dir={tmp_path / 'c'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "dataset root does not exist" in err and "data check" in err


def test_layout_names_match_config_choices():
    with pytest.raises(ConfigError, match="data.source='kitti'"):
        get_preset("gta2cs_daformer").with_overrides(["data.source=kitti"])
    with pytest.raises(ConfigError, match="data.source_size='1280'"):
        get_preset("gta2cs_daformer").with_overrides(["data.source_size=1280"])
    with pytest.raises(ConfigError, match="data.val_split='test'"):
        get_preset("gta2cs_daformer").with_overrides(["data.val=bdd100k", "data.val_split=test"])
    assert set(folders.LAYOUTS) == {"cityscapes", "gta5", "synthia", "bdd100k", "mapillary",
                                    "acdc", "dark_zurich"}
