"""Ray Train path: 2-worker DDP on gloo, re-run resume, injected and real worker failures,
resource errors. One Ray per session (``ray_cluster`` in conftest)."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from t2sda.config import ConfigError
from tests.conftest import TINY

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]


def _steps(run: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def _checkpoint_step(path: Path) -> int:
    """The step a Ray checkpoint dir holds (its meta.json, written by t2sda.checkpoint)."""
    return json.loads((path / "meta.json").read_text())["step"]


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "t2sda", "train", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout, env=dict(os.environ))


def test_two_workers_stay_identical_and_write_once(ray_cluster, tiny_cfg, tmp_path):
    from t2sda.ray_glue import driver

    run = tmp_path / "run"
    cfg = tiny_cfg.with_overrides(["train.threads=1", "train.eval_every=1", "train.checkpoint_every=1"])
    metrics = driver.fit(cfg, run_dir=run, workers=2, max_failures=0)
    assert metrics["step"] == 6 and _steps(run) == [1, 2, 3, 4, 5, 6]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:  # parameters, buffers as DDP broadcasts them, class weights: bit for bit
        assert row["dist/param_diff"] == 0.0
        assert row["dist/buffer_diff"] == 0.0
        assert row["dist/class_weight_diff"] == 0.0
    # The student's BatchNorm stats after a step are each rank's own (its shard): they differ,
    # which is why dist/buffer_diff reads them as broadcast, not as they end the step.
    assert max(row["dist/student_bn_spread"] for row in rows) > 0
    # Rank 0 alone writes TensorBoard; Ray Train writes no events of its own.
    assert len(list(run.rglob("events.out.tfevents.*"))) == 1
    assert json.loads((run / "config.json").read_text())["train"]["iters"] == 6
    # Six checkpoints were reported; Ray keeps the best train.keep_checkpoints (2) by val mIoU
    # (ties: the later one) plus the latest, and deletes the others.
    kept = {_checkpoint_step(p) for p in run.glob("checkpoint_*") if p.is_dir()}
    by_score = sorted(rows, key=lambda r: (r["val/mIoU"], r["step"]), reverse=True)
    scores = [(r["step"], r["val/mIoU"]) for r in rows]
    assert kept == {by_score[0]["step"], by_score[1]["step"], 6}, (kept, scores)
    assert not (run / "checkpoints").exists()


def test_one_worker_reproduces_in_process_train(ray_cluster, tiny_cfg, tmp_path):
    """Ray Train with one worker runs the same computation as train() in this process: same
    seed, so every evaluation's metrics agree to float tolerance (timings aside)."""
    from t2sda.ray_glue import driver
    from t2sda.train import train

    cfg = tiny_cfg.with_overrides(["train.threads=1"])
    handler = signal.getsignal(signal.SIGINT)
    driver.fit(cfg, run_dir=tmp_path / "ray", workers=1, max_failures=0)
    # Ray Train's Ctrl-C handler (which holds its controller) is gone again, and with it the
    # controller: nothing of a finished run keeps running beside the next one.
    assert signal.getsignal(signal.SIGINT) is handler
    _wait_for_no_alive("TrainController")
    train(cfg, device="cpu", run_dir=tmp_path / "local")
    ray_rows, local_rows = ([json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text()
                             .splitlines()] for d in ("ray", "local"))
    assert [r["step"] for r in ray_rows] == [r["step"] for r in local_rows] == [3, 6]
    for ray_row, local_row in zip(ray_rows, local_rows, strict=True):
        keys = {k for k in local_row if not k.startswith(("perf/", "dist/"))}
        assert keys == {k for k in ray_row if not k.startswith(("perf/", "dist/"))}
        assert local_row["dist/world_size"] == ray_row["dist/world_size"] == 1
        for key in keys:  # null: a class absent from truth and prediction in both runs
            expected = local_row[key]
            assert ray_row[key] == (None if expected is None else pytest.approx(expected, abs=1e-4)), key
        assert local_row["val/mIoU"] > 0  # it learned something: equal is not trivially 0 == 0


def test_injected_failure_restarts_from_checkpoint(ray_cluster, tiny_cfg, tmp_path):
    from t2sda.ray_glue import driver

    run = tmp_path / "run"
    cfg = tiny_cfg.with_overrides(["train.threads=1", "train.fail_at_step=4"])
    metrics = driver.fit(cfg, run_dir=run, workers=1, max_failures=1)
    assert (run / ".failed_once").exists()  # it did fail once ...
    assert metrics["step"] == 6 and _steps(run) == [3, 6]  # ... and resumed at step 3


def test_failure_without_retries_then_rerun_resumes(ray_cluster, tiny_cfg, tmp_path):
    from t2sda.ray_glue import driver

    run = tmp_path / "run"
    cfg = tiny_cfg.with_overrides(["train.threads=1", "train.fail_at_step=4"])
    with pytest.raises(driver.TrainingFailed, match="injected failure at step 4"):
        driver.fit(cfg, run_dir=run, workers=1, max_failures=0)
    assert _steps(run) == [3]
    # The same command on the same run dir continues from its checkpoint at step 3.
    proc = _cli("--workers", "1", "--run-dir", str(run), "--set", *TINY, "train.threads=1",
                "train.fail_at_step=4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resuming from step 3" in proc.stdout + proc.stderr
    assert _steps(run) == [3, 6]


def test_resource_errors_are_immediate(ray_cluster):
    from t2sda.ray_glue.driver import check_resources

    with pytest.raises(ConfigError, match="--gpu: the Ray cluster has no GPU"):
        check_resources(workers=1, use_gpu=True, cpus_per_worker=1)
    with pytest.raises(ConfigError, match=r"64 workers x 1 CPU need CPU=64, but the Ray cluster "
                                          r"has CPU=4"):
        check_resources(workers=64, use_gpu=False, cpus_per_worker=1)
    with pytest.raises(ConfigError, match="CPU=12"):
        check_resources(workers=2, use_gpu=False, cpus_per_worker=2, concurrent=3)
    check_resources(workers=2, use_gpu=False, cpus_per_worker=2)  # fits: no error


@pytest.mark.parametrize("args, fragment", [
    (["--workers", "1", "--gpu"], "--gpu: the Ray cluster has no GPU"),
    (["--workers", "9"], "9 workers x 1 CPU need CPU=9"),
])
def test_cli_resource_errors_one_line(ray_cluster, tmp_path, args, fragment):
    """Refusals that need the cluster's resources: the CLI as a user runs it."""
    proc = _cli("--run-dir", str(tmp_path / "run"), *args, timeout=300)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and err and fragment in err[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before any training


def _main_in_process(monkeypatch, capsys, *args) -> tuple[int, str]:
    """``t2sda train`` in this process, with Ray made unreachable: what it refuses, it must
    refuse before connecting to (or starting) Ray."""
    from t2sda.__main__ import main
    from t2sda.ray_glue import driver

    def no_ray(*_, **__):
        raise AssertionError("connected to Ray before the input was checked")

    monkeypatch.setattr(driver, "connect", no_ray)
    code = main(["train", *args])
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("args, fragment", [
    (["--workers", "1", "--cpus-per-worker", "0"], "--cpus-per-worker 0: must be > 0"),
    (["--workers", "-1"], "--workers -1: must be >= 0"),
    (["--gpu"], "--gpu needs --workers N"),
])
def test_cli_argument_errors_one_line(tmp_path, monkeypatch, capsys, args, fragment):
    code, err = _main_in_process(monkeypatch, capsys, "--run-dir", str(tmp_path / "run"), *args)
    assert code == 2 and err.splitlines() == [f"t2sda: error: {err.split('error: ', 1)[1]}"]
    assert fragment in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_cli_unwritable_run_dir_before_any_worker(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, err = _main_in_process(monkeypatch, capsys, "--workers", "2", "--run-dir", str(blocker / "run"))
    assert code == 2 and "not writable" in err and len(err.splitlines()) == 1


def test_cli_refuses_in_process_run_dir(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 3}\n')
    code, err = _main_in_process(monkeypatch, capsys, "--workers", "1", "--run-dir", str(run))
    assert code == 2 and "holds an in-process run" in err
    assert (run / "metrics.jsonl").read_text() == '{"step": 3}\n'  # untouched


@pytest.mark.slow
def test_sigkill_of_a_worker_resumes_from_latest_checkpoint(ray_cluster, tmp_path):
    """A real crash: SIGKILL a worker mid-run; the group restarts from the latest checkpoint
    and finishes at the right step, losing at most one checkpoint interval."""
    run = tmp_path / "run"
    args = ["--workers", "2", "--run-dir", str(run), "--max-failures", "1", "--set", *TINY,
            "train.threads=1", "train.iters=40", "train.eval_every=5", "train.checkpoint_every=5"]
    proc = subprocess.Popen([sys.executable, "-m", "t2sda", "train", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 180
        # Rank 0's progress lines carry its pid: "(RayTrainWorker pid=N) t2sda: step 10 ...".
        pattern = re.compile(r"pid=(\d+)\).*t2sda: step (\d+) ")
        while not (hits := [m for m in map(pattern.search, list(lines)) if m and
                            int(m.group(2)) >= 10]):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)[-3000:]
            time.sleep(0.1)
        os.kill(int(hits[0].group(1)), signal.SIGKILL)
        # Every evaluation here is also a checkpoint, reported before this line was printed;
        # Ray's controller may not have registered it yet, so up to one interval is lost.
        killed_after = int(hits[0].group(2))
        proc.wait(timeout=240)
        reader.join(timeout=10)
    finally:
        proc.kill()
    out = "".join(lines)
    assert proc.returncode == 0, out[-3000:]
    resumed = [int(m) for m in re.findall(r"resuming from step (\d+)", out)]
    assert len(resumed) == 1 and resumed[0] >= killed_after - 5, out[-3000:]
    assert _steps(run) == list(range(5, 41, 5))  # one row per evaluation, none repeated


def _wait_for_no_alive(class_name: str, timeout: float = 30.0) -> None:
    from ray.util.state import list_actors

    deadline = time.monotonic() + timeout
    while True:
        alive = list_actors(filters=[("class_name", "=", class_name), ("state", "=", "ALIVE")])
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not alive, f"{len(alive)} {class_name} actor(s) still alive"
