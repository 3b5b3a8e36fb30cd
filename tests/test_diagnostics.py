"""Feature diagnostics and label-free validators on constructed data with known answers."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from t2sda import diagnostics as dg
from t2sda import validators as vd
from t2sda.monitor import with_best
from t2sda.train import train


def _eye(rows: list[int], dim: int = 4) -> torch.Tensor:
    return torch.eye(dim)[rows]


def test_cross_domain_cos_same_direction_orthogonal_and_absent():
    src_feat, src_label = _eye([0, 0, 1, 2]), torch.tensor([0, 0, 1, 2])
    # class 0: same direction at another scale (cos 1); class 1: orthogonal (cos 0);
    # class 2: source only; class 3: target only -> NaN for both.
    tgt_feat = torch.cat([3 * _eye([0]), _eye([3]), _eye([1])])
    tgt_label = torch.tensor([0, 1, 3])
    cos = dg.cross_domain_cos(src_feat, src_label, tgt_feat, tgt_label, num_classes=4)
    assert cos[:2].tolist() == pytest.approx([1.0, 0.0])
    assert cos[2:].isnan().all()
    assert cos.nanmean().item() == pytest.approx(0.5)


def test_target_to_source_acc_uses_nearest_source_prototype():
    src_feat = torch.cat([_eye([0, 0]), _eye([1, 1])])
    src_label = torch.tensor([0, 0, 1, 1])
    # class 0 pixels next to prototype 0; class 1: one near prototype 1, one near prototype 0;
    # class 2 has no source prototype (NaN) and is never predicted.
    tgt_feat = torch.tensor([[1.0, 0.1, 0, 0], [1.0, -0.2, 0, 0], [0.1, 1.0, 0, 0],
                             [1.0, 0.3, 0, 0], [0, 0, 1.0, 0]])
    tgt_label = torch.tensor([0, 0, 1, 1, 2])
    acc = dg.target_to_source_acc(src_feat, src_label, tgt_feat, tgt_label, num_classes=3)
    assert acc[:2].tolist() == pytest.approx([1.0, 0.5])
    assert acc[2].isnan()


def test_separability_trace_ratio_matches_closed_form():
    d = 0.25  # classes at -1 and +1 with points +-d around them: S_B = 4, S_W = 4 d^2
    feat = torch.tensor([[-1 - d], [-1 + d], [1 - d], [1 + d]])
    label = torch.tensor([0, 0, 1, 1])
    ratio, per_class = dg.separability(feat, label, num_classes=3)
    assert ratio == pytest.approx(1 / d**2)
    assert per_class[:2].tolist() == pytest.approx([1 / d**2, 1 / d**2])
    assert per_class[2].isnan()
    # A global scale changes nothing.
    assert dg.separability(7 * feat, label, num_classes=3)[0] == pytest.approx(ratio)


def test_balanced_sample_counts_skip_ignore_and_repeat_with_seed():
    label = torch.tensor([0] * 100 + [1] * 5 + [255] * 50 + [2] * 30)
    pick = dg.balanced_sample(label, per_class=10, num_classes=3,
                              generator=torch.Generator().manual_seed(0))
    assert torch.bincount(label[pick], minlength=3).tolist() == [10, 5, 10]
    again = dg.balanced_sample(label, per_class=10, num_classes=3,
                               generator=torch.Generator().manual_seed(0))
    assert torch.equal(pick, again)


def test_snd_known_answers_and_direct_definition():
    # Two points: each has one neighbour, entropy 0. N identical points: uniform over N-1.
    assert vd.snd(torch.randn(2, 5)) == pytest.approx(0.0)
    assert vd.snd(torch.ones(6, 3)) == pytest.approx(math.log(5))
    feat = torch.randn(12, 4, generator=torch.Generator().manual_seed(1))
    f = F.normalize(feat.double(), dim=1)
    expected = 0.0
    for i in range(12):
        sims = torch.stack([f[i] @ f[j] for j in range(12) if j != i]) / 0.05
        p = sims.softmax(0)
        expected += -(p * p.log()).sum().item() / 12
    assert vd.snd(feat) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="at least 2"):
        vd.snd(torch.ones(1, 3))


def test_entropy_and_agreement():
    ent, n = vd.entropy_sum(torch.zeros(2, 5, 3, 3))  # uniform over 5 classes
    assert n == 18 and ent.item() / n == pytest.approx(math.log(5))
    a = torch.zeros(1, 3, 1, 4)
    a[0, 0, 0, :] = 1  # class 0 everywhere
    b = a.clone()
    b[0, 2, 0, :2] = 5  # class 2 on half the pixels
    agree, n = vd.agreement_count(a, b)
    assert (agree.item(), n) == (2, 4)


def test_directions_and_best_so_far():
    assert vd.DIRECTIONS["entropy"] == "min" and vd.DIRECTIONS["snd"] == "max"
    assert "target_miou" not in vd.LABEL_FREE
    first = {"step": 200, "select/entropy": 0.5, "select/snd": 2.0}
    best = with_best(first, {})
    assert best == {"select/best_entropy": 0.5, "select/best_snd": 2.0}
    second = with_best({"select/entropy": 0.7, "select/snd": 3.0}, {"step": 200, **best})
    assert second == {"select/best_entropy": 0.5, "select/best_snd": 3.0}
    # Warm-up evaluations (step <= since) are not carried into the adaptation phase.
    after = with_best({"select/entropy": 0.7, "select/snd": 1.0}, {"step": 200, **best}, since=200)
    assert after == {"select/best_entropy": 0.7, "select/best_snd": 1.0}


def test_train_logs_diagnostics_validators_and_embeddings(tiny_cfg, tmp_path):
    train(tiny_cfg, device="cpu", run_dir=tmp_path / "on")
    rows = [json.loads(x) for x in (tmp_path / "on" / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        for feature in ("decoder", "proj"):
            assert -1 <= row[f"feat/{feature}/cross_domain_cos"] <= 1
            assert 0 <= row[f"feat/{feature}/target_to_source_acc"] <= 1
            assert row[f"feat/{feature}/separability_source"] > 0
        assert 0 <= row["select/agreement"] <= 1 and 0 <= row["select/source_miou"] <= 100
        assert 0 <= row["select/entropy"] <= math.log(11) + 1e-6 and row["select/snd"] > 0
        assert not any(k.count("/") > 2 for k in row if k.startswith("feat/"))  # no per-class
    # tiny_cfg adapts from step 2: both evaluations (3, 6) count toward the best.
    assert rows[1]["select/best_snd"] == max(r["select/snd"] for r in rows)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "on"), size_guidance={"scalars": 0})
    acc.Reload()
    assert {"feat/decoder/cross_domain_cos/background", "feat/proj/target_to_source_acc/7",
            "select/snd"} <= set(acc.Tags()["scalars"])
    projector = (tmp_path / "on" / "projector_config.pbtxt").read_text()
    assert "feat/decoder" in projector and "feat/proj" in projector
    meta = next((tmp_path / "on").glob("00006/*decoder/metadata.tsv")).read_text().splitlines()
    assert meta[0] == "domain\tclass" and {m.split("\t")[0] for m in meta[1:]} == {"source", "target"}

    off = train(tiny_cfg.with_overrides(["train.diagnostics=false", "train.validators=false"]),
                device="cpu", run_dir=tmp_path / "off")
    assert not any(k.startswith(("feat/", "select/")) for k in off)


def test_monitor_on_labels_larger_than_images_and_without_source_split(tiny_cfg):
    """Real-dataset validation labels stay at full size while the image is downscaled."""
    from types import SimpleNamespace

    from t2sda.monitor import Monitor
    from t2sda.state import build_state

    gen = torch.Generator().manual_seed(0)

    def split(n):
        return [(torch.rand(3, 32, 32, generator=gen), torch.randint(0, 11, (64, 64), generator=gen))
                for _ in range(n)]

    names = tuple(str(i) for i in range(11))
    data = SimpleNamespace(source_val=split(3), val=split(4), class_names=names, num_classes=11)
    state = build_state(tiny_cfg, num_classes=11, device=torch.device("cpu"))
    monitor = Monitor(data, tiny_cfg, torch.device("cpu"))
    metrics, per_class, embeddings = monitor(state)
    first = dict(monitor.index)
    again, _, _ = monitor(state)
    assert all(torch.equal(a, b) for a, b in zip(first["target"], monitor.index["target"]))
    assert again["feat/decoder/cross_domain_cos"] == metrics["feat/decoder/cross_domain_cos"]
    assert len(embeddings["decoder"][1]) == len(embeddings["decoder"][0]) <= 1000
    assert set(per_class) >= {f"feat/proj/target_to_source_acc/{c}" for c in names}
    assert state.student.training  # back in training mode
    # The evaluation pass shares its logits: the same scores without a pass of their own.
    from t2sda.data.loaders import eval_loader
    from t2sda.scoring import evaluate

    student = state.student
    student.eval()
    calls = []
    monitor.observe = lambda logits, own=monitor.observe: (calls.append(1), own(logits))
    evaluate({"student": student, "teacher": state.teacher}, eval_loader(data.val, batch_size=2),
             num_classes=11, device=torch.device("cpu"), observe=monitor.observe)
    student.train()
    assert len(calls) == 2 and monitor.target_sums is not None
    shared, _, _ = monitor(state)
    assert len(calls) == 2 and monitor.target_sums is None  # no second pass; sums consumed
    for key in ("select/agreement", "select/entropy"):
        assert shared[key] == pytest.approx(metrics[key], rel=1e-9)
    data.source_val = None  # no source split: no feat/, no source_miou; target scores stay
    metrics, _, _ = Monitor(data, tiny_cfg, torch.device("cpu"))(state)
    assert not any(k.startswith("feat/") for k in metrics) and "select/source_miou" not in metrics
    assert {"select/agreement", "select/entropy", "select/snd"} <= set(metrics)
