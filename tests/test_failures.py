"""Failures the user must see: each one a one-line error or warning, never silence (issue 14 §3)."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from t2sda import checkpoint
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
# The CLI in a subprocess, with validation replaced by one that returns a NaN mean: the path
# from train() through __main__'s error handling is the real one.
_NAN_VALIDATION = """
import sys
import t2sda.train
t2sda.train._validate = lambda *a, **k: {"val/mIoU": float("nan"), "val/mIoU_teacher": 50.0}
from t2sda.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_nonfinite_validation_miou_is_one_line_exit_1(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", _NAN_VALIDATION, "train", "--run-dir", str(run), "--device", "cpu",
         "--set", *TINY, "train.iters=1", "train.eval_every=1", "train.checkpoint_every=1"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1, proc.stderr
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err == "t2sda: error: step 1: validation mIoU is not finite (val/mIoU=nan)"
    assert not (run / "checkpoints").exists()  # nothing scored NaN was saved


def _ckpt(root: Path, step: int, score: float | None) -> Path:
    return checkpoint.save(root / f"step_{step:07d}", {"state": {}, "step": step}, score=score).parent


def test_prune_keeps_a_checkpoint_whose_meta_is_corrupt(tmp_path, caplog):
    dirs = [_ckpt(tmp_path, step, score) for step, score in [(10, 9.0), (20, 1.0), (30, 2.0),
                                                                  (40, 0.5)]]
    (dirs[0] / checkpoint.META_FILE).write_text('{"step": 10, "sc')  # torn: maybe the best one
    with caplog.at_level(logging.WARNING, logger="t2sda"):
        deleted = checkpoint.prune(tmp_path, keep=1)
    # Kept: step 10 (score unknown), step 30 (best readable), step 40 (newest).
    assert deleted == [dirs[1]]
    assert [p.name for _, p in checkpoint.step_dirs(tmp_path)] == [d.name for d in (dirs[0], *dirs[2:])]
    assert "step_0000010" in caplog.text and "meta.json unreadable" in caplog.text


def test_failed_pruning_is_a_warning_naming_the_dir(tmp_path, caplog, monkeypatch):
    dirs = [_ckpt(tmp_path, step, score) for step, score in [(10, 1.0), (20, 2.0), (30, 3.0)]]

    def refuse(path, *a, **k):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(checkpoint.shutil, "rmtree", refuse)
    with caplog.at_level(logging.WARNING, logger="t2sda"):
        assert checkpoint.prune(tmp_path, keep=1) == []
    assert f"checkpoint {dirs[0]}: could not be pruned (PermissionError: Permission denied)" in caplog.text


def test_tensorboard_warns_once_per_nonfinite_tag(tmp_path, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from t2sda.tb import TBLogger

    logger = TBLogger(tmp_path)
    with caplog.at_level(logging.WARNING, logger="t2sda"):
        for step, value in enumerate([1.0, float("nan"), float("inf"), 2.0]):
            logger.scalar("val/IoU/road", value, step)
    logger.close()
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == ["tensorboard: val/IoU/road is nan at step 1; non-finite values of this tag "
                        "are not plotted (warned once)"]
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("val/IoU/road")] == [(0, 1.0), (3, 2.0)]


def test_unreadable_autoscaling_limits_fail_closed(monkeypatch):
    pytest.importorskip("ray")
    from ray._private.state import state

    from t2sda.config import ConfigError
    from t2sda.ray_glue import driver

    def broken():
        raise AttributeError("'GlobalState' object has no attribute 'global_state_accessor'")

    monkeypatch.setattr(state, "get_max_resources_from_cluster_config", broken)
    monkeypatch.delenv(driver.ASSUME_FIXED_ENV, raising=False)
    with pytest.raises(ConfigError, match=r"cannot read the Ray cluster's autoscaling limits .*"
                       r"AttributeError.*set T2SDA_CLUSTER_FIXED=1"):
        driver.autoscaling()
    monkeypatch.setenv(driver.ASSUME_FIXED_ENV, "1")  # the user's explicit override
    assert driver.autoscaling() is False
    assert driver.capacity(present={"CPU": 4}) == {"CPU": 4, "GPU": 0}


def _gpu_check_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts/gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_exits_1_when_every_configuration_failed(tmp_path, monkeypatch, capsys):
    gpu_check = _gpu_check_module()

    def all_fail(loop_config, device):  # what check() writes when every run raised
        runs = [{"model": "small_cnn", "amp": amp, "error": "out of memory"} for amp in ("none", "bf16")]
        Path(loop_config["result"]).write_text(json.dumps({
            "runs": runs, "launcher": loop_config["launcher"], "device": "cpu",
            "group": {"backend": "gloo", "world_size": 1, "all_reduce_ok": True}}))

    monkeypatch.setattr(gpu_check, "launch_local", all_fail)
    monkeypatch.setattr(gpu_check, "table", lambda result: "| table |")  # its layout is not under test
    code = gpu_check.main(["--cpu-smoke", "--launcher", "torch", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 1, err
    assert err == ("gpu_check: error: all 2 configurations failed (first: small_cnn none: "
                   "out of memory)")


def test_gpu_check_joins_ray_address(monkeypatch):
    pytest.importorskip("ray")
    import ray

    gpu_check = _gpu_check_module()
    seen = []

    def fake_init(**kwargs):
        seen.append(kwargs.get("address"))
        raise SystemExit("stop here")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    with pytest.raises(SystemExit):
        gpu_check.launch_ray({}, use_gpu=False)
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(SystemExit):
        gpu_check.launch_ray({}, use_gpu=False)
    assert seen == ["10.0.0.1:6379", "local"]


def _unused_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


def _no_ray_start(monkeypatch):
    """driver.connect with Ray's own start replaced by a recorder (no cluster is started)."""
    import ray

    from t2sda.ray_glue import driver

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    for name in ("RAY_ADDRESS", driver.API_SERVER_ENV, driver.PREEMPTION_WATCHER_ENV):
        monkeypatch.delenv(name, raising=False)
    return driver, calls


def test_a_dead_ray_start_record_starts_a_local_cluster_with_a_warning(monkeypatch, caplog):
    driver, calls = _no_ray_start(monkeypatch)
    stale = f"127.0.0.1:{_unused_port()}"  # what /tmp/ray/ray_current_cluster holds after a crash
    monkeypatch.setattr(driver, "_ray_start_address", lambda: stale)
    with caplog.at_level(logging.WARNING, logger="t2sda"):
        assert driver.connect(dashboard=False) is True
    assert calls == [{"address": "local", "include_dashboard": False}]  # never the dead address
    assert f"recorded on this machine ({stale}) is gone" in caplog.text


def test_a_dead_ray_address_is_one_line(monkeypatch):
    from t2sda.config import ConfigError

    driver, calls = _no_ray_start(monkeypatch)
    dead = f"127.0.0.1:{_unused_port()}"
    monkeypatch.setenv("RAY_ADDRESS", dead)
    with pytest.raises(ConfigError, match=rf"RAY_ADDRESS='{dead}': no Ray cluster answers there"):
        driver.connect(dashboard=False)
    assert calls == []
    assert driver.auth.listening("auto") and driver.auth.listening("ray://10.0.0.5:10001")  # left to Ray
