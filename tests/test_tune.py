"""tune.py end to end through Ray on tiny settings: Optuna + ASHA, per-trial TensorBoard,
best_config.json, resume after Ctrl-C, errored trials, bad input. One Ray per session."""

import csv
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from t2sda.config import Config
from t2sda.ray_glue import search, summary
from t2sda.train import train

ROOT = Path(__file__).resolve().parents[1]
TINY_SEARCH = [
    "data.image_size=32", "data.train_scenes=48", "data.val_scenes=16", "data.batch_size=4",
    "train.eval_every=2", "train.checkpoint_every=2", "train.log_every=2", "train.threads=1",
    "method.self_training_start=2", "method.pull_warmup=0", "method.weight_warmup=2",
    "method.num_queries=16", "method.num_negatives=16", "optim.warmup_iters=1",
    "data.source_val_images=8",
]


def _rows(exp: Path) -> list[dict]:
    with (exp / "results.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.mark.ray
def test_search_end_to_end(ray_cluster, tmp_path, capsys):
    # Ranked by a label-free validator (entropy, lower is better); the default metric
    # (target mIoU) runs in the interrupted-search test below.
    code = search.main(["--space", "pull_loss", "--storage", str(tmp_path), "--name", "e2e",
                        "--metric", "entropy", "--num-samples", "3", "--max-concurrent", "1",
                        "--grace-period", "4", "--reduction-factor", "2", "--confirm", "1",
                        "--confirm-seeds", "2", "--set", *TINY_SEARCH, "train.iters=12"])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    exp = tmp_path / "e2e"
    rows = _rows(exp)
    assert len(rows) == 3 and all(r["status"] == "TERMINATED" for r in rows)
    params = [tuple(v for k, v in r.items() if k.startswith("method.")) for r in rows]
    assert len(set(params)) == 3  # three distinct sampled configurations
    # The preset's own values are tried first, so the search holds the default as a reference.
    assert any(r["method.pull_temperature"] == "0.2" and r["method.pull_weight"] == "0.1"
               for r in rows)
    steps = sorted(int(r["steps"]) for r in rows)
    assert steps[0] < 12 and steps[-1] == 12  # ASHA stopped at least one trial early
    # ... but never the preset's own point: the reference of the verdict runs to the end.
    assert all(r["steps"] == "12" for r in rows if r["method.pull_temperature"] == "0.2"
               and r["method.pull_weight"] == "0.1")
    rung_report = json.loads((exp / "rungs.json").read_text())
    assert [r["rung"] for r in rung_report["rungs"]] == [4, 8]
    assert "ASHA rungs against the end" in out
    # Optuna's state is saved with the experiment (and holds every trial).
    state = next(exp.glob("searcher-state-*.pkl"))
    study = pickle.loads(state.read_bytes())["_ot_study"]
    assert len(study.trials) == 3
    # The source-only steps 0-2 were trained once; every trial started from there (its first
    # evaluation is step 4, not 2) with the teacher restarted at adaptation (EMA is searched).
    record = json.loads((exp / "warmup.json").read_text())
    assert record["step"] == 2 and Path(record["checkpoint"]).is_dir()
    for row in rows:
        run = exp / f"train-{row['trial_id']}"
        assert json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["step"] == 4
        assert json.loads((run / "config.json").read_text())["method"]["teacher_reset"] is True
    # TensorBoard: Tune's per-trial scalars + HParams, and each trial's own training curves.
    for row in rows:
        tune_events = list((exp / f"trial-{row['trial_id']}").glob("events.out.tfevents.*"))
        train_events = list((exp / f"train-{row['trial_id']}").glob("events.out.tfevents.*"))
        assert len(tune_events) == 1 and len(train_events) == 1
    assert any(b"hparams" in p.read_bytes() for p in exp.glob("trial-*/events.out.tfevents.*"))
    assert (exp / "summary.png").read_bytes()[:4] == b"\x89PNG"
    assert "top 3 of 3 trials" in out and "tensorboard --logdir" in out
    # Ranked by entropy: the best trial has the lowest; every validator is scored as a selector.
    best = json.loads((exp / "best_config.json").read_text())
    assert best["metric"] == "select/best_entropy"
    assert float(best["value"]) == min(float(r["entropy"]) for r in rows)
    saved = json.loads((exp / "selection.json").read_text())
    assert {"source_miou", "agreement", "entropy", "snd", "target_miou"} <= set(saved)
    assert saved["entropy"]["picked_trial"] == best["trial_id"]
    assert float(next(r for r in rows if r["trial_id"] == best["trial_id"])["target_miou"]) == \
        pytest.approx(saved["entropy"]["picked_target_miou"])
    assert "model selection" in out
    # Confirmation: the default and the best other trial, 2 paired adaptation seeds each (the
    # search's own full-length runs count as seed 0), judged by the search's metric (entropy).
    confirmed = json.loads((exp / "confirm.json").read_text())
    assert confirmed["metric"] == "select/best_entropy" and confirmed["seed_kind"] == "adaptation"
    assert set(confirmed["configs"]) == {"default", "#1"}
    assert all(c["n"] == 2 for c in confirmed["configs"].values())
    trained = [r for r in confirmed["replicates"] if r["from"] == "confirm"]
    assert trained and all(r["seed"] in (0, 1) for r in trained)
    for r in trained:  # a replicate from the shared warm-up: its first evaluation is step 4
        cfg_file = json.loads((Path(r["run_dir"]) / "config.json").read_text())
        assert cfg_file["adapt_seed"] == r["seed"]
    assert (exp / "confirm.png").read_bytes()[:4] == b"\x89PNG"
    assert "target_miou" in confirmed  # ranked label-free: target mIoU reported beside it
    assert out.rstrip().splitlines()[-1] == confirmed["verdict"]
    assert "confirmed" in json.loads((exp / "best_config.json").read_text())
    # best_config.json trains with the winning parameters.
    cfg = Config.load(exp / "best_config.json").with_overrides(["train.iters=2"])
    assert cfg.method.pull_temperature == best["params"]["method.pull_temperature"]
    metrics = train(cfg, device=torch.device("cpu"), run_dir=tmp_path / "best-run")
    assert metrics["step"] == 2


@pytest.mark.ray
@pytest.mark.slow
def test_interrupted_search_resumes_without_rerunning_finished_trials(ray_cluster, tmp_path):
    args = [sys.executable, "tune.py", "--space", "pull_loss", "--storage", str(tmp_path),
            "--name", "resume", "--num-samples", "2", "--max-concurrent", "1", "--scheduler",
            "none", "--confirm", "0", "--set", *TINY_SEARCH, "train.iters=16", "train.eval_every=4",
            "train.checkpoint_every=4"]
    exp = tmp_path / "resume"
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=dict(os.environ))
    try:  # Ctrl-C once the first trial has finished and the second has a checkpoint
        hang_guard = time.monotonic() + 1800  # not a speed check: only stops a hung search
        while True:
            runs = sorted(exp.glob("train-*"), key=lambda p: p.stat().st_mtime)
            done = [r for r in runs if '"step": 16' in _read(r / "metrics.jsonl")]
            second = [r for r in runs if r not in done and _read(r / "metrics.jsonl")]
            if done and second:
                break
            assert proc.poll() is None, "the search ended before the second trial had a checkpoint"
            assert time.monotonic() < hang_guard, "search hung"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert "--resume" in out
    finished = done[0]
    before = (finished / "metrics.jsonl").read_text()
    events_before = sorted(p.name for p in finished.glob("events.out.tfevents.*"))

    resumed = subprocess.run([*args, "--resume"], cwd=ROOT, capture_output=True, text=True,
                             timeout=1800, env=dict(os.environ))  # a hang guard only
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-2000:]
    assert "resuming from step" in resumed.stdout + resumed.stderr  # the unfinished one
    # The finished trial was not run again: its logs are untouched.
    assert (finished / "metrics.jsonl").read_text() == before
    assert sorted(p.name for p in finished.glob("events.out.tfevents.*")) == events_before
    rows = _rows(exp)
    assert len(rows) == 2 and all(r["status"] == "TERMINATED" and r["steps"] == "16" for r in rows)


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


@pytest.mark.ray
def test_failed_trials_are_recorded_and_the_search_goes_on(ray_cluster, tmp_path, capsys):
    # Every trial raises once at step 3 and has no restarts: both must run, both errored.
    code = search.main(["--space", "ema", "--storage", str(tmp_path), "--name", "fail",
                        "--num-samples", "2", "--max-concurrent", "1", "--max-failures", "0",
                        "--scheduler", "none", "--no-shared-warmup", "--set", *TINY_SEARCH, "train.iters=4",
                        "train.fail_at_step=3"])
    out = capsys.readouterr().out
    rows = _rows(tmp_path / "fail")
    assert code == 1 and len(rows) == 2
    assert all(r["status"] == "ERROR" and "injected failure" in r["error"] for r in rows)
    assert "2 of 2 trials errored" in out
    assert not (tmp_path / "fail" / "best_config.json").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--space", "nope"], "unknown search space 'nope' (available: ema, full, pull_loss, weighting)"),
    (["--space", "pull_loss", "--set", "method.nope=1"], "unknown config key 'method.nope'"),
    (["--space", "pull_loss", "--num-samples", "0"], "--num-samples 0: must be >= 1"),
    (["--space", "pull_loss", "--confirm-seeds", "1"], "--confirm-seeds 1: a verdict needs at least 2"),
    (["--space", "pull_loss", "--confirm", "-1"], "--confirm -1: must be >= 0"),
    (["--space", "pull_loss", "--confirm-set", "nope=1"], "unknown config key 'nope'"),
    (["--space", "pull_loss", "--max-concurrent", "0"], "--max-concurrent 0: must be >= 1"),
    (["--space", "pull_loss", "--resume"], "--resume: no experiment to resume"),
    (["--space", "pull_loss", "--change-on-resume"], "--change-on-resume needs --resume"),
    ([], "--space is required"),
])
def test_bad_input_one_line_exit_2(tmp_path, args, fragment, capsys, monkeypatch):
    import ray

    def no_ray(*_, **__):
        raise AssertionError("Ray started before the input was checked")

    monkeypatch.setattr(ray, "init", no_ray)
    try:
        code = search.main(["--storage", str(tmp_path), *args])
    except SystemExit as stop:  # argparse's own errors
        code = stop.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and fragment in err, err[-2000:]
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_tune_script_exits_2_on_bad_input(tmp_path):
    """The script itself (one subprocess; the other bad inputs run in-process above)."""
    proc = subprocess.run([sys.executable, "tune.py", "--space", "nope", "--storage", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == ("tune.py: error: unknown search space 'nope' "
                                   "(available: ema, full, pull_loss, weighting)")


def test_existing_experiment_needs_resume(tmp_path, capsys):
    (tmp_path / "pull_loss-digits").mkdir()
    (tmp_path / "pull_loss-digits" / "tuner.pkl").write_bytes(b"x")
    code = search.main(["--space", "pull_loss", "--storage", str(tmp_path)])
    assert code == 2 and "exists; pass --resume" in capsys.readouterr().err
    assert (tmp_path / "pull_loss-digits" / "tuner.pkl").read_bytes() == b"x"


def test_defaults_point_is_the_preset_inside_the_space():
    import tune_spaces
    from t2sda.presets import get_preset

    space = tune_spaces.load("pull_loss")
    point = search._defaults(space, get_preset("digits"), tune_spaces.draw(space, 100, seed=1))
    assert point["method.pull_temperature"] == 0.2 and point["method.pull_weight"] == 0.1
    assert point["method.ema_momentum"] == 0.99 and point["method.weight_schedule"] == "linear"


def test_asha_first_rung_waits_for_adaptation():
    import argparse

    import tune_spaces
    from t2sda.presets import get_preset

    space, base = tune_spaces.load("pull_loss"), get_preset("digits")
    plain = argparse.Namespace(grace_period=None)
    # digits adapts from step 600 and evaluates every 200: before 800 all trials are alike.
    assert search._grace(plain, space, base) == 800
    assert search._grace(argparse.Namespace(grace_period=50), space, base) == 50
    short = base.with_overrides(["train.iters=300"])
    assert search._grace(plain, space, short) == 300  # never past the end


def test_default_point_names_the_keys_it_leaves_out(caplog):
    import tune_spaces
    from t2sda.presets import get_preset

    space = tune_spaces.load("pull_loss")
    base = get_preset("digits").with_overrides(["method.pull_temperature=5.0"])  # space: 0.03-1
    with caplog.at_level("WARNING", logger="t2sda"):
        point = search._defaults(space, base, tune_spaces.draw(space, 100, seed=1))
    assert "method.pull_temperature" not in point and point["method.pull_weight"] == 0.1
    assert [r.getMessage() for r in caplog.records] == [
        "default point: method.pull_temperature=5.0 outside the space, so not tried as given "
        "(sampled like the other trials)"]


def test_trial_status_and_config_fall_back_loudly(caplog):
    from t2sda.presets import get_preset

    with caplog.at_level("WARNING", logger="t2sda"):
        assert summary._saved_status({"a": "TERMINATED"}, "a") == "TERMINATED"
        assert not caplog.records
        assert summary._saved_status({"a": "TERMINATED"}, "b") == "UNKNOWN"  # not "finished"
        assert summary._trial_config(get_preset("digits"), {"method.pull_weight": -1}, "c") is None
    assert [r.getMessage().split(" (")[0].split(";")[0] for r in caplog.records] == [
        "trial b: not in the saved experiment state", "trial c: its parameters make no valid config"]
    assert "method.pull_weight=-1" in caplog.records[1].getMessage()


def test_warmup_takes_the_cpus_its_trials_will_share(monkeypatch, tmp_path, caplog):
    """The warm-up runs alone: on the local CPU cluster its worker gets the CPUs of all the
    concurrent trials (Ray then gives it that many threads). A record whose checkpoint is gone
    is stale: the warm-up is trained again, never handed to the trials."""
    import argparse
    import shutil
    import types

    import tune_spaces
    from t2sda.presets import get_preset
    from t2sda.ray_glue import driver, exp_state, search_warmup

    calls = []

    def fake_fit(cfg, *, run_dir, **options):
        calls.append(options)
        path = run_dir / "checkpoint_x"
        path.mkdir(parents=True, exist_ok=True)
        return types.SimpleNamespace(checkpoint=types.SimpleNamespace(path=str(path)))

    monkeypatch.setattr(driver, "fit_result", fake_fit)
    monkeypatch.setattr(driver, "last_metrics", lambda run_dir: {})
    args = argparse.Namespace(workers_per_trial=1, gpu=False, cpus_per_worker=1.5, max_failures=0,
                              placement="pack")
    space = tune_spaces.load("pull_loss", adaptation_steps=600)
    drawn = tune_spaces.draw(space, 20, seed=1)
    cases = ((2, True, "two"), (1, True, "one"), (2, False, "joined"))  # joined: nodes may be smaller
    for concurrent, local, name in cases:
        exp = exp_state.Experiment(str(tmp_path), name)
        cfg, warmup = search_warmup.run(args, get_preset("digits"), drawn, exp,
                                        concurrent=concurrent, local=local)
        assert warmup["checkpoint"] == str(tmp_path / name / "warmup" / "checkpoint_x")
        assert calls[-1]["stop_at"] == 600 and calls[-1]["workers"] == 1
    assert [c["cpus_per_worker"] for c in calls] == [3.0, 1.5, 1.5]

    exp = exp_state.Experiment(str(tmp_path), "one")  # found again: not retrained
    search_warmup.run(args, get_preset("digits"), drawn, exp, concurrent=1, local=True)
    assert len(calls) == 3
    shutil.rmtree(tmp_path / "one" / "warmup")  # its checkpoint gone: the record is stale
    search_warmup.run(args, get_preset("digits"), drawn, exp, concurrent=1, local=True)
    assert len(calls) == 4 and "not there any more" in caplog.text


def test_list_spaces_shows_the_ranges_a_search_of_the_preset_uses(capsys):
    assert search.main(["--list-spaces"]) == 0
    short = capsys.readouterr().out
    assert short.startswith("as searched on --preset digits: trials of 900 steps, 300 of them "
                            "adapting\n")
    assert "method.weight_warmup         int 50..300 (step 50)" in short
    assert "ASHA first rung at step 800" in short
    assert search.main(["--list-spaces", "--set", "train.iters=1200"]) == 0
    full = capsys.readouterr().out
    assert "trials of 1200 steps, 600 of them adapting" in full
    assert "method.weight_warmup         int 50..500 (step 50)" in full
    assert search.main(["--list-spaces", "--preset", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
