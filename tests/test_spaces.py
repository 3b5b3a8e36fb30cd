import functools
import subprocess
import sys

import optuna
import pytest

import tune_spaces
from t2sda.config import ConfigError
from t2sda.presets import get_preset, search_preset
from tune_spaces import _knobs

SPACES = ["ema", "full", "pull_loss", "weighting"]
DRAWS = 120  # enough random draws to hit every categorical choice of every space


def _value(cfg, key):
    return functools.reduce(getattr, key.split("."), cfg)


def test_available_lists_the_space_modules_only():
    assert tune_spaces.available() == SPACES  # _knobs holds shared pieces, it is no space


@pytest.mark.parametrize("name", SPACES)
def test_every_sampled_key_is_a_config_key_that_takes_effect(name):
    space = tune_spaces.load(name)
    preset = get_preset("digits")
    seen: dict[str, set] = {}
    choices: dict[str, tuple] = {}
    for trial in tune_spaces.draw(space, DRAWS, seed=1):
        cfg = preset.with_overrides(trial.params)  # raises ConfigError on a bad key or value
        for key, value in trial.params.items():
            expected = pytest.approx(value) if isinstance(value, float) else value
            assert _value(cfg, key) == expected, key
            seen.setdefault(key, set()).add(value)
            dist = trial.distributions[key]
            if isinstance(dist, optuna.distributions.CategoricalDistribution):
                choices[key] = dist.choices
    for key, values in seen.items():
        assert len(values) > 1, f"{key} never varies"
        assert any(v != _value(preset, key) for v in values), f"{key} never leaves the preset"
    for key, options in choices.items():  # every branch of every conditional was taken
        assert seen[key] == set(options), key


@pytest.mark.parametrize("name, trigger, dependent, when", [
    ("full", "method.translate", "method.fda_beta", {"fda"}),
    ("full", "method.weight_mode", "method.weight_gamma", {"iou", "confidence"}),
    ("full", "method.mic_weight", "method.mic_mask_ratio", {1.0}),
    ("weighting", "method.weight_mode", "method.weight_momentum", {"iou", "confidence"}),
    ("weighting", "method.weight_schedule", "method.weight_warmup", {"linear", "cosine", "step"}),
    ("pull_loss", "method.weight_schedule", "method.weight_warmup", {"linear", "cosine", "step"}),
    ("ema", "method.pull_keys", "method.proto_momentum", {"bank"}),
])
def test_conditional_parameters_are_drawn_only_when_they_act(name, trigger, dependent, when):
    for trial in tune_spaces.draw(tune_spaces.load(name), DRAWS):
        assert (trial.params.get(trigger) in when) == (dependent in trial.params)


@pytest.mark.parametrize("preset", [get_preset("digits"), search_preset("digits")])
def test_warmups_fit_the_digits_adaptation_window(preset):
    """The full digits run adapts for 600 steps, the default search's trials for 300: no
    sampled weighting warm-up may outlast the adaptation a trial has."""
    window = preset.train.iters - preset.method.self_training_start
    longest = set()
    for name in SPACES:
        space = tune_spaces.load(name, adaptation_steps=window)
        for trial in tune_spaces.draw(space, DRAWS):
            warmup = trial.params.get("method.weight_warmup", 0)
            assert warmup <= window
            longest.add(warmup)
    assert max(longest) == min(window, 500)  # the range still reaches its top


def test_digits_search_trains_shorter_runs_unless_told():
    full, short = get_preset("digits"), search_preset("digits")
    assert (full.train.iters, short.train.iters) == (1200, 900)
    assert short.with_overrides(["train.iters=900"]) == short
    assert short.to_dict() == full.with_overrides(["train.iters=900"]).to_dict()
    assert search_preset("gta2cs_daformer") == get_preset("gta2cs_daformer")


def test_unknown_space_is_a_one_line_error_listing_the_spaces():
    with pytest.raises(ConfigError) as err:
        tune_spaces.load("pull")
    assert str(err.value) == (
        "unknown search space 'pull' (available: ema, full, pull_loss, weighting)"
    )


@pytest.mark.parametrize("name", SPACES)
def test_metric_mode_and_budget_are_sane(name):
    space = tune_spaces.load(name)
    preset = get_preset("digits")
    assert (space.name, space.metric, space.mode) == (name, "val/mIoU", "max")
    assert space.description and "\n" not in space.description
    assert 2 <= space.num_samples <= 50
    assert space.reduction_factor >= 2
    # ASHA compares trials at grace * rf^k steps: the first rung needs an evaluation behind it
    # and must come before the end, or nothing is ever stopped.
    assert space.grace_period % preset.train.eval_every == 0
    assert preset.train.eval_every <= space.grace_period < preset.train.iters


@pytest.mark.parametrize("name", SPACES)
def test_seeds_make_distinct_and_reproducible_samples(name):
    space = tune_spaces.load(name)
    samples = [tune_spaces.sample(space, seed) for seed in range(20)]
    distinct = {tuple(sorted(s.items())) for s in samples}
    if name in ("pull_loss", "full"):  # continuous knobs in every draw: never a repeat
        assert len(distinct) == len(samples)
    else:  # finite branches (weighting's uniform arm is one point, ema is a grid) may repeat
        assert len(distinct) >= len(samples) // 2
    assert tune_spaces.sample(space, 3) == samples[3]


def test_describe_lists_parameters_ranges_and_conditions():
    text = tune_spaces.describe(tune_spaces.load("full"))
    assert text.splitlines()[0].startswith("full: ")
    assert "method.pull_temperature      float 0.03..1 (log)" in text
    assert "method.fda_beta" in text and "(only when method.translate is fda)" in text
    assert "optim.lr" in text and "method.num_negatives" in text


def test_spaces_import_from_anywhere(tmp_path):
    """Installed, not only from the repo root: tune.py may run from an experiment dir."""
    out = subprocess.run([sys.executable, "-c", "import tune_spaces; print(tune_spaces.available())"],
                         cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(SPACES)


@pytest.mark.parametrize("name", ["pull_loss", "ema", "full"])
def test_teacher_momentum_range_fits_the_presets_adaptation_steps(name):
    """digits adapts for 600 steps: no sampled teacher may have a half-life over 300 steps
    (0.999's is 693: it stalled at ~40 mIoU); a 40k-step preset keeps the slow momenta."""
    short = {t.params["method.ema_momentum"]
             for t in tune_spaces.draw(tune_spaces.load(name, adaptation_steps=600), DRAWS)}
    assert short == {0.98, 0.99, 0.995}
    assert all(_knobs.half_life(m) <= 300 for m in short)
    long = {t.params["method.ema_momentum"]
            for t in tune_spaces.draw(tune_spaces.load(name, adaptation_steps=40000), DRAWS)}
    assert 0.9999 in long and 0.999 in long
    assert _knobs.teacher_momenta(10) == _knobs.TEACHER_MOMENTA[:2]  # still a choice to make
