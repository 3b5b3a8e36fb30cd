"""Model selection by label-free validators: Spearman, picks, selection.json / .png, results.csv,
tune.py --metric."""

import csv
import json

import pytest

from t2sda.presets import get_preset
from t2sda.ray_glue import report, search, selection
from t2sda.ray_glue.report import TrialRow

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(trial_id, status="TERMINATED", **scores):
    return TrialRow(trial_id, status, {"method.pull_weight": 0.1}, scores.get("snd"), 100, None,
                    scores=scores)


def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    x = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
    y = [2.0, 7.0, 1.0, 8.0, 2.0, 8.0, 1.0, 8.0]
    assert selection.spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic)
    assert selection.spearman([1, 2], [2, 1]) is None  # too few
    assert selection.spearman([1, 1, 1], [1, 2, 3]) is None  # constant


def test_selection_orients_min_validators_and_never_picks_errored_trials():
    rows = [
        _row("a", target_miou=50.0, entropy=0.9, snd=1.0, agreement=0.7),
        _row("b", target_miou=60.0, entropy=0.5, snd=3.0, agreement=0.9),
        _row("c", target_miou=55.0, entropy=0.7, snd=2.0, agreement=0.95),
        _row("d", "ERROR", target_miou=99.0, entropy=0.01, snd=9.0, agreement=1.0),
    ]
    table = selection.selection(rows)
    # Entropy (min) orders the trials exactly as target mIoU does: +1 after orientation.
    assert table["entropy"]["spearman"] == pytest.approx(1.0)
    assert table["entropy"]["picked_trial"] == "b" and table["entropy"]["picked_target_miou"] == 60.0
    assert table["snd"]["spearman"] == pytest.approx(1.0)
    assert table["agreement"]["spearman"] == pytest.approx(0.5)
    assert table["agreement"]["picked_trial"] == "c" and table["agreement"]["picked_target_miou"] == 55.0
    assert "source_miou" not in table  # no trial reported it
    assert table["target_miou"]["picked_trial"] == "b"


def test_selection_without_target_labels_still_picks():
    rows = [_row("a", snd=1.0), _row("b", snd=2.0), _row("c", snd=0.5)]
    table = selection.selection(rows)
    assert table["snd"]["picked_trial"] == "b"
    assert table["snd"]["spearman"] is None and table["snd"]["picked_target_miou"] is None
    assert "target_miou" not in table


def test_write_selection_and_results_csv_columns(tmp_path):
    rows = [_row(t, target_miou=m, snd=s, entropy=e, source_miou=sm, agreement=a)
            for t, m, s, e, sm, a in [("a", 50, 1, 0.9, 70, 0.8), ("b", 60, 3, 0.6, 72, 0.7),
                                      ("c", 55, 2, 0.8, 71, 0.9)]]
    text = selection.write_selection(rows, tmp_path)
    saved = json.loads((tmp_path / "selection.json").read_text())
    assert set(saved) == {"source_miou", "agreement", "entropy", "snd", "target_miou"}
    assert saved["source_miou"] == {"mode": "max", "spearman": pytest.approx(1.0),
                                    "picked_trial": "b", "picked_target_miou": 60, "trials": 3}
    assert (tmp_path / "selection.png").read_bytes()[:8] == PNG_MAGIC
    assert "entropy" in text and "+1.000" in text
    report.write_results(rows, tmp_path, metric="select/best_snd", mode="max")
    with (tmp_path / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["target_miou"] for r in table] == ["50", "60", "55"]
    assert table[1]["snd"] == "3" and table[1]["method.pull_weight"] == "0.1"


def test_search_metric_maps_names_to_best_so_far_and_direction():
    import tune_spaces

    base = get_preset("digits")
    space = tune_spaces.load("pull_loss", adaptation_steps=600)
    assert search._search_metric("target_miou", space, base) == ("val/best_mIoU", "max")
    assert search._search_metric("entropy", space, base) == ("select/best_entropy", "min")
    assert search._search_metric("snd", space, base) == ("select/best_snd", "max")
    with pytest.raises(search.UsageError, match="train.validators=true"):
        search._search_metric("snd", space, base.with_overrides(["train.validators=false"]))


def test_unknown_metric_is_a_one_line_usage_error(capsys):
    assert search.main(["--space", "pull_loss", "--metric", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("tune.py: error: --metric nope: unknown (choose from target_miou, source_miou, "
                   "agreement, entropy, snd)")
