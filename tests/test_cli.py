import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, module="t2sda"):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def _one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err


@pytest.mark.parametrize("args, fragments", [
    (["--preset", "nope"], ["unknown preset 'nope'", "digits_hard"]),
    (["--set", "method.nope=1"], ["unknown config key 'method.nope'"]),
    (["--set", "train.iters=ten"], ["train.iters='ten'", "expected an integer"]),
    (["--set", "method.pull_temperature=0"], ["method.pull_temperature=0.0", "must be > 0"]),
    (["--set", "method.ema_momentum=1.5"], ["method.ema_momentum=1.5", "[0, 1)"]),
    (["--set", "train.iters=-1"], ["train.iters=-1", ">= 0"]),
    (["--config", "/nonexistent/config.json"], ["config file /nonexistent/config.json"]),
    (["--device", "cuda:0"], ["CUDA is not available"]),
])
def test_bad_input_is_one_line_exit_2(args, fragments, tmp_path, capsys):
    from t2sda.__main__ import main

    code = main(["train", "--run-dir", str(tmp_path / "run"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("t2sda: error: "), err
    assert all(fragment in err for fragment in fragments), err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_run_dir_errors(tmp_path):
    """As a user runs it (a subprocess): the one-line message, exit 2, no traceback."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _one_line_error(_cli("train", "--run-dir", str(blocker / "run")), "not writable")
    _one_line_error(_cli("train", "--run-dir", str(tmp_path / "empty"), "--resume"),
                    "no checkpoint to resume from")


@pytest.mark.slow
def test_train_then_resume_and_refuse_overwrite(tmp_path):
    run = tmp_path / "run"
    done = _cli("--run-dir", str(run), "--set", *TINY, module="t2sda.train")  # DESIGN.md's form
    assert done.returncode == 0, done.stderr
    assert "val/mIoU" in done.stdout
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 6
    # Same run dir again without --resume: refused, nothing touched.
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    _one_line_error(_cli("train", "--run-dir", str(run), "--set", *TINY), "already holds a run")
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    # --resume keeps the run's config: a different one is refused, naming the key ...
    _one_line_error(_cli("train", "--run-dir", str(run), "--resume", "--set", "train.iters=9"),
                    "--resume: the config differs", "train.iters: 6 -> 9", "--change-on-resume")
    _one_line_error(_cli("train", "--run-dir", str(run), "--resume", "--preset", "digits"),
                    "data.image_size: 32 -> 64")  # the preset without the first run's --set
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    # ... without flags it continues as started (finished: nothing to do) ...
    same = _cli("train", "--run-dir", str(run), "--resume")
    assert same.returncode == 0, same.stderr
    assert json.loads((run / "config.json").read_text())["train"]["iters"] == 6
    # ... and --change-on-resume applies --set on top of it, says so and records it.
    more = _cli("train", "--run-dir", str(run), "--resume", "--change-on-resume",
                "--set", "train.iters=9")
    assert more.returncode == 0, more.stderr
    assert "train.iters: 6 -> 9" in more.stdout + more.stderr
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 6, 9]
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["iters"] == 9 and saved["data"]["image_size"] == 32
    changes = [json.loads(x) for x in (run / "changes.jsonl").read_text().splitlines()]
    assert [c["changes"] for c in changes] == [{"train.iters": [6, 9]}]


@pytest.mark.slow
def test_corrupt_checkpoint_is_not_overwritten(tmp_path):
    run = tmp_path / "run"
    assert _cli("train", "--run-dir", str(run), "--set", *TINY).returncode == 0
    state = run / "checkpoints" / "step_0000006" / "state.pt"
    state.write_bytes(b"\x00corrupt")
    _one_line_error(_cli("train", "--run-dir", str(run), "--resume", "--set", *TINY),
                    "unreadable", str(state))
    assert state.read_bytes() == b"\x00corrupt"


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path):
    """The DDP path without Ray: two CPU processes, rank 0 writes the run dir once."""
    run = tmp_path / "run"
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "-m", "t2sda", "train", "--run-dir", str(run),
         "--set", *TINY, "train.threads=1"],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 6]
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    assert proc.stdout.count("done: val/mIoU") == 1


def test_missing_pretrained_checkpoint_is_one_line(tmp_path):
    missing = tmp_path / "nope.pth"
    _one_line_error(_cli("train", "--run-dir", str(tmp_path / "run"), "--set",
                         f"model.pretrained={missing}"),
                    f"model.pretrained='{missing}'", "not found")
