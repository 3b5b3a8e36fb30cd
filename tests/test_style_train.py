"""method.translate=style in training: config errors, the TrainState hook, real steps."""

import pytest
import torch

from t2sda import checkpoint
from t2sda.config import ConfigError
from t2sda.method.translate import translate
from t2sda.state import build_state
from t2sda.step import train_step
from t2sda.train import train
from tests.test_style import _write

# the Inception style predictor needs >= 75 px images
STYLE = ["data.image_size=80", "method.translate=style", "method.self_training_start=0"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("style_ckpt"))


def _state_and_batch(cfg):
    from t2sda.data.loaders import build_datasets

    data = build_datasets(cfg.data, seed=0)
    src, label = (torch.stack(x) for x in zip(*(data.source[i] for i in range(2)), strict=True))
    tgt = torch.stack([data.target[i][0] for i in range(2)])
    state = build_state(cfg, num_classes=data.num_classes, device=torch.device("cpu"))
    return state, src, label, tgt


def test_style_without_checkpoint_names_key_and_source(tiny_cfg):
    with pytest.raises(ConfigError, match=r"^method.style_checkpoint='': .*style-augmentation"):
        tiny_cfg.with_overrides(["method.translate=style"])
    with pytest.raises(ConfigError, match="method.style_downsample=0"):
        tiny_cfg.with_overrides(["method.style_downsample=0"])


def test_folder_missing_a_file_names_it(tiny_cfg, tmp_path):
    _write(tmp_path)
    (tmp_path / "checkpoint_stylepredictor.pth").unlink()
    cfg = tiny_cfg.with_overrides([*STYLE, f"method.style_checkpoint={tmp_path}"])
    with pytest.raises(ConfigError) as err:
        build_state(cfg, num_classes=11, device=torch.device("cpu"))
    message = str(err.value)
    assert "\n" not in message and "method.style_checkpoint=" in message
    assert "checkpoint_stylepredictor.pth: file not found" in message


def test_steps_with_style_translation(tiny_cfg, folder):
    cfg = tiny_cfg.with_overrides([*STYLE, f"method.style_checkpoint={folder}", "data.image_size=96",
                                   "method.style_downsample=2", "data.batch_size=2"])
    runs = []
    for _ in range(2):  # the same seed twice: the same random styles, the same losses
        state, src, label, tgt = _state_and_batch(cfg)
        assert state.style is not None and state.style.downsample == 2
        assert not state.style.training and not any(p.requires_grad for p in state.style.parameters())
        logs = []
        for step in range(3):
            torch.manual_seed(step)
            logs.append(train_step(state, src, label, tgt, cfg))
        runs.append(logs)
        assert all(torch.isfinite(torch.tensor(x["loss"])) for x in logs)
    assert runs[0] == runs[1]
    torch.manual_seed(7)
    a = translate(src, tgt, mode="style", fda_beta=0.01, color_space="lab", style=state.style)
    torch.manual_seed(7)
    b = translate(src, tgt, mode="style", fda_beta=0.01, color_space="lab", style=state.style)
    c = translate(src, tgt, mode="style", fda_beta=0.01, color_space="lab", style=state.style)
    assert a.shape == src.shape and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)  # seeded, and a new style each call
    assert not torch.allclose(a, src, atol=1e-2)


def test_checkpoint_holds_no_style_weights(tiny_cfg, folder, tmp_path):
    cfg = tiny_cfg.with_overrides([*STYLE, f"method.style_checkpoint={folder}", "data.batch_size=2",
                                   "train.iters=2", "train.eval_every=2", "train.checkpoint_every=2",
                                   "data.val_scenes=4"])
    train(cfg, device="cpu", run_dir=tmp_path)
    saved = checkpoint.load(checkpoint.latest(tmp_path / "checkpoints"))["state"]
    keys = [k for part in ("student", "teacher") for k in saved[part]]
    assert keys and not any("transformer" in k or "predictor" in k or "Mixed_" in k for k in keys)
    assert set(saved) == {"student", "teacher", "optimizer", "bank", "weighter", "step", "world_size"}


@pytest.mark.parametrize("name", ["gta2cs_daformer", "syn2cs_deeplabv2", "gta_dg_daformer"])
def test_paper_presets_name_translation_and_pick_up_checkpoint(name, monkeypatch, folder):
    from t2sda.presets import STYLE_ENV, get_preset

    monkeypatch.delenv(STYLE_ENV, raising=False)
    plain = get_preset(name).method
    assert (plain.translate, plain.fda_beta, plain.fd_weight) == ("fda", 0.01, 0.005)
    monkeypatch.setenv(STYLE_ENV, str(folder))
    styled = get_preset(name).method
    assert (styled.translate, styled.style_checkpoint, styled.style_alpha) == ("style", str(folder), 0.5)
