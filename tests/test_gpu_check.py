import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _smoke(out: Path, *args: str) -> dict:
    """scripts/gpu_check.py --cpu-smoke as on a lent machine (its own process), one model."""
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--cpu-smoke", "--out", str(out),
                           "--models", "deeplabv2_r101", "--configs", "none", "none+ckpt", *args],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "gpu_check_cpu_smoke.json").read_text())
    assert result["group"]["all_reduce_ok"] and result["group"]["world_size"] == 1
    assert [(r["model"], r["config"], r["grad_checkpoint"]) for r in result["runs"]] == [
        ("deeplabv2_r101", "none", False), ("deeplabv2_r101", "none+ckpt", True)]
    for run in result["runs"]:
        assert "error" not in run, run
        assert run["images_per_s"] > 0 and run["tflop_per_step"] > 0
        assert set(run["phases_ms"]) == {"student forward", "teacher forward", "pull loss",
                                         "re-weighting", "backward", "optimizer", "EMA", "other"}
        assert all(run["phases_ms"][p] > 0 for p in ("student forward", "backward", "pull loss",
                                                      "re-weighting", "EMA"))
        phases = run["phases_ms"]
        share = (phases["pull loss"] + phases["re-weighting"]) / run["step_ms_phase_timed"]
        assert run["pull_reweight_share"] == pytest.approx(share) and 0 < share < 1
    table = (out / "gpu_check_cpu_smoke.md").read_text()
    assert "| deeplabv2_r101 | none+ckpt |" in table
    return result


def test_gpu_check_configs_are_validated(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts/gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    assert gpu_check.parse_config("bf16+compile+ckpt") == {
        "train.amp": "bf16", "train.compile": "default", "train.grad_checkpoint": True}
    for _, label in gpu_check.RUNS:  # every default configuration is a valid config
        gpu_check.parse_config(label)
    assert gpu_check.PRESETS["daformer_mitb5_hrda"] == "gta2cs_hrda"
    assert {("daformer_mitb5_hrda", "bf16"), ("daformer_mitb5_hrda", "bf16+ckpt")} <= set(gpu_check.RUNS)
    assert gpu_check.main(["--cpu-smoke", "--configs", "bf16+fast"]) == 2
    assert "--configs: configuration 'bf16+fast'" in capsys.readouterr().err


@pytest.mark.slow
def test_gpu_check_smoke_in_process(tmp_path):
    result = _smoke(tmp_path, "--launcher", "torch")
    assert result["group"]["backend"] == "gloo" and "ray not used" in result["launcher"]


@pytest.mark.slow
@pytest.mark.ray
def test_gpu_check_smoke_through_ray_train(tmp_path, ray_cluster):
    # RAY_ADDRESS (set by the fixture) makes the script's worker join the session's cluster.
    result = _smoke(tmp_path, "--launcher", "ray")
    assert result["group"]["backend"] == "gloo" and "Ray Train" in result["launcher"]


@pytest.mark.slow
def test_gpu_check_hrda_configuration_measures_on_cpu():
    """The HRDA configuration (gta2cs_hrda's step, context crops twice the detail crop) runs
    with and without activation checkpointing at toy size, in this process."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts/gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    sizes = {**gpu_check.SIZES["cpu_smoke"], "size": 32, "steps": 1, "phase_steps": 1}
    for label in ("none", "none+ckpt"):
        run = gpu_check.measure("daformer_mitb5_hrda", label, torch.device("cpu"), sizes)
        assert run["images_per_s"] > 0 and run["grad_checkpoint"] == label.endswith("ckpt")
