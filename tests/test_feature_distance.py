"""DAFormer's ImageNet feature distance: label downscaling, the masked distance, the step."""

import pytest
import torch
import torch.nn.functional as F

from t2sda.config import ConfigError
from t2sda.method.feature_distance import (
    downscale_label_ratio,
    feature_distance,
    masked_feat_dist,
)
from t2sda.models import build_model
from t2sda.state import build_state
from t2sda.step import train_step


def _onehot_reference(label, factor, min_ratio, num_classes):
    """The rule written the other way round: one-hot, average-pool, argmax (DAFormer's recipe)."""
    x = torch.where(label == 255, num_classes, label)
    onehot = F.one_hot(x, num_classes + 1).permute(0, 3, 1, 2).float()
    ratio, out = F.avg_pool2d(onehot, factor).max(dim=1)
    out[(out == num_classes) | (ratio < min_ratio)] = 255
    return out


def test_downscale_label_known_cells():
    label = torch.tensor([[6, 6, 7, 7],
                          [6, 6, 7, 255],
                          [1, 2, 255, 255],
                          [1, 2, 255, 5]])[None]
    out = downscale_label_ratio(label, 2, min_ratio=0.75, num_classes=19)
    # all 6 | 7 covers 3/4 | 1 and 2 at 1/2 each: below 0.75 | ignore is the majority
    assert out.tolist() == [[[6, 7], [255, 255]]]
    loose = downscale_label_ratio(label, 2, min_ratio=0.5, num_classes=19)
    assert loose.tolist() == [[[6, 7], [1, 255]]]  # tie 1 vs 2 -> the lower id


def test_downscale_label_matches_onehot_pooling():
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 5, (3, 24, 32), generator=g)
    label[torch.rand(label.shape, generator=g) < 0.2] = 255
    label = label.repeat_interleave(2, 1)  # blocky, so many cells pass the ratio
    for factor, ratio in ((2, 0.75), (4, 0.5), (8, 0.0)):
        out = downscale_label_ratio(label, factor, min_ratio=ratio, num_classes=5)
        ref = _onehot_reference(label, factor, ratio, 5)
        assert out.shape == ref.shape
        # ties may break either way in the reference; compare where the top count is unique
        assert (out == ref).float().mean() > 0.97


def test_masked_distance_known_answer():
    student = torch.zeros(1, 2, 2, 2)
    frozen = torch.tensor([[[[3.0, 0.0], [1.0, 6.0]], [[4.0, 0.0], [0.0, 8.0]]]])  # norms 5 0 1 10
    assert masked_feat_dist(student, frozen).item() == pytest.approx(4.0)
    mask = torch.tensor([[[True, False], [False, True]]])
    assert masked_feat_dist(student, frozen, mask).item() == pytest.approx(7.5)
    empty = masked_feat_dist(student.requires_grad_(), frozen, torch.zeros_like(mask))
    assert empty.item() == 0.0 and empty.requires_grad


def test_feature_distance_masks_thing_classes_only():
    label = torch.full((1, 8, 8), 0)
    label[:, :4, :4] = 11  # person in the top-left 2x2 feature cells (factor 4 -> 2x2 map)
    student, frozen = torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2)
    frozen[:, 0, 0, 0] = 2.0  # the thing cell
    frozen[:, 0, 1, 1] = 100.0  # a road cell: ignored
    d = feature_distance(student, frozen, label, classes=(6, 7, 11), min_ratio=0.75, num_classes=19)
    assert d.item() == pytest.approx(2.0)


@pytest.fixture
def fd_cfg(tiny_cfg, tmp_path):
    torch.manual_seed(1)
    backbone = build_model("small_cnn", num_classes=11).backbone
    path = tmp_path / "backbone.pth"
    torch.save(backbone.state_dict(), path)
    # 32 px digits at stride 8: most cells are background; count every class
    return tiny_cfg.with_overrides([f"model.pretrained={path}", "method.fd_weight=0.5",
                                    "method.fd_classes=0,1,2,3,4,5,6,7,8,9,10",
                                    "method.fd_min_ratio=0.0", "method.self_training_start=0"])


def _batch(cfg):
    from t2sda.data.loaders import build_datasets

    data = build_datasets(cfg.data, seed=0)
    src, label = (torch.stack(x) for x in zip(*(data.source[i] for i in range(4)), strict=True))
    return data.num_classes, src, label, torch.stack([data.target[i][0] for i in range(4)])


def test_step_feature_distance_reaches_backbone_only(fd_cfg):
    num_classes, src, label, tgt = _batch(fd_cfg)
    grads, logs = {}, {}
    for weight in (0.0, 0.5):
        cfg = fd_cfg.with_overrides({"method.fd_weight": weight})
        state = build_state(cfg, num_classes=num_classes, device=torch.device("cpu"))
        assert (state.imnet is not None) == (weight > 0)
        if state.imnet is not None:
            frozen = {k: v.clone() for k, v in state.imnet.state_dict().items()}
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # the student starts equal to the frozen copy: move it away first
            for p in state.student.segmentor.backbone.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        torch.manual_seed(0)
        logs[weight] = train_step(state, src, label, tgt, cfg)
        seg = state.student.segmentor
        grads[weight] = ({k: p.grad.clone() for k, p in seg.backbone.named_parameters()},
                         {k: p.grad.clone() for k, p in seg.head.named_parameters()})
    assert "loss_fd" not in logs[0.0]
    assert torch.isfinite(torch.tensor(logs[0.5]["loss_fd"])) and logs[0.5]["loss_fd"] > 0
    assert logs[0.5]["loss"] == pytest.approx(logs[0.0]["loss"] + 0.5 * logs[0.5]["loss_fd"], rel=1e-4)
    # the term's gradient lands in the backbone, not in the head
    assert any(not torch.allclose(grads[0.0][0][k], g) for k, g in grads[0.5][0].items())
    for k, g in grads[0.5][1].items():
        torch.testing.assert_close(g, grads[0.0][1][k])
    assert all(p.grad is None and not p.requires_grad for p in state.imnet.parameters())
    for k, v in state.imnet.state_dict().items():
        assert torch.equal(v, frozen[k]), k  # BN statistics included: the copy runs in eval mode
    assert "imnet" not in state.state_dict()


def test_fd_weight_needs_pretrained(tiny_cfg):
    with pytest.raises(ConfigError, match=r"method.fd_weight=0.005: .*model.pretrained"):
        tiny_cfg.with_overrides(["method.fd_weight=0.005"])
    with pytest.raises(ConfigError, match="method.fd_classes"):
        tiny_cfg.with_overrides(["method.fd_classes=person"])
