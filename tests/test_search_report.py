import csv
import json
import math
import subprocess
import sys

import optuna
import pytest

from t2sda.config import Config
from t2sda.presets import get_preset
from t2sda.ray_glue import report
from t2sda.ray_glue.report import TrialRow, format_importances, importances, write_results

METRIC = "val/mIoU"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(trial_id, status, value, steps, **params):
    params = {k.replace("__", "."): v for k, v in params.items()}
    config = get_preset("digits").with_overrides(params).to_dict()
    error = f"RuntimeError: step {steps}: loss is NaN" if status == "ERROR" else None
    return TrialRow(trial_id, status, params, value, steps, config, error)


@pytest.fixture
def rows():
    """Three ranked trials (one ASHA-stopped), two errored (one after a high score), a pending
    one and one whose value went NaN."""
    return [
        _row("t1", "TERMINATED", 60.0, 1200, method__pull_temperature=0.03,
             method__weight_schedule="linear", method__weight_warmup=100),
        _row("t2", "TERMINATED", 63.5, 1200, method__pull_temperature=0.2,
             method__weight_schedule="constant"),
        _row("t3", "TERMINATED", 55.0, 400, method__pull_temperature=1.0,
             method__weight_schedule="step", method__weight_warmup=300),
        _row("t4", "ERROR", None, 150, method__pull_temperature=0.5, method__weight_schedule="cosine",
             method__weight_warmup=50),
        _row("t5", "ERROR", 70.0, 800, method__pull_temperature=0.1, method__weight_schedule="constant"),
        TrialRow("t6", "PENDING", {"method.pull_temperature": 0.07}, None, 0, None),
        _row("t7", "TERMINATED", math.nan, 200, method__pull_temperature=0.3,
             method__weight_schedule="constant"),
    ]


def test_results_csv_has_one_row_per_trial_and_a_column_per_param(rows, tmp_path):
    write_results(rows, tmp_path, metric=METRIC, mode="max")
    with open(tmp_path / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        table = list(reader)
    assert reader.fieldnames == ["trial_id", "status", "value", "steps", "method.pull_temperature",
                                 "method.weight_schedule", "method.weight_warmup", "run_dir",
                                 "checkpoint", "error"]
    assert [r["trial_id"] for r in table] == [r.trial_id for r in rows]
    assert table[1] == {"trial_id": "t2", "status": "TERMINATED", "value": "63.5", "steps": "1200",
                        "method.pull_temperature": "0.2", "method.weight_schedule": "constant",
                        "method.weight_warmup": "", "run_dir": "", "checkpoint": "", "error": ""}
    assert table[3]["value"] == "" and table[3]["error"] == "RuntimeError: step 150: loss is NaN"
    assert table[5]["status"] == "PENDING" and table[5]["value"] == ""


@pytest.mark.parametrize("mode, best_id, value, temperature, schedule", [
    ("max", "t2", 63.5, 0.2, "constant"), ("min", "t3", 55.0, 1.0, "step")])
def test_best_config_is_the_best_finished_trial_and_loads_as_a_config(
        rows, tmp_path, mode, best_id, value, temperature, schedule):
    write_results(rows, tmp_path, metric=METRIC, mode=mode)  # t5 scored 70 but errored: never best
    record = json.loads((tmp_path / "best_config.json").read_text())
    assert (record["trial_id"], record["metric"], record["value"]) == (best_id, METRIC, value)
    assert record["params"]["method.pull_temperature"] == temperature
    loaded = Config.load(tmp_path / "best_config.json")  # what `t2sda train --config` does
    # The winner's parameters on the preset, every other key the preset's own.
    expected = get_preset("digits").to_dict()
    expected["method"].update(pull_temperature=temperature, weight_schedule=schedule)
    if schedule == "step":
        expected["method"]["weight_warmup"] = 300
    assert loaded.to_dict() == expected


def test_table_ranks_the_top_trials_and_counts_the_rest(rows, tmp_path):
    text = write_results(rows, tmp_path, metric=METRIC, mode="max", top=2)
    lines = text.splitlines()
    assert lines[0] == "top 2 of 3 trials by val/mIoU (max)"
    assert lines[1].split() == ["rank", "trial", METRIC, "steps", "checkpoint", "params"]
    assert lines[2].split()[:5] == ["1", "t2", "63.5", "1200", "-"]
    assert "pull_temperature=0.2 weight_schedule=constant" in lines[2]
    assert lines[3].split()[:4] == ["2", "t1", "60", "1200"]
    assert lines[4] == "2 of 7 trials errored (t4, t5); 2 reported no value"
    assert len(lines) == 5


def test_summary_png_is_a_real_image(rows, tmp_path):
    write_results(rows, tmp_path, metric=METRIC, mode="max")
    data = (tmp_path / "summary.png").read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_summary_panels_scale_each_parameter_by_its_kind(rows):
    fig = report._summary_figure(rows, rows[1], METRIC)
    temperature, schedule, warmup = [ax for ax in fig.axes if ax.get_visible()]
    assert temperature.get_xscale() == "log"  # 0.03..1: more than 1.5 decades
    assert warmup.get_xscale() == "linear"  # 50..300
    assert [t.get_text() for t in schedule.get_xticklabels()] == ["constant", "cosine", "linear", "step"]


def test_log_axis_labels_do_not_overprint():
    """0.015-0.78 has one decade tick in view, where matplotlib would label every minor tick
    (eight labels across one panel): 1-2-5 steps instead, no minor labels."""
    rows = [_row(f"t{i}", "TERMINATED", 40.0 + i, 900, method__pull_weight=w)
            for i, w in enumerate((0.015, 0.1, 0.27, 0.6, 0.78))]
    fig = report._summary_figure(rows, rows[0], METRIC)
    fig.canvas.draw()
    ax = next(ax for ax in fig.axes if ax.get_visible())
    lo, hi = ax.get_xlim()
    shown = [t.get_text() for t in ax.xaxis.get_majorticklabels()
             if t.get_text() and lo <= t.get_position()[0] <= hi]
    assert shown == ["0.02", "0.05", "0.1", "0.2", "0.5"]
    assert not any(t.get_text() for t in ax.xaxis.get_minorticklabels())


def test_no_value_anywhere_writes_the_csv_and_says_so(tmp_path):
    rows = [
        _row("a", "ERROR", None, 10, method__pull_weight=0.5),
        TrialRow("b", "RUNNING", {"method.pull_weight": 0.1}, None, 0, None),
    ]
    text = write_results(rows, tmp_path, metric=METRIC, mode="max")
    assert text == "no trial reported val/mIoU: 1 of 2 trials errored (a); 1 reported no value"
    assert (tmp_path / "results.csv").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]  # no temp files either


def test_a_failed_write_keeps_the_previous_file_whole(tmp_path):
    target = tmp_path / "results.csv"
    target.write_text("old\n")

    def crash(tmp):
        tmp.write_text("half a fi")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        report.atomic_write(target, crash)
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]


def _study(n_trials):
    """x drives the value, y barely, k never varies, z only exists when c == 'a'."""
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))

    def objective(trial):
        x = trial.suggest_float("x", 0.0, 1.0)
        y = trial.suggest_float("y", 0.0, 1.0)
        trial.suggest_categorical("k", ["only"])
        if trial.suggest_categorical("c", ["a", "b"]) == "a":
            trial.suggest_float("z", 0.0, 1.0)
        return 10 * x + 0.1 * y

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(objective, n_trials=n_trials)
    failed = study.ask()
    failed.suggest_float("x", 0.0, 1.0)
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    return study


def test_importances_cover_the_varying_params_and_sum_to_one(tmp_path):
    imp = importances(_study(30), tmp_path)
    assert set(imp) == {"x", "y", "c", "z"}  # k never varied
    assert sum(imp.values()) == pytest.approx(1.0)
    assert max(imp, key=imp.get) == "x"
    assert list(imp.values()) == sorted(imp.values(), reverse=True)
    assert json.loads((tmp_path / "importances.json").read_text()) == pytest.approx(imp)
    text = format_importances(imp)
    assert text.splitlines()[0] == "parameter importances (sum to 1):"
    assert text.splitlines()[1].split()[:2] == ["x", f"{imp['x']:5.3f}"]


def test_importances_need_two_trials_and_a_varying_param(tmp_path):
    assert importances(_study(1), tmp_path) == {}
    constant = optuna.create_study()
    for _ in range(3):
        constant.enqueue_trial({"x": 0.5})
    constant.optimize(lambda t: t.suggest_float("x", 0.0, 1.0), n_trials=3)
    assert importances(constant, tmp_path) == {}
    assert list(tmp_path.iterdir()) == []
    assert format_importances({}).startswith("parameter importances: need 2+ completed trials")


def test_report_never_imports_ray():
    """The report runs after Ray shut down, and on a machine that only has the results."""
    code = ("import sys, t2sda.ray_glue.report; "
            "sys.exit(any(m == 'ray' or m.startswith('ray.') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_trials_name_their_best_checkpoint_and_evaluate_runs_on_it(tmp_path):
    """A search's trial dir (Ray's checkpoint_*/ beside config.json): results.csv and the table
    name its best checkpoint, and `evaluate --run-dir` on the trial dir scores that one."""
    import torch

    from t2sda import checkpoint
    from t2sda.__main__ import main
    from t2sda.state import build_state

    exp = tmp_path / "storage" / "search"
    cfg = get_preset("digits").with_overrides(["data.val_scenes=4", "data.image_size=32"])
    for trial, scores in (("a1", (3.0, 9.0, 5.0)), ("b2", (4.0,))):
        run = exp / f"train-{trial}"
        run.mkdir(parents=True)
        cfg.save(run / "config.json")
        state = build_state(cfg, num_classes=11, device=torch.device("cpu"))
        for i, score in enumerate(scores):
            ckpt = run / f"checkpoint_2026-01-01_00-00-0{i}.000000"
            checkpoint.save(ckpt, {"state": state.state_dict(), "step": 10 * (i + 1)}, score=score)
    rows = [TrialRow(t, "TERMINATED", {"seed": s}, v, 30, cfg.to_dict(), run_dir=str(exp / f"train-{t}"),
                     checkpoint=report.best_checkpoint(exp / f"train-{t}"))
            for t, s, v in (("a1", 1, 9.0), ("b2", 2, 4.0))]
    assert rows[0].checkpoint == str(exp / "train-a1" / "checkpoint_2026-01-01_00-00-01.000000")
    assert report.best_checkpoint(tmp_path / "nothing") is None
    text = write_results(rows, exp, metric=METRIC, mode="max")
    assert "train-a1/checkpoint_2026-01-01_00-00-01.000000" in text.splitlines()[2]
    hint = f"evaluate the best: python -m t2sda evaluate --run-dir {exp / 'train-a1'}"
    assert text.splitlines()[-1] == hint
    with open(exp / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert table[1]["checkpoint"] == rows[1].checkpoint and table[1]["run_dir"] == rows[1].run_dir
    assert main(["evaluate", "--run-dir", str(exp / "train-a1"), "--device", "cpu"]) == 0
    report_json = json.loads((exp / "train-a1" / "eval" / "eval.json").read_text())
    assert report_json["checkpoint"] == rows[0].checkpoint and report_json["step"] == 20


def test_tpe_models_results_after_a_third_of_the_budget():
    """With Optuna's default 10 random start-up trials, a 6- or 12-trial search is (nearly)
    random search; ours lets TPE propose from a third of the budget on."""
    import optuna

    from t2sda.ray_glue.search import _sampler, startup_trials

    assert [startup_trials(n) for n in (1, 6, 12, 30, 100)] == [2, 2, 4, 10, 10]

    def params(sampler, n):
        study = optuna.create_study(direction="maximize", sampler=sampler)
        study.optimize(lambda t: -(t.suggest_float("x", -5, 5) - 2) ** 2, n_trials=n)
        return [t.params["x"] for t in study.trials]

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tpe, rand = params(_sampler("tpe", 0, 12), 12), params(_sampler("random", 0, 12), 12)
    assert tpe[:4] == rand[:4]  # the start-up trials are the random sampler's
    assert tpe[4] != rand[4]  # the fifth is TPE's own (with Optuna's default: still random)
