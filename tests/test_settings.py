"""Resume keeps the settings a run or search started with (t2sda/settings.py)."""

import json

import pytest

from t2sda import settings
from t2sda.config import ConfigError


def test_reconcile_refuses_a_change_unless_asked_and_records_it(tmp_path):
    stored = {"train": {"iters": 6, "eval_every": 3}, "space": "pull_loss"}
    assert settings.reconcile(stored, json.loads(json.dumps(stored)), change=False,
                              where=tmp_path, what="x") == stored
    changed = {"train": {"iters": 9, "eval_every": 3}, "space": "pull_loss", "scheduler": "none"}
    with pytest.raises(ConfigError) as err:
        settings.reconcile(stored, changed, change=False, where=tmp_path, what="the config")
    message = str(err.value)
    assert "\n" not in message and "scheduler: None -> 'none'" in message
    assert "train.iters: 6 -> 9" in message and "eval_every" not in message
    assert not (tmp_path / settings.CHANGES).exists()
    assert settings.reconcile(stored, changed, change=True, where=tmp_path, what="x") == changed
    rows = [json.loads(x) for x in (tmp_path / settings.CHANGES).read_text().splitlines()]
    assert [r["changes"] for r in rows] == [{"scheduler": [None, "none"], "train.iters": [6, 9]}]


def test_tune_resume_reuses_stored_settings_and_refuses_conflicts(tmp_path):
    from t2sda.ray_glue import search, tune_settings

    def resolve(*flags):
        return tune_settings.resolve(search._parser().parse_args(["--space", "pull_loss", *flags]),
                                     tmp_path)

    first = resolve("--set", "train.iters=60", "train.eval_every=20", "--scheduler", "none")
    tune_settings.save(tmp_path, first)
    assert first["config"]["train"]["iters"] == 60 and first["sampler"] == "tpe"
    # --resume without the first command's flags continues under them.
    again = resolve("--resume")
    assert again == first
    args = search._parser().parse_args(["--space", "pull_loss", "--resume"])
    tune_settings.resolve(args, tmp_path)
    assert args.scheduler == "none" and args.preset == "digits"  # what the search then uses
    # A conflicting flag is refused, naming it; Tune's restored settings never change.
    with pytest.raises(ConfigError, match=r"train\.iters: 60 -> 900"):  # the digits search's
        resolve("--resume", "--preset", "digits")
    with pytest.raises(ConfigError, match="scheduler: 'none' -> 'asha'"):
        resolve("--resume", "--scheduler", "asha", "--change-on-resume")
    with pytest.raises(ConfigError, match="--change-on-resume needs --resume"):
        resolve("--change-on-resume")
    # A deliberate change of the base config: allowed, listed and recorded.
    more = resolve("--resume", "--change-on-resume", "--set", "train.iters=90")
    assert more["config"]["train"]["iters"] == 90 and more["config"]["train"]["eval_every"] == 20
    rows = [json.loads(x) for x in (tmp_path / settings.CHANGES).read_text().splitlines()]
    assert [r["changes"] for r in rows] == [{"config.train.iters": [60, 90]}]
    # The confirmation runs after the search from its results: it may change on resume, and
    # a search saved before it existed resumes with its defaults.
    assert first["confirm"] == 1 and first["confirm_seeds"] == 3
    assert resolve("--resume", "--confirm", "2", "--confirm-seeds", "4")["confirm_seeds"] == 4
    old = {k: v for k, v in first.items() if not k.startswith("confirm")}
    tune_settings.save(tmp_path, old)
    assert resolve("--resume")["confirm_set"] == []


def test_a_digits_search_trains_its_shorter_trials_unless_told(tmp_path):
    from t2sda.ray_glue import search, tune_settings

    def iters(*flags):
        args = search._parser().parse_args(["--space", "pull_loss", *flags])
        return tune_settings.resolve(args, None)["config"]["train"]["iters"]

    assert iters() == 900  # presets.SEARCH_OVERRIDES: 300 adaptation steps per trial
    assert iters("--set", "train.iters=1200") == 1200  # the user's --set comes after
    assert iters("--preset", "gta2cs_daformer") == 40000  # other presets: their own length
