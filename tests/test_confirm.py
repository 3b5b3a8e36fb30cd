"""The confirmation's pieces without Ray: candidates, the verdict and its files, ASHA's rungs
against the end, the scheduler that keeps the reference running."""

import json
import math

import pytest
from scipy import stats as st

from t2sda.presets import get_preset
from t2sda.ray_glue import confirm, rungs, verdict
from t2sda.ray_glue.report import TrialRow

REF = {"method.pull_weight": 0.1, "method.pull_temperature": 0.2}


def _row(tid, value, params, steps=900, status="TERMINATED"):
    return TrialRow(tid, status, params, value, steps, None, scores={"target_miou": value})


def _rows():
    return [_row("ref", 40.0, dict(REF)),
            _row("a", 41.0, {"method.pull_weight": 0.3, "method.pull_temperature": 0.1}),
            _row("b", 42.0, {"method.pull_weight": 0.5, "method.pull_temperature": 0.1}, steps=800),
            _row("c", 45.0, {"method.pull_weight": 0.7, "method.pull_temperature": 0.1},
                 status="ERROR"),
            _row("d", 39.0, {"method.pull_weight": 0.9, "method.pull_temperature": 0.1})]


def test_candidates_are_the_default_and_the_top_others_never_errored():
    labels, chosen, first = confirm.candidates(_rows(), REF, top=2, mode="max")
    assert labels == ["default", "#1", "#2"]
    assert [chosen[k].trial_id for k in labels] == ["ref", "b", "a"]
    assert not first
    labels, chosen, first = confirm.candidates(_rows(), REF, top=1, mode="min")
    assert [chosen[k].trial_id for k in labels] == ["ref", "d"] and not first
    # floats compare by value, not by repr; a missing key is not the reference
    assert confirm.is_reference({"method.pull_weight": 0.1 + 1e-15, "method.pull_temperature": 0.2}, REF)
    assert not confirm.is_reference({"method.pull_weight": 0.1}, REF)


def test_the_search_run_counts_as_replicate_zero_only_when_trained_alike():
    base = get_preset("digits").with_overrides(["train.iters=900"])
    rows = {r.trial_id: r for r in _rows()}
    assert confirm.reusable(rows["a"], base, [])
    assert not confirm.reusable(rows["b"], base, [])  # stopped by ASHA at step 800
    assert not confirm.reusable(rows["a"], base, ["train.iters=1200"])
    assert confirm.seed_overrides("adaptation", base, 2) == {"adapt_seed": 2}
    assert confirm.seed_overrides("full", base.with_overrides({"seed": 5}), 2) == {"seed": 7}


def _replicates(ref, best, other=None):
    out = [{"config": "default", "seed": k, "value": v, "target_miou": v} for k, v in enumerate(ref)]
    out += [{"config": "#1", "seed": k, "value": v, "target_miou": v} for k, v in enumerate(best)]
    if other:
        out += [{"config": "#2", "seed": k, "value": v, "target_miou": v} for k, v in enumerate(other)]
    return out


def _confirm(reps, labels=("default", "#1"), mode="max", metric="val/best_mIoU"):
    cands = {k: {"trial_id": f"t{k}", "params": {}, "search_value": 0.0} for k in labels}
    return verdict.confirm(reps, list(labels), metric=metric, mode=mode, kind="adaptation",
                           seeds=[0, 1, 2], candidates=cands)


def test_a_real_difference_is_called_and_matches_scipy():
    ref, best = [50.0, 47.9, 52.1], [51.4, 49.5, 53.4]  # seeds move both; +1.4 +1.6 +1.3
    result = _confirm(_replicates(ref, best))
    row = result["vs_default"]["#1"]
    assert row["mean"] == pytest.approx(1.4333, abs=1e-3)
    assert row["p_t"] == pytest.approx(st.ttest_rel(best, ref).pvalue)
    assert row["verdict"] == "better" and row["ci"][0] > 0
    assert result["verdict"].startswith("best vs default: +1.43 mIoU (95 % CI +")
    assert result["verdict"].endswith("3 paired adaptation seeds): better")
    assert result["configs"]["default"]["mean"] == pytest.approx(50.0)


def test_noise_is_called_noise_with_the_smallest_difference_it_could_see():
    result = _confirm(_replicates([50.0, 47.9, 52.1], [50.3, 49.9, 51.0]))
    line = result["verdict"]
    assert line.startswith("no config found beats the default beyond seed noise (best +0.40 mIoU")
    sd = result["vs_default"]["#1"]
    assert f"it would call {sd['smallest_significant']:.2f} or more" in line
    worse = _confirm(_replicates([50.0, 47.9, 52.1], [45.0, 43.2, 47.5]))
    assert worse["vs_default"]["#1"]["verdict"] == "worse" and "worse" in worse["verdict"]


def test_several_challengers_are_holm_adjusted_and_a_label_free_metric_reports_target_miou():
    reps = _replicates([1.0, 1.2, 0.9], [0.5, 0.75, 0.35], [0.95, 1.3, 0.8])
    for r in reps:
        r["target_miou"] = 50 - 10 * r["value"]
    result = _confirm(reps, labels=("default", "#1", "#2"), mode="min", metric="select/best_entropy")
    vs = result["vs_default"]
    low, high = sorted((vs["#1"]["p_t"], vs["#2"]["p_t"]))
    assert sorted((vs["#1"]["p_holm"], vs["#2"]["p_holm"])) == \
        pytest.approx([min(1, 2 * low), max(min(1, 2 * low), high)])
    assert vs["#1"]["verdict"] == "better"  # lower entropy on every seed
    assert "Holm over 2" in result["verdict"] and "entropy" in result["verdict"]
    assert result["target_miou"]["vs_default"]["#1"]["mean"] == pytest.approx(5.0)


def test_missing_replicates_pair_only_the_seeds_both_have():
    reps = _replicates([50.0, 48.0, 52.0], [51.0, 49.0, None])
    result = _confirm(reps)
    assert result["vs_default"]["#1"]["n"] == 2 and result["vs_default"]["#1"]["seeds"] == [0, 1]
    one = _confirm(_replicates([50.0, 48.0], [51.0, None]))
    assert one["vs_default"]["#1"]["verdict"] == "cannot say"
    assert "cannot say" in one["verdict"] and "got 1" in one["verdict"]


def test_files_png_and_best_config_say_whether_it_was_confirmed(tmp_path):
    (tmp_path / "best_config.json").write_text(json.dumps({"trial_id": "t#1", "config": {}}))
    result = _confirm(_replicates([50.0, 47.9, 52.1], [51.4, 49.5, 53.4]))
    verdict.write(result, tmp_path)
    saved = json.loads((tmp_path / "confirm.json").read_text())
    assert saved["verdict"] == result["verdict"]
    assert (tmp_path / "confirm.png").read_bytes()[:4] == b"\x89PNG"
    best = json.loads((tmp_path / "best_config.json").read_text())
    assert best["confirmed"]["confirmed"] is True and best["confirmed"]["seeds"] == 3
    table = verdict.format_table(result)
    assert "default" in table and "better" in table
    verdict.tensorboard(result, tmp_path / "tb")
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_rungs_correlate_with_the_end_and_name_a_reliable_grace():
    # 5 finished trials: at step 800 the order is reversed, at 850 it already matches the end.
    finals = [40.0, 41.0, 42.0, 43.0, 44.0]
    hist = {f"t{i}": [(800, 50.0 - i), (850, f - 0.5), (900, f)] for i, f in enumerate(finals)}
    hist["stopped"] = [(800, 10.0)]
    result = rungs.analyse(hist, iters=900, rungs=[800], mode="max")
    assert result["rungs"][0]["spearman"] == pytest.approx(-1.0)
    assert result["rungs"][0]["finished_trials"] == 5 and result["rungs"][0]["reached"] == 6
    assert result["reliable_grace"] == 850
    text = rungs.format_rungs(result)
    assert "WARNING: the rung at step 800" in text and "--grace-period 850" in text
    # "min" metrics: lower is better, so the same numbers negate
    assert rungs.analyse(hist, iters=900, rungs=[800], mode="min")["rungs"][0]["spearman"] == \
        pytest.approx(-1.0)
    good = {f"t{i}": [(800, f - 1), (900, f)] for i, f in enumerate(finals)}
    ok = rungs.analyse(good, iters=900, rungs=[800])
    assert ok["rungs"][0]["reliable"] and "WARNING" not in rungs.format_rungs(ok)


def test_milestones_match_rays_bracket():
    from ray.tune.schedulers.async_hyperband import _Bracket

    for grace, rf, max_t in ((800, 2, 901), (4, 2, 13), (100, 3, 1201), (50, 4, 40001)):
        bracket = _Bracket(grace, max_t, rf, 0)
        assert rungs.milestones(grace, rf, max_t) == sorted(int(m) for m, _ in bracket._rungs)
    assert math.isclose(rungs.milestones(800, 2, 901)[0], 800)


def test_reference_asha_never_stops_the_reference():
    from ray.tune.schedulers import TrialScheduler

    class Trial:
        def __init__(self, tid, config):
            self.trial_id, self.config = tid, config

    sched = confirm.ReferenceASHA(reference=REF, time_attr="step", metric="m", mode="max",
                                  max_t=13, grace_period=4, reduction_factor=2)
    good = Trial("good", {"method.pull_weight": 0.5, "method.pull_temperature": 0.1})
    ref = Trial("ref", dict(REF))
    bad = Trial("bad", {"method.pull_weight": 0.9, "method.pull_temperature": 0.1})
    for t in (good, ref, bad):
        sched.on_trial_add(None, t)
    assert sched.on_trial_result(None, good, {"step": 4, "m": 50.0}) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, ref, {"step": 4, "m": 10.0}) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, bad, {"step": 4, "m": 10.0}) == TrialScheduler.STOP


def test_run_trains_only_the_missing_replicates_and_confirms_elsewhere_with_its_own_warmup(
        tmp_path, monkeypatch):
    base = get_preset("digits").with_overrides(["train.iters=900"])
    trained, warmups = [], []

    def fake_train(runs, cbase, metric, mode, **kw):
        trained.append((runs, cbase, kw["options"]["warmup"]))
        return [{"config": r["label"], "seed": r["seed"], "value": 40.0 + r["seed"]
                 + (1.0 if r["label"] == "#1" else 0.0), "target_miou": None, "from": "confirm"}
                for r in runs]

    monkeypatch.setattr(confirm, "_train", fake_train)
    rows = [_row("ref", 40.0, dict(REF)),
            _row("a", 41.0, {"method.pull_weight": 0.3, "method.pull_temperature": 0.1})]
    common = dict(reference=REF, top=1, seeds=3, kind="adaptation", base=base,
                  metric="val/best_mIoU", mode="max", exp_path=str(tmp_path), log_root=tmp_path,
                  remote=False, concurrent=2, resume=False,
                  trial_options={"warmup": {"checkpoint": "w"}, "workers": 1})
    result = confirm.run(rows, confirm_set=[], warmup_for=warmups.append, **common)
    runs, cbase, warm = trained[-1]
    # both search runs trained to the end: seeds 1 and 2 of each config are the new runs
    assert sorted((r["label"], r["seed"]) for r in runs) == \
        [("#1", 1), ("#1", 2), ("default", 1), ("default", 2)]
    assert all(r["overrides"]["adapt_seed"] == r["seed"] for r in runs)
    assert warm == {"checkpoint": "w"} and cbase is base and not warmups
    assert result["vs_default"]["#1"]["verdict"] == "better"  # +1 on every seed
    assert json.loads((tmp_path / "confirm.json").read_text())["seeds"] == [0, 1, 2]

    def warmup_for(cfg):
        warmups.append(cfg)
        return cfg, {"checkpoint": "w1200"}

    confirm.run(rows, confirm_set=["train.iters=1200"], warmup_for=warmup_for, **common)
    runs, cbase, warm = trained[-1]
    assert len(runs) == 6 and cbase.train.iters == 1200 and warm == {"checkpoint": "w1200"}
    assert warmups[-1].train.iters == 1200
