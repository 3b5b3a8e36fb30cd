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
    from t2sda.evaluate import evaluate, iou_from_confusion

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
    assert main(["evaluate", "--run-dir", str(tmp_path / "missing")]) == 2
