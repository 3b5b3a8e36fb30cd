import json

import pytest

from t2sda.config import Config, ConfigError
from t2sda.presets import PRESETS, get_preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip(name, tmp_path):
    cfg = get_preset(name)
    assert Config.from_dict(cfg.to_dict()) == cfg
    cfg.save(tmp_path / "config.json")
    assert Config.load(tmp_path / "config.json") == cfg


def test_overrides_coerce_types():
    cfg = get_preset("digits").with_overrides(
        ["method.pull_temperature=0.1", "train.iters=10", "method.self_training=false", "seed=3",
         "method.translate=color"])
    assert cfg.method.pull_temperature == 0.1 and cfg.train.iters == 10
    assert cfg.method.self_training is False and cfg.seed == 3
    assert cfg.method.translate == "color"
    # JSON-style values (tune.py passes real numbers) are accepted too.
    assert Config().with_overrides({"train.iters": 5.0}).train.iters == 5


@pytest.mark.parametrize("override, message", [
    ("method.pull_temperature=0", "method.pull_temperature=0.0: must be > 0"),
    ("method.pull_temperature=-1", "must be > 0"),
    ("method.ema_momentum=1", "method.ema_momentum=1.0: must be in [0, 1)"),
    ("method.ema_momentum=-0.1", "must be in [0, 1)"),
    ("train.iters=-5", "train.iters=-5: must be >= 0"),
    ("train.iters=abc", "train.iters='abc': expected an integer"),
    ("train.iters=1.5", "expected an integer"),
    ("method.self_training=maybe", "expected a boolean"),
    ("method.pull_weight=nan", "expected a finite number"),
    ("method.translate=cyclegan", "allowed: fda, color, style, none"),
    ("method.pull_tempreature=0.1", "unknown config key 'method.pull_tempreature'"),
    ("nosuch.key=1", "unknown config key 'nosuch.key'"),
    ("method=1", "is a section"),
    ("model.name=resnet", "allowed: "),
    ("justakey", "expected key=value"),
])
def test_bad_overrides_name_key_and_value(override, message):
    with pytest.raises(ConfigError) as err:
        get_preset("digits").with_overrides([override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_preset_lists_available():
    with pytest.raises(ConfigError, match="unknown preset 'nope'; available: digits"):
        get_preset("nope")


def test_load_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        Config.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Config.load(tmp_path / "bad.json")
    (tmp_path / "extra.json").write_text(json.dumps({"method": {"bogus": 1}}))
    with pytest.raises(ConfigError, match="unknown config key 'method.bogus'"):
        Config.load(tmp_path / "extra.json")
    wrapped = {"config": get_preset("digits").to_dict(), "metric": 50.0}
    (tmp_path / "best.json").write_text(json.dumps(wrapped))
    assert Config.load(tmp_path / "best.json") == get_preset("digits")


def test_config_file_names_unknown_and_missing_keys(tmp_path, caplog):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"method": {"bogus": 1, "nope": 2}, "typo": 3}))
    with pytest.raises(ConfigError, match=rf"config file {path}: unknown config key 'typo'"):
        Config.load(path)
    path.write_text(json.dumps({"method": {"bogus": 1, "nope": 2}}))
    with pytest.raises(ConfigError, match="unknown config keys 'method.bogus', 'method.nope'"):
        Config.load(path)
    partial = get_preset("digits").to_dict()
    del partial["train"], partial["method"]["pull_weight"]
    path.write_text(json.dumps(partial))
    with caplog.at_level("WARNING", logger="t2sda"):
        cfg = Config.load(path)
    assert cfg.method.pull_weight == Config().method.pull_weight and cfg.train == Config().train
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [f"config file {path}: 2 key(s) not in it take their defaults: "
                        "method.pull_weight, train.*"]
    caplog.clear()
    get_preset("digits").save(path)
    Config.load(path)
    assert not caplog.records  # a complete file: no warning


def test_wrapped_config_with_top_level_keys_is_refused(tmp_path):
    path = tmp_path / "best.json"
    path.write_text(json.dumps({"config": get_preset("digits").to_dict(), "seed": 3}))
    with pytest.raises(ConfigError, match=r"has a 'config' entry and top-level config keys \(seed\)"):
        Config.load(path)
