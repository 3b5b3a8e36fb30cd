import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_adaptation_table_summarises_per_variant():
    bench = _load("bench_adaptation")
    runs = [{"variant": v, "seed": s, "mIoU": m, "mIoU_teacher": m - 1, "step": 10, "wall_s": 5.0}
            for v, s, m in [("mean_teacher", 0, 40.0), ("mean_teacher", 1, 44.0),
                            ("t2sda", 0, 50.0), ("t2sda", 1, 50.0)]]
    text, summary = bench.table(runs, [0, 1])
    assert summary["mean_teacher"]["mean"] == 42.0
    assert summary["mean_teacher"]["std"] == pytest.approx(2 ** 0.5 * 2)
    assert summary["t2sda"] == {"mean": 50.0, "std": 0.0, "teacher_mean": 49.0, "wall_s": 5.0}
    assert "| mean teacher (DAFormer-style) | 40.0 | 44.0 | **42.0 ± 2.8** | 41.0 | 5 |" in text
    # Every variant is a valid set of overrides of the preset.
    from t2sda.presets import get_preset

    for _, overrides in bench.VARIANTS.values():
        get_preset("digits").with_overrides(overrides)


def test_translate_bench_writes_table_and_json(tmp_path, monkeypatch, capsys):
    import json
    import sys

    bench = _load("bench_translate")
    monkeypatch.setattr(sys, "argv", ["bench_translate.py", "--size", "88", "--repeats", "1",
                                      "--variants", "fda", "style_downsample2",
                                      "--out", str(tmp_path)])
    assert bench.main() == 0
    payload = json.loads((tmp_path / "results.json").read_text())
    assert set(payload["results"]) == {"fda", "style_downsample2"}
    assert all(r["median_ms"] > 0 and r["repeats"] == 1 for r in payload["results"].values())
    assert "| style_downsample2 |" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["bench_translate.py", "--repeats", "0"])
    assert bench.main() == 2


def test_adaptation_cost_variants_point_at_loadable_files(tmp_path):
    import torch

    from t2sda.presets import get_preset
    from t2sda.state import build_state

    bench = _load("bench_adaptation")
    files = bench.cost_files(tmp_path, "digits", ["data.train_scenes=8", "data.val_scenes=4"])
    for variant in ("style_random", "fd_init"):
        cfg = get_preset("digits").with_overrides(bench.variant_overrides(variant, files))
        state = build_state(cfg, num_classes=11, device=torch.device("cpu"))
        assert (state.style is not None) == (variant == "style_random")
        assert (state.imnet is not None) == (variant == "fd_init")
    assert "style_random" not in bench.DEFAULT_VARIANTS and "fd_init" not in bench.DEFAULT_VARIANTS


def test_pull_study_groups_warmups_and_applies_the_rule():
    import json

    from t2sda.ray_glue.shared_warmup import fits

    bench = _load("bench_pull")
    configs = {v: bench.variant_config("digits", v, 0, []) for v in bench.VARIANTS}
    warm = {v: bench.warmup_config(c) for v, c in configs.items()}
    assert all(fits(warm[v], configs[v]) for v in configs)  # each can start from its warm-up
    groups = {}
    for v, c in warm.items():
        groups.setdefault(json.dumps(c.to_dict(), sort_keys=True), []).append(v)
    # Without pull / with the projection head / with a bigger head / no head: four warm-ups.
    assert sorted(map(sorted, groups.values())) == sorted(map(sorted, [
        ["translation"], ["decoder"], ["proj_256"],
        [v for v in bench.VARIANTS if v not in ("translation", "decoder", "proj_256")]]))

    def run(variant, seed, miou, preset="digits"):
        return {"preset": preset, "variant": variant, "seed": seed, "mIoU": miou, "features": {}}

    results = [run("translation", s, 50.0) for s in (0, 1)] + [
        run("t2sda", 0, 52.0), run("t2sda", 1, 51.5),  # +2.0, +1.5
        run("tau_0.07", 0, 53.0), run("tau_0.07", 1, 49.9)]  # mean +1.45 but one seed negative
    results += [{**r, "preset": "digits_hard"} for r in results]
    summary = bench.summarize(results, ["digits", "digits_hard"])
    assert summary["digits"]["t2sda"]["delta_mean"] == 1.75
    assert summary["digits"]["tau_0.07"]["deltas"] == {0: 3.0, 1: pytest.approx(-0.1)}
    rule = bench.verdict(summary, ["digits", "digits_hard"], [0, 1])
    assert rule["qualified"] == ["t2sda"]
    assert bench.verdict(summary, ["digits", "digits_hard"], [0, 1, 2])["qualified"] == []  # seed 2 missing
    assert "| tau_0.07: temperature 0.07 |" in bench.table(summary, ["digits", "digits_hard"])


def test_pull_study_takes_runs_recorded_in_results_json(tmp_path, monkeypatch):
    import json
    import sys

    bench = _load("bench_pull")
    rows = [{"preset": "digits", "variant": v, "seed": 0, "mIoU": m, "mIoU_teacher": 50.0,
             "step": 1200, "adapt_wall_s": 400.0, "features": {}}
            for v, m in (("translation", 50.7), ("t2sda", 51.2))]
    curves = [{"preset": "digits", "variant": r["variant"], "seed": 0,
               "curves": {"val/mIoU": [[600, 40.0], [1200, r["mIoU"]]]}} for r in rows]
    (tmp_path / "results.json").write_text(json.dumps({"overrides": [], "runs": rows,
                                                       "curves": curves}))
    recorded = bench.recorded_runs(tmp_path / "results.json", [])
    assert recorded["digits", "t2sda", 0]["curves"]["val/mIoU"][-1] == [1200, 51.2]
    assert bench.recorded_runs(tmp_path / "results.json", ["train.iters=10"]) == {}  # other --set
    # No run dir: the recorded rows stand in, nothing is trained.
    monkeypatch.setattr(sys, "argv", ["bench_pull.py", "--presets", "digits", "--seeds", "0",
                                      "--variants", "t2sda", "--timing-steps", "0",
                                      "--out", str(tmp_path)])
    assert bench.main() == 0
    got = json.loads((tmp_path / "results.json").read_text())
    assert {r["variant"]: r["mIoU"] for r in got["runs"]} == {"translation": 50.7, "t2sda": 51.2}
    assert got["summary"]["digits"]["t2sda"]["delta_mean"] == pytest.approx(0.5)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "warmups").exists()
    (tmp_path / "results.json").write_text('{"runs": 3}')
    with pytest.raises(SystemExit, match="not a results file"):
        bench.recorded_runs(tmp_path / "results.json", [])


def test_pull_overhead_is_the_median_of_repeats(monkeypatch):
    bench = _load("bench_pull")
    timings = iter([{"without": 200.0, "with": 240.0, "with_student_keys": 210.0},
                    {"without": 250.0, "with": 275.0, "with_student_keys": 255.0},
                    {"without": 220.0, "with": 253.0, "with_student_keys": 242.0}])
    monkeypatch.setattr(bench, "interleaved_step_ms", lambda *args: next(timings))
    t = bench.step_overhead("digits", [], 30, 3)
    assert (t["without"], t["with"], t["with_student_keys"]) == (220.0, 253.0, 242.0)
    assert t["overhead_pct"] == pytest.approx(15.0) and t["overhead_pct_range"] == pytest.approx([10.0, 20.0])
    assert t["overhead_student_keys_pct"] == pytest.approx(5.0)
    assert t["overhead_student_keys_pct_range"] == pytest.approx([2.0, 10.0])
    assert "+15.0 % (range +10.0 to +20.0 %)" in bench.timing_text(t, "digits", 30)


def test_search_bench_anytime_curve_and_goal(tmp_path):
    import json

    bench = _load("bench_search")
    (tmp_path / "warmup.json").write_text(json.dumps({"step": 300}))

    def trial(name, reports):
        (tmp_path / name).mkdir()
        (tmp_path / name / "result.json").write_text("\n".join(
            json.dumps({"timestamp": t, "step": s, "val/best_mIoU": v}) for t, s, v in reports)
            + "\n{cut")  # a line cut by a crash is skipped
    trial("trial-a", [(10, 400, 20.0), (30, 500, 25.0)])
    trial("trial-b", [(20, 400, 30.0), (40, 600, float("nan"))])
    curve = bench.anytime_curve(tmp_path)
    # warm-up 300 once + own steps: a 100; a 100, b 100; a 200, b 100; a 200, b 300
    assert curve == [(400, 20.0), (500, 30.0), (600, 30.0), (800, 30.0)]
    assert bench.steps_to_reach(curve, 29.0) == 500 and bench.steps_to_reach(curve, 31.0) is None
    results = [{"method": "random", "seed": 0, "best": 30.5, "steps": 1800, "curve": []},
               {"method": "optuna+asha", "seed": 0, "best": 30.0, "steps": 800, "curve": curve},
               {"method": "random+asha", "seed": 0, "best": 20.0, "steps": 400,
                "curve": [(400, 20.0)]}]
    goals = {g["method"]: g for g in bench.goal(results)}
    assert goals["optuna+asha"]["steps_to_within"] == 500 and goals["optuna+asha"]["met"] is True
    assert goals["optuna+asha"]["share"] == pytest.approx(500 / 1800)
    assert goals["random+asha"]["steps_to_within"] is None and goals["random+asha"]["met"] is False
    for r in results:
        r.update(trials=12, wall_s=1.0)
    text = bench.table(results, bench.goal(results))
    assert "| optuna+asha | 0 | 30.50 | 500 | 0.28 | yes |" in text
    assert "| random+asha | 0 | 30.50 | - | never | no |" in text
    bench.plot(results, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_confirm_bench_simulates_asha_as_ray_does_and_keeps_the_reference():
    bench = _load("bench_confirm")
    # rung at 800, reduction factor 2: a trial below the median of what the rung saw so far stops
    finals = {"ref": 40.0, "a": 42.0, "b": 39.0, "c": 41.0, "d": 38.0}
    at_rung = {"ref": 30.0, "a": 35.0, "b": 31.0, "c": 36.0, "d": 29.0}
    hist = {t: [(800, at_rung[t]), (900, finals[t])] for t in finals}
    sim = bench.simulate_asha(hist, list(finals), grace=800, rf=2, iters=900)
    # a: 35 >= 30 runs on; b: 31 < median(30, 35) stops; c: 36 runs on; d: 29 stops
    assert (sim["stopped"], sim["steps_saved"], sim["best_survives"]) == (2, 200, True)
    low_ref = dict(hist, ref=[(800, 1.0), (900, 50.0)])
    order = ["a", "ref", "b", "c", "d"]  # the reference is never stopped, wherever it comes
    assert bench.simulate_asha(low_ref, order, grace=800, rf=2, iters=900,
                               reference="ref")["best_survives"]


def test_mic_study_pairs_seeds_and_shares_the_warmup():
    from t2sda.ray_glue.shared_warmup import fits

    bench = _load("bench_mic")
    pull = bench.bench_pull
    base, mic = (pull.variant_config("digits", v, 0, []) for v in ("t2sda", "mic"))
    assert mic.method.mic_weight == 1 and mic.method.mic_block == 8
    warm = pull.warmup_config(base)
    assert warm == pull.warmup_config(mic) and fits(warm, base) and fits(warm, mic)
    s = bench.paired([50.0, 51.0, 52.0], [51.0, 52.5, 52.5])  # +1.0, +1.5, +0.5
    assert s["diff_mean"] == pytest.approx(1.0) and s["diffs"] == [1.0, 1.5, 0.5]
    assert s["ci95"][0] == pytest.approx(1.0 - 4.302653 * 0.5 / 3 ** 0.5, abs=1e-5)
    assert s["p"] == pytest.approx(0.0742, abs=1e-3)  # t = 2 sqrt(3), 2 degrees of freedom
    assert bench.verdict(s) == "no difference beyond seed noise"
    assert bench.verdict(bench.paired([50.0, 51.0, 52.0], [52.0, 53.1, 53.9])) == (
        "MIC better, beyond seed noise")


def test_hrda_study_compares_paired_seeds_and_writes_its_table(tmp_path):
    from scipy import stats as st

    from t2sda.presets import get_preset

    bench = _load("bench_hrda")
    sizes = {}
    for name, (_, overrides) in bench.VARIANTS.items():  # every variant is a valid config
        cfg = get_preset("digits").with_overrides([*bench.DEFAULT_SET, *overrides])
        sizes[name] = (cfg.data.image_size, cfg.model.hrda, cfg.train.iters)
    assert sizes == {"plain": (128, False, 600), "hrda": (128, True, 600), "plain64": (64, False, 600)}
    plain, hrda = [50.0, 52.0, 51.0], [49.0, 51.5, 49.0]  # -1.0, -0.5, -2.0
    s = bench.compare(plain, hrda, "hrda")
    assert s["diffs"] == [-1.0, -0.5, -2.0] and s["diff_mean"] == pytest.approx(-7 / 6)
    assert s["p"] == pytest.approx(st.ttest_rel(hrda, plain).pvalue)
    assert s["base_std"] == pytest.approx(1.0) and s["verdict"] == "no difference beyond seed noise"
    assert bench.compare(plain, [48.0, 50.1, 48.8], "hrda")["verdict"] == "hrda worse, beyond seed noise"
    assert bench.compare([50.0], [51.0])["verdict"] == "one seed: no test"
    rows = {("digits", v, seed): {"variant": v, "mIoU": m[seed], "wall_s": 10.0 + seed, "peak_rss_mib": 100,
                                  "curve": [(150, 20.0), (300, m[seed])]}
            for v, m in (("plain", plain), ("hrda", hrda), ("plain64", [40.0, 41.0, 42.0]))
            for seed in (0, 1, 2)}
    rows[("digits", "hrda", 0)]["branches"] = {"fused": 15.5, "context": 16.25, "detail": 15.1,
                                               "attention": 0.29}
    values = {v: [rows[("digits", v, seed)]["mIoU"] for seed in (0, 1, 2)] for v in bench.VARIANTS}
    summary = {"digits": {"seeds": [0, 1, 2], "values": values, "comparisons": {
        "hrda − plain": s, "hrda − plain64": bench.compare(values["plain64"], hrda, "hrda")}}}
    text = bench.table(summary, rows)
    assert "| digits | plain | 0, 1, 2 | 51.00 ± 1.00 | 50.00, 52.00, 51.00 | 11 | 100 |" in text
    assert "| digits | hrda − plain | -1.00, -0.50, -2.00 | -1.17 (" in text
    assert "| digits | hrda − plain64 | +9.00, +10.50, +7.00 | +8.83 (" in text
    assert "| digits | 0 | 15.50 | 16.25 | 15.10 | 0.29 |" in text
    bench.plot(rows, ["digits"], tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_hrda_parts_of_a_trained_run_score_like_its_own_validation(tiny_cfg, tmp_path):
    """bench_hrda.branches on a real (tiny) HRDA run: its fused score is the run's last val/mIoU,
    and the context and detail parts are real predictions of the same val set."""
    import json

    from t2sda.train import train

    bench = _load("bench_hrda")
    cfg = tiny_cfg.with_overrides(["model.hrda=true", "model.hrda_detail_crop=16", "train.iters=3"])
    train(cfg, device="cpu", run_dir=tmp_path / "run")
    last = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
            if "val/mIoU" in line][-1]
    parts = bench.branches(tmp_path / "run")
    assert parts["fused"] == pytest.approx(last["val/mIoU"], abs=1e-6)
    assert 0 <= parts["context"] <= 100 and 0 <= parts["detail"] <= 100 and 0 < parts["attention"] < 1
