"""MIC's masked image consistency (method.mic_*): the block mask, the masked image, and the
MIC loss inside a real train_step, checked against a direct re-derivation of MIC's formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from t2sda.config import ConfigError
from t2sda.data.loaders import build_datasets
from t2sda.method.masking import block_mask, mask_image
from t2sda.models import IMAGENET_MEAN
from t2sda.state import build_state
from t2sda.step import train_step

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # ImageNet mean, written out
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def test_block_mask_shape_blocks_and_ratio():
    torch.manual_seed(0)
    mask = block_mask(64, 64, 48, ratio=0.7, block=8)
    assert mask.shape == (64, 1, 64, 48) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    cells = mask.view(64, 1, 8, 8, 6, 8)  # (B, 1, rows, 8 px, cols, 8 px)
    assert torch.equal(cells.amin(dim=(3, 5)), cells.amax(dim=(3, 5)))  # constant in each block
    hidden = 1 - mask.mean().item()  # 64 x 48 cells: the fraction is within ~0.02 of the ratio
    assert hidden == pytest.approx(0.7, abs=0.03)
    assert torch.equal(block_mask(4, 32, 32, ratio=0.0, block=8), torch.ones(4, 1, 32, 32))
    per_image = mask.mean(dim=(1, 2, 3))
    assert per_image.std() > 0  # masks differ between the images of a batch


def test_block_mask_follows_torch_rng_and_rounds_the_grid_like_mic():
    torch.manual_seed(3)
    a = block_mask(2, 40, 40, ratio=0.5, block=16)
    torch.manual_seed(3)
    u = torch.rand(2, 1, 2, 2)  # MIC: round(40 / 16) = 2 cells per side, nearest upsampling
    expected = (u > 0.5).float().repeat_interleave(20, dim=2).repeat_interleave(20, dim=3)
    assert torch.equal(a, expected)
    # a block larger than the image: one cell, all hidden or all shown
    big = block_mask(8, 16, 16, ratio=0.5, block=64)
    assert torch.equal(big.amin(dim=(2, 3)), big.amax(dim=(2, 3)))


def test_masked_image_is_zero_after_the_models_normalisation():
    """MIC multiplies the normalised image by the mask; here the [0, 1] image is filled with
    the mean colour, so what the network sees must be normalise(image) * mask."""
    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, 3, 16, 16, generator=g)
    mask = (torch.rand(3, 1, 16, 16, generator=g) > 0.7).float()
    seen = (mask_image(img, mask, IMAGENET_MEAN) - MEAN) / STD
    assert torch.allclose(seen, (img - MEAN) / STD * mask, atol=1e-6)


def _batch(data, n: int):
    src, src_label = (torch.stack(x) for x in zip(*(data.source[i] for i in range(n))))
    return src, src_label, torch.stack([data.target[i][0] for i in range(n)])


def _setup(tiny_cfg, *overrides):
    cfg = tiny_cfg.with_overrides(["method.self_training_start=1", *overrides])
    data = build_datasets(cfg.data, seed=0)
    torch.manual_seed(0)
    state = build_state(cfg, num_classes=data.num_classes, device=torch.device("cpu"))
    return cfg, data, state


def _params(state):
    return [p.detach().clone() for p in state.student.parameters()]


def test_mic_weight_zero_is_todays_step(tiny_cfg):
    """Switched off, the other mic keys change nothing: same losses, same parameters, bit for bit."""
    runs = []
    for overrides in ([], ["method.mic_weight=0", "method.mic_mask_ratio=0.2", "method.mic_block=2",
                           "method.mic_augment=false"]):
        cfg, data, state = _setup(tiny_cfg, *overrides)
        src, src_label, tgt = _batch(data, cfg.data.batch_size)
        torch.manual_seed(1)
        logs = [train_step(state, src, src_label, tgt, cfg) for _ in range(3)]
        runs.append((logs, _params(state)))
    (logs_a, params_a), (logs_b, params_b) = runs
    assert logs_a == logs_b and "loss_mic" not in logs_a[-1]
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b, strict=True))


def test_mic_loss_matches_a_direct_derivation(tiny_cfg):
    """One adapting step with MIC on: the student's extra image is the target image with whole
    blocks set to the mean colour (hidden fraction near the ratio), its labels the teacher's
    argmax on the *unmasked* target, its weight the fraction of confident teacher pixels (one
    per batch with pseudo_weight=batch_fraction, as DACS/MIC), loss = mean(w * CE) x weight."""
    cfg, data, state = _setup(tiny_cfg, "method.mic_weight=0.5", "method.mic_augment=false",
                              "method.mic_block=4", "method.mic_mask_ratio=0.5",
                              "method.pseudo_weight=batch_fraction", "method.pseudo_threshold=0.12")
    src, src_label, tgt = _batch(data, cfg.data.batch_size)
    b, _, h, w = tgt.shape
    first = train_step(state, src, src_label, tgt, cfg)  # step 0: warm-up, no MIC
    assert "loss_mic" not in first
    seen = {}
    hooks = [state.student.register_forward_hook(lambda mod, args, out: seen.update(s_in=args[0],
                                                                                    s_out=out[0])),
             state.teacher.register_forward_hook(lambda mod, args, out: seen.update(t_in=args[0],
                                                                                    t_out=out[0]))]
    logs = train_step(state, src, src_label, tgt, cfg)
    for hook in hooks:
        hook.remove()

    # The teacher saw the unmasked target images last; the student's last part is the masked one.
    assert torch.equal(seen["t_in"][-b:], tgt)
    masked = seen["s_in"][-b:]
    grid = masked.view(b, 3, h // 4, 4, w // 4, 4)
    hidden = (grid == MEAN.view(1, 3, 1, 1, 1, 1)).all(dim=(1, 3, 5))  # (B, rows, cols)
    keep = (~hidden).float().repeat_interleave(4, dim=1).repeat_interleave(4, dim=2)[:, None]
    assert torch.equal(masked, tgt * keep + MEAN * (1 - keep))  # whole blocks, rest untouched
    assert 0.3 < hidden.float().mean().item() < 0.7  # 4 x 64 cells at ratio 0.5

    t_logits = F.interpolate(seen["t_out"][-b:].float(), size=(h, w), mode="bilinear",
                             align_corners=False)
    prob = t_logits.softmax(dim=1)
    label = prob.argmax(dim=1)
    q = (prob.max(dim=1).values >= 0.12).float().mean()  # MIC/DACS: one quality weight per batch
    s_logits = F.interpolate(seen["s_out"][-b:].float(), size=(h, w), mode="bilinear",
                             align_corners=False)
    ce = -s_logits.log_softmax(dim=1).gather(1, label[:, None])[:, 0]
    expected = (q * ce).mean().item()
    assert logs["loss_mic"] == pytest.approx(expected, rel=1e-5)
    total = logs["loss_src"] + logs["loss_mix"] + logs["pull_weight"] * logs["loss_pull"]
    assert logs["loss"] == pytest.approx(total + 0.5 * expected, rel=1e-5)


def test_mic_gradient_reaches_the_student_only(tiny_cfg):
    cfg, data, state = _setup(tiny_cfg, "method.mic_weight=1", "method.self_training_start=0",
                              "method.pull_weight=0", "method.mix=none")
    src, src_label, tgt = _batch(data, cfg.data.batch_size)
    teacher_before = [p.detach().clone() for p in state.teacher.parameters()]
    logs = train_step(state, src, src_label, tgt, cfg)
    assert math.isfinite(logs["loss_mic"]) and logs["loss_mic"] > 0
    assert all(p.grad is None for p in state.teacher.parameters())
    assert all(p.grad is not None for p in state.student.segmentor.parameters())
    # the teacher moved only by its EMA update (momentum 0 at step 0: a copy of the student)
    for t, s in zip(state.teacher.model.segmentor.parameters(), state.student.segmentor.parameters(),
                    strict=True):
        assert torch.equal(t, s)
    assert any(not torch.equal(a, b) for a, b in zip(teacher_before, state.teacher.parameters(),
                                                     strict=True))


def test_mic_changes_the_step_and_logs_its_loss(tiny_cfg):
    results = {}
    for weight in (0, 1):
        cfg, data, state = _setup(tiny_cfg, f"method.mic_weight={weight}")
        src, src_label, tgt = _batch(data, cfg.data.batch_size)
        torch.manual_seed(1)
        logs = [train_step(state, src, src_label, tgt, cfg) for _ in range(3)]
        results[weight] = (logs, _params(state))
    off, on = results[0][0], results[1][0]
    assert "loss_mic" not in on[0]  # step 0: source-only warm-up, MIC waits for adaptation
    assert off[0] == on[0]
    assert all("loss_mic" in logs and math.isfinite(logs["loss_mic"]) for logs in on[1:])
    assert on[-1]["loss"] != off[-1]["loss"]
    assert any(not torch.equal(a, b) for a, b in zip(results[0][1], results[1][1], strict=True))


@pytest.mark.parametrize("override, message", [
    ("method.mic_weight=-1", "method.mic_weight=-1.0: must be >= 0"),
    ("method.mic_mask_ratio=1.0", r"method.mic_mask_ratio=1.0: must be in \[0, 1\)"),
    ("method.mic_mask_ratio=-0.1", r"method.mic_mask_ratio=-0.1: must be in \[0, 1\)"),
    ("method.mic_block=0", "method.mic_block=0: must be >= 1"),
])
def test_mic_config_errors(tiny_cfg, override, message):
    with pytest.raises(ConfigError, match=message) as err:
        tiny_cfg.with_overrides([override])
    assert "\n" not in str(err.value)
