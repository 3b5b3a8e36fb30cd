"""Every method switch the README and the ``full`` space offer goes through real train_steps.

Each case runs 3 steps of the tiny digits config (step 0 source-only, steps 1-2 adapting) and
checks which loss terms the last step produced, that they are finite, that the total is the
documented sum, and which parameters moved.
"""

from __future__ import annotations

import math

import pytest
import torch

from t2sda.data.loaders import build_datasets
from t2sda.state import build_state
from t2sda.step import train_step

ALL = {"loss_src", "loss_mix", "loss_pull"}
TERMS = ALL | {"loss_mic"}
# (overrides, loss terms expected at an adapting step)
CASES = {
    "default": ([], ALL),
    "source_only": (["method.self_training=false"], {"loss_src", "loss_pull"}),
    "source_only_no_pull": (["method.self_training=false", "method.pull_weight=0"], {"loss_src"}),
    "no_pull": (["method.pull_weight=0"], {"loss_src", "loss_mix"}),
    "oracle": (["data.oracle=true"], ALL),
    "negatives_prototypes": (["method.negatives=prototypes"], ALL),
    "pull_key_net_student": (["method.pull_key_net=student"], ALL),
    "pull_keys_batch": (["method.pull_keys=batch"], ALL),
    "no_target_pixels": (["method.pull_target_pixels=false"], ALL),
    "target_pixels_only": (["method.pull_source_pixels=false"], ALL),
    "pull_decoder_feature": (["method.pull_feature=decoder"], ALL),
    "uniform_negative_sampling": (["method.negative_sampling=uniform"], ALL),
    "mix_none": (["method.mix=none"], ALL),
    "no_strong_aug_no_query_aug": (["method.strong_aug=false", "method.query_aug=false"], ALL),
    "translate_color_lab": (["method.translate=color"], ALL),
    "translate_color_rgb": (["method.translate=color", "method.color_space=rgb"], ALL),
    "translate_none": (["method.translate=none"], ALL),
    "translate_none_no_src_ce": (["method.translate=none", "method.src_ce_on_translated=false"], ALL),
    "weight_confidence": (["method.weight_mode=confidence"], ALL),
    "weight_uniform": (["method.weight_mode=uniform"], ALL),
    "pseudo_batch_fraction": (["method.pseudo_weight=batch_fraction"], ALL),
    "pseudo_pixel": (["method.pseudo_weight=pixel"], ALL),
    "schedule_constant": (["method.weight_schedule=constant"], ALL),
    "schedule_cosine": (["method.weight_schedule=cosine"], ALL),
    "schedule_step": (["method.weight_schedule=step", "method.weight_warmup=1"], ALL),
    "mic": (["method.mic_weight=1"], TERMS),
    "mic_no_augment_half_weight": (["method.mic_weight=0.5", "method.mic_augment=false"], TERMS),
}


def _batch(data, n: int):
    src, src_label = (torch.stack(x) for x in zip(*(data.source[i] for i in range(n))))
    return src, src_label, torch.stack([data.target[i][0] for i in range(n)])


@pytest.mark.parametrize("name", list(CASES))
def test_every_switch_runs_through_the_step(tiny_cfg, name):
    overrides, expected = CASES[name]
    cfg = tiny_cfg.with_overrides(["method.self_training_start=1", "method.pseudo_threshold=0.0",
                                   "method.pull_target_threshold=0.0", *overrides])
    data = build_datasets(cfg.data, seed=0)
    state = build_state(cfg, num_classes=data.num_classes, device=torch.device("cpu"))
    student, proj = state.student, state.student.proj
    assert (proj is not None) == (cfg.method.pull_weight > 0)
    if cfg.method.pull_feature == "decoder":  # no projection: the bank holds decoder features
        assert isinstance(proj, torch.nn.Identity)
        assert state.bank.prototypes.shape[1] == student.segmentor.feature_dim
    before = {k: p.detach().clone() for k, p in student.named_parameters()}
    teacher_before = [p.detach().clone() for p in state.teacher.parameters()]
    src, src_label, tgt = _batch(data, cfg.data.batch_size)
    first = train_step(state, src, src_label, tgt, cfg)
    assert set(first) & TERMS == {"loss_src"}  # step 0: source-only warm-up
    second = train_step(state, src, src_label, tgt, cfg)
    logs = train_step(state, src, src_label, tgt, cfg)

    assert set(logs) & TERMS == expected
    assert all(math.isfinite(v) for k, v in logs.items() if k.startswith("loss"))
    total = logs["loss_src"] + logs.get("loss_mix", 0.0) + logs["pull_weight"] * logs.get("loss_pull", 0.0)
    total += cfg.method.mic_weight * logs.get("loss_mic", 0.0)
    assert logs["loss"] == pytest.approx(total, rel=1e-5)
    assert ("pseudo_conf_frac" in logs) == cfg.method.self_training
    if cfg.method.self_training:  # threshold 0: every target pixel is confident
        assert logs["pseudo_conf_frac"] == 1.0
    weights = torch.tensor([logs[f"class_weight/{c}"] for c in range(data.num_classes)])
    assert weights.mean().item() == pytest.approx(1.0, abs=1e-5)
    if cfg.method.weight_mode == "uniform":
        assert torch.allclose(weights, torch.ones_like(weights))
    # At step 1 the step schedule (warm-up 1) still gives uniform weights; the others have
    # blended in part (linear, cosine: half way with warm-up 2) or all (constant) the score
    # of step 0, which exists only if step 0 ran the target-like source batch (its CE on).
    at_step_1 = torch.tensor([second[f"class_weight/{c}"] for c in range(data.num_classes)])
    uniform_at_1 = (cfg.method.weight_mode == "uniform" or cfg.method.weight_schedule == "step"
                    or not cfg.method.src_ce_on_translated)
    assert torch.allclose(at_step_1, torch.ones_like(at_step_1)) == uniform_at_1

    # The segmentor always learns; the projection head learns exactly when the pull is on.
    moved = {k for k, p in student.named_parameters() if not torch.equal(p, before[k])}
    seg = {k for k in before if k.startswith("segmentor.")}
    assert seg <= moved, seg - moved
    head = {k for k in before if k.startswith("proj.")}
    assert head <= moved if "loss_pull" in expected else not head
    assert all(not torch.equal(a, b) for a, b in zip(teacher_before, state.teacher.parameters(),
                                                      strict=True))


def test_pull_without_queries_is_a_config_error(tiny_cfg):
    from t2sda.config import ConfigError

    with pytest.raises(ConfigError, match="method.pull_source_pixels"):
        tiny_cfg.with_overrides(["method.pull_source_pixels=false", "method.pull_target_pixels=false"])
    cfg = tiny_cfg.with_overrides(["method.pull_source_pixels=false", "method.pull_target_pixels=false",
                                   "method.pull_weight=0"])  # no pull: nothing to query
    assert cfg.method.pull_weight == 0


def test_target_only_queries_come_from_the_mixed_image(tiny_cfg, monkeypatch):
    """pull_source_pixels=false: every query label is a teacher label of a target pixel."""
    import t2sda.step as step_module

    seen = {}
    real = step_module.pull_loss

    def spy(query, query_label, *args, **kwargs):
        seen["n"] = len(query_label)
        return real(query, query_label, *args, **kwargs)

    monkeypatch.setattr(step_module, "pull_loss", spy)
    cfg = tiny_cfg.with_overrides(["method.self_training_start=0", "method.pseudo_threshold=0.0",
                                   "method.pull_target_threshold=1.0", "method.pull_source_pixels=false"])
    data = build_datasets(cfg.data, seed=0)
    state = build_state(cfg, num_classes=data.num_classes, device=torch.device("cpu"))
    src, src_label, tgt = _batch(data, cfg.data.batch_size)
    train_step(state, src, src_label, tgt, cfg)
    assert seen["n"] == 0  # no target pixel reaches confidence 1.0 and source queries are off
    cfg = cfg.with_overrides(["method.pull_target_threshold=0.0"])
    train_step(state, src, src_label, tgt, cfg)
    assert seen["n"] > 0
