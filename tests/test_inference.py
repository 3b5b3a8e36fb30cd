"""load_trained: run-dir layouts, checkpoint choice, and one-line errors for bad input."""

from __future__ import annotations

import pytest
import torch

from t2sda import checkpoint
from t2sda.checkpoint import CheckpointError
from t2sda.config import ConfigError
from t2sda.inference import load_trained
from t2sda.presets import get_preset
from t2sda.state import build_state


def _cfg(**sets):
    return get_preset("digits").with_overrides([f"{k}={v}" for k, v in sets.items()])


def _save(directory, cfg, *, step, score, seed):
    state = build_state(cfg.with_overrides([f"seed={seed}"]), num_classes=11, device=torch.device("cpu"))
    state.step = step
    checkpoint.save(directory, {"state": state.state_dict(), "step": step}, score=score)
    return state


def _same(model, network) -> bool:
    ref = network.segmentor.state_dict()
    return all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    cfg = _cfg()
    cfg.save(root / "config.json")
    states = {step: _save(root / "checkpoints" / f"step_{step}", cfg, step=step, score=score, seed=step)
              for step, score in ((10, 5.0), (20, 9.0), (30, 7.0))}
    return root, states


def test_best_latest_and_step(run_dir):
    root, states = run_dir
    best = load_trained(run_dir=root)
    assert best.step == 20 and best.checkpoint.name == "step_20"
    assert _same(best.models["student"], states[20].student)
    assert not best.models["student"].training
    assert load_trained(run_dir=root, which="latest").step == 30
    both = load_trained(run_dir=root, which="step_10", model="both")
    assert set(both.models) == {"student", "teacher"}
    assert _same(both.models["teacher"], states[10].teacher.model)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_trained(run_dir=root, which="step_15")


def test_ray_layout(tmp_path):
    cfg = _cfg()
    cfg.save(tmp_path / "config.json")
    _save(tmp_path / "checkpoint_2026-01-01_00-00-01.000000", cfg, step=5, score=3.0, seed=1)
    _save(tmp_path / "checkpoint_2026-01-01_00-00-02.000000", cfg, step=10, score=1.0, seed=2)
    assert load_trained(run_dir=tmp_path).step == 5
    assert load_trained(run_dir=tmp_path, which="latest").step == 10


def test_errors(tmp_path, run_dir):
    root, _ = run_dir
    with pytest.raises(CheckpointError, match="not found"):
        load_trained(run_dir=tmp_path / "missing")
    with pytest.raises(CheckpointError, match="unknown layout"):
        load_trained(run_dir=tmp_path)
    with pytest.raises(CheckpointError, match="checkpoint has 11 classes, config 5"):
        load_trained(run_dir=root, config=_cfg(**{"data.name": "digits"}).with_overrides(
            ["data.num_classes=5"]))
    with pytest.raises(CheckpointError, match="not a deeplabv2_r101 checkpoint"):
        load_trained(checkpoint_path=root / "checkpoints" / "step_10",
                     config=_cfg(**{"model.name": "deeplabv2_r101"}))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_trained(checkpoint_path=bad, config=_cfg())
    with pytest.raises(ConfigError, match="--model"):
        load_trained(run_dir=root, model="ema")


def test_evaluate_cli_matches_training_validation(tmp_path, capsys):
    """evaluate's eval.json = the in-training validation (same code path's numbers) of that checkpoint."""
    import json

    from t2sda.__main__ import main
    from t2sda.data.loaders import build_datasets, eval_loader
    from t2sda.scoring import evaluate, iou_from_confusion

    cfg = _cfg(**{"data.val_scenes": 24, "data.train_scenes": 8, "data.image_size": 32})
    cfg.save(tmp_path / "config.json")
    state = _save(tmp_path / "checkpoints" / "step_5", cfg, step=5, score=1.0, seed=3)
    assert main(["evaluate", "--run-dir", str(tmp_path), "--model", "both", "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    data = build_datasets(cfg.data, seed=cfg.seed)
    student = state.student.eval()
    confs = evaluate({"student": student, "teacher": state.teacher}, eval_loader(data.val, batch_size=8),
                     num_classes=11, device=torch.device("cpu"))
    for name in ("student", "teacher"):
        assert report[name]["confusion"] == confs[name].tolist()
        assert report[name]["mIoU"] == pytest.approx(100 * iou_from_confusion(confs[name])[1].item())
        assert set(report[name]["IoU"]) == set(data.class_names)
    assert report["checkpoint"].endswith("step_5") and report["mode"] == "whole"
    assert "mIoU" in capsys.readouterr().out
    assert (tmp_path / "eval" / "confusion_student.png").read_bytes()[:4] == b"\x89PNG"
    # TTA of one view (scale 1, no flip) scores exactly as plain inference.
    assert main(["evaluate", "--run-dir", str(tmp_path), "--device", "cpu", "--tta", "--tta-scales", "1",
                 "--no-tta-flip", "--out", str(tmp_path / "tta")]) == 0
    tta = json.loads((tmp_path / "tta" / "eval.json").read_text())
    assert tta["confusion"] == report["student"]["confusion"] and tta["mode"] == "whole, tta scales 1"
    assert main(["evaluate", "--run-dir", str(tmp_path / "missing")]) == 2
    assert main(["evaluate", "--run-dir", str(tmp_path), "--tta", "--tta-scales", "0"]) == 2


# --- inference helpers (t2sda/predictions.py) ---------------------------------------------


class _PixelModel(torch.nn.Module):
    """A 1x1 convolution: every pixel on its own, so flipping commutes with it."""

    def __init__(self, k=4):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, k, 1)

    def forward(self, x):
        return self.conv(x), None


def _small(k=5, seed=0):
    from t2sda.models import build_model

    torch.manual_seed(seed)
    return build_model("small_cnn", num_classes=k).eval()


def test_tta_scale_one_without_flip_is_plain_inference():
    import torch.nn.functional as F

    from t2sda.predictions import probabilities
    from t2sda.scoring import predict, slide_logits

    model, image = _small(), torch.rand(2, 3, 24, 40)
    probs = probabilities(model, image, num_classes=5, size=(48, 80))
    expected = F.interpolate(model(image)[0], size=(48, 80), mode="bilinear", align_corners=False)
    assert torch.allclose(probs, expected.softmax(1), atol=1e-6)
    assert torch.equal(probs.argmax(1), predict(model, image, num_classes=5, size=(48, 80)))
    slid = probabilities(model, image, num_classes=5, crop=16, stride=8)
    assert torch.allclose(slid, slide_logits(model, image, num_classes=5, crop=16, stride=8).softmax(1),
                          atol=1e-6)


def test_tta_averages_scales_and_flips():
    import torch.nn.functional as F

    from t2sda.predictions import probabilities

    model, image = _small(), torch.rand(1, 3, 32, 48)

    def view(x):
        return F.interpolate(model(x)[0], size=(32, 48), mode="bilinear", align_corners=False).softmax(1)

    half = F.interpolate(image, size=(16, 24), mode="bilinear", align_corners=False)
    expected = (view(image) + view(image.flip(-1)).flip(-1) + view(half) + view(half.flip(-1)).flip(-1)) / 4
    got = probabilities(model, image, num_classes=5, scales=(1.0, 0.5), flip=True)
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, probabilities(model, image, num_classes=5, scales=(1.0, 0.5)), atol=1e-4)
    pixel = _PixelModel()  # flip-equivariant: flipped views agree with the plain one
    assert torch.allclose(probabilities(pixel, image, num_classes=4, flip=True),
                          probabilities(pixel, image, num_classes=4), atol=1e-6)


def test_label_ids_round_trip_and_official_table():
    import numpy as np
    from cityscapesscripts.helpers.labels import trainId2label

    from t2sda.data import folders
    from t2sda.predictions import to_label_ids

    pred = np.array([list(range(19)) + [255]], np.uint8)
    ids = to_label_ids(pred, 19)
    assert [int(i) for i in ids[0, :19]] == [trainId2label[t].id for t in range(19)]
    assert ids[0, 19] == 0  # ignore -> unlabeled
    back = folders.table("cityscapes")[ids]
    assert back.tolist() == [list(range(19)) + [-1 if folders.table("cityscapes")[0] < 0 else 255]]


def test_write_prediction_files(tmp_path):
    import numpy as np
    from PIL import Image

    from t2sda.predictions import colour, output_paths, write_prediction

    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    pred = np.random.default_rng(1).integers(0, 11, (20, 30), dtype=np.uint8)
    paths = output_paths(tmp_path, "leftImg8bit/val/x/x_000000_000001_leftImg8bit.png", "cityscapes")
    assert paths["labelIds"] == tmp_path / "labelIds/leftImg8bit/val/x/x_000000_000001_labelIds.png"
    write_prediction(paths, rgb, pred, num_classes=11, fmt="cityscapes", opacity=1.0)
    assert np.array_equal(np.asarray(Image.open(paths["color"])), colour(pred, 11))
    assert np.array_equal(np.asarray(Image.open(paths["overlay"])), colour(pred, 11))  # opacity 1
    raw = np.asarray(Image.open(paths["labelIds"]))
    assert raw.shape == (20, 30) and set(np.unique(raw)) <= {7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23}
    paths = output_paths(tmp_path, "a/b.jpg", "trainids")
    write_prediction(paths, rgb, pred, num_classes=11, fmt="trainids", opacity=0.0)
    assert np.array_equal(np.asarray(Image.open(paths["trainIds"])), pred)
    assert np.array_equal(np.asarray(Image.open(paths["overlay"])), rgb)  # opacity 0


def test_the_official_cityscapes_evaluator_agrees(tmp_path):
    """The judge: predictions written with --format cityscapes, scored by cityscapesscripts'
    pixel-level evaluator, give eval.json's mIoU and per-class IoUs."""
    import glob
    import json
    import math

    import numpy as np
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official

    from t2sda.__main__ import main
    from t2sda.data import labels
    from t2sda.data.write_layouts import write_layout

    root = tmp_path / "cityscapes"
    write_layout(root, layout="cityscapes", domain="target", split="test", num_images=2, image_size=48)
    from PIL import Image

    from t2sda.data import folders

    truth_ids = set()
    for gt in root.glob("gtFine/val/*/*_gtFine_labelIds.png"):
        truth_ids |= set(folders.table("cityscapes")[np.asarray(Image.open(gt))].ravel().tolist())
    missing = sorted(set(range(11)) - truth_ids)
    assert len(missing) >= 2  # the scenes hold 2-4 digits each
    cfg = _cfg().with_overrides(["data.name=real", "data.val=cityscapes", f"data.val_roots={root}",
                                 "data.val_split=val", "data.num_classes=11", "data.val_size=",
                                 f"data.cache_dir={tmp_path / 'cache'}"])
    run = tmp_path / "run"
    run.mkdir()
    cfg.save(run / "config.json")
    state = build_state(_cfg(), num_classes=11, device=torch.device("cpu"))
    with torch.no_grad():  # one class absent from the truth is never predicted either
        state.student.segmentor.head.classifier.bias[missing[0]] = -1e4
    checkpoint.save(run / "checkpoints" / "step_1", {"state": state.state_dict(), "step": 1}, score=0.0)
    assert main(["evaluate", "--run-dir", str(run), "--save-pred", str(tmp_path / "pred"),
                 "--format", "cityscapes", "--device", "cpu"]) == 0
    ours = json.loads((run / "eval" / "eval.json").read_text())
    assert (run / "eval" / "confusion.png").stat().st_size > 0

    official.args.quiet, official.args.JSONOutput, official.args.evalInstLevelScore = True, False, False
    official.args.predictionPath, official.args.predictionWalk = str(tmp_path / "pred" / "labelIds"), None
    gts = sorted(glob.glob(str(root / "gtFine" / "val" / "*" / "*_gtFine_labelIds.png")))
    preds = [official.getPrediction(official.args, gt) for gt in gts]
    result = official.evaluateImgLists(preds, gts, official.args)
    assert 100 * result["averageScoreClasses"] == pytest.approx(ours["mIoU"], abs=0.01)
    # Fair and tight: one class is absent from truth and prediction (NaN in both, left out of
    # both means), others are predicted but absent from the truth (IoU 0, counted by both), and
    # every class has the same IoU.
    assert ours["IoU"][labels.CLASS_NAMES[missing[0]]] is None
    assert any(ours["IoU"][labels.CLASS_NAMES[c]] == 0 for c in missing[1:])
    for name in labels.CLASS_NAMES:
        theirs = result["classScores"][name]
        mine = ours["IoU"].get(name)
        assert (mine is None) == math.isnan(theirs), name
        if mine is not None:
            assert 100 * theirs == pytest.approx(mine, abs=1e-6)
