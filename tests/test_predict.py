"""python -m t2sda predict: inputs, files written at the input's size, skips, overwrite, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from t2sda.__main__ import main


def _image(path, w, h, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return rgb


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "in"
    _image(folder / "a.png", 40, 30, 0)
    _image(folder / "b.jpg", 40, 30, 1)
    _image(folder / "sub" / "c.png", 50, 20, 2)
    (folder / "bad.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("not an image, ignored in folders")
    return folder


def _predict(run_dir, out, *inputs, extra=()):
    return main(["predict", "--run-dir", str(run_dir), "--out", str(out), "--device", "cpu", *extra,
                 *map(str, inputs)])


def test_folder_writes_masks_at_input_size_and_skips_bad_files(run_dir, images, tmp_path, capsys):
    out = tmp_path / "out"
    assert _predict(run_dir, out, images, extra=["--legend"]) == 1  # bad.png was skipped
    err = capsys.readouterr().err
    assert "bad.png: not a readable image" in err and "predicted 3 images, skipped 1: see above" in err
    for rel, size in (("a", (40, 30)), ("b", (40, 30)), ("sub/c", (50, 20))):
        for kind in ("color", "overlay", "trainIds"):
            with Image.open(out / kind / f"{rel}_{kind}.png") as im:
                assert im.size == size
        assert np.asarray(Image.open(out / "trainIds" / f"{rel}_trainIds.png")).max() < 11
    assert not list(out.rglob("notes*")) and not list(out.rglob("bad*"))
    assert Image.open(out / "legend.png").size[1] > 11 * 10


def test_predictions_equal_the_model_and_do_not_depend_on_batching(run_dir, tmp_path):
    from t2sda.inference import load_trained
    from t2sda.predictions import segment

    folder = tmp_path / "in"
    rgbs = [_image(folder / f"{i}.png", 36, 28, i) for i in range(3)]
    assert _predict(run_dir, tmp_path / "b1", folder, extra=["--batch-size", "1"]) == 0
    assert _predict(run_dir, tmp_path / "b8", folder, extra=["--batch-size", "8"]) == 0
    model = load_trained(run_dir=run_dir).models["student"]
    for i, rgb in enumerate(rgbs):
        one = np.asarray(Image.open(tmp_path / "b1" / "trainIds" / f"{i}_trainIds.png"))
        assert np.array_equal(one, np.asarray(Image.open(tmp_path / "b8" / "trainIds" / f"{i}_trainIds.png")))
        image = torch.from_numpy(rgb).permute(2, 0, 1).float()[None] / 255
        assert np.array_equal(one, segment(model, image, num_classes=11)[0].numpy())


def test_size_resizes_before_inference_and_writes_at_input_size(run_dir, tmp_path):
    from t2sda.inference import load_trained
    from t2sda.predictions import segment

    rgb = _image(tmp_path / "x.png", 48, 40)
    assert _predict(run_dir, tmp_path / "out", tmp_path / "x.png", extra=["--size", "24x20", "--tta",
                                                                         "--tta-scales", "1,1.5"]) == 0
    written = np.asarray(Image.open(tmp_path / "out" / "trainIds" / "x_trainIds.png"))
    small = np.asarray(Image.fromarray(rgb).resize((24, 20), Image.BILINEAR))
    image = torch.from_numpy(small.copy()).permute(2, 0, 1).float()[None] / 255
    model = load_trained(run_dir=run_dir).models["student"]
    expected = segment(model, image, num_classes=11, size=(40, 48), tta=(1.0, 1.5))[0].numpy()
    assert written.shape == (40, 48) and np.array_equal(written, expected)


def test_globs_and_overwrite(run_dir, images, tmp_path, capsys):
    out = tmp_path / "out"
    assert _predict(run_dir, out, f"{images}/*.png") == 1  # a.png, and bad.png skipped
    a = out / "color" / "a_color.png"
    before = a.read_bytes()
    assert _predict(run_dir, out, images / "a.png") == 2
    assert f"{a} exists (pass --overwrite" in capsys.readouterr().err
    assert a.read_bytes() == before
    assert _predict(run_dir, out, images / "a.png", extra=["--overwrite", "--opacity", "1"]) == 0
    overlay = np.asarray(Image.open(out / "overlay" / "a_overlay.png"))
    assert np.array_equal(overlay, np.asarray(Image.open(a)))


@pytest.mark.parametrize("inputs,extra,message", [
    (["empty"], [], "no images"),
    (["missing.png"], [], "missing.png: no such file or folder"),
    (["nothing*.png"], [], "matches no file"),
    (["x.png"], ["--size", "big"], "--size 'big'"),
    (["x.png"], ["--tta", "--tta-scales", "1,a"], "--tta-scales"),
    (["x.png"], ["--format", "cityscapes", "--batch-size", "0"], "--batch-size 0"),
    (["x.png"], ["--device", "gpu7"], "--device 'gpu7'"),
])
def test_errors_are_one_line_exit_2(run_dir, tmp_path, capsys, inputs, extra, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    _image(tmp_path / "x.png", 8, 8)
    assert _predict(run_dir, tmp_path / "out", *inputs, extra=extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_unwritable_out(run_dir, tmp_path, capsys):
    _image(tmp_path / "x.png", 8, 8)
    (tmp_path / "file").write_text("")
    assert _predict(run_dir, tmp_path / "file" / "out", tmp_path / "x.png") == 2
    assert "--out" in capsys.readouterr().err
