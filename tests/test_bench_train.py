import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "scripts" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_speed_table_ratio_and_target():
    bench = _bench()
    runs = [{"mode": m, "workers": w, "steps_per_s": s, "images_per_s": i, "startup_s": 5.0,
             "wall_s": 9.0}
            for m, w, s, i in [("in_process", 0, 10.0, 640), ("ray_1", 1, 9.5, 608),
                               ("ray_1", 1, 8.5, 544), ("ray_2", 2, 8.0, 1024)]]
    text, summary = bench.speed_table(runs)
    assert summary["ray_1"]["steps_per_s"] == 9.0 and summary["ray_1"]["repeats"] == 2  # median
    assert summary["ray_1_vs_in_process"] == pytest.approx(0.9) and summary["target_met"]
    assert "| Ray Train, 2 workers | 2 | 8.00 | 1024 | 80.0 % | 5.0 | 9.0 |" in text
    assert "keeps 90.0 %" in text and ": met)" in text


def test_quality_table_difference_per_seed():
    bench = _bench()
    runs = [{"setting": name, "seed": seed, "mIoU": miou, "mIoU_teacher": miou, "wall_s": 60.0}
            for name, seed, miou in [("1x32", 0, 50.0), ("1x32", 1, 54.0), ("2x16", 0, 51.0),
                                     ("2x16", 1, 53.0)]]
    text, summary = bench.quality_table(runs, [0, 1])
    assert summary["difference"]["mean"] == 0.0 and summary["difference"]["within_seed_noise"]
    assert "| 2 workers x batch 16 | 51.0 | 53.0 | **52.0 ± 1.4** |" in text


def test_speed_overrides_scale_the_warm_up_and_evaluate_once():
    overrides = _bench().speed_overrides("digits", 300, ["train.eval_every=5"])
    assert overrides[0] == "method.self_training_start=150"  # 600 of 1200 in the preset
    assert overrides[-4:] == ["train.iters=300", "train.eval_every=300",
                              "train.checkpoint_every=300", "train.log_every=300"]
