import json

import pytest
import torch

from t2sda import checkpoint
from t2sda.data.loaders import InfiniteSampler
from t2sda.state import build_state
from t2sda.step import NonFiniteLossError, train_step
from t2sda.train import train


def _event_tags(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return set(acc.Tags()["scalars"]), set(acc.Tags()["images"])


def test_train_writes_config_metrics_tensorboard_and_checkpoints(tiny_cfg, tmp_path):
    reports = []
    metrics = train(tiny_cfg, device="cpu", run_dir=tmp_path,
                    report=lambda m, ckpt: reports.append((m, ckpt)))
    assert json.loads((tmp_path / "config.json").read_text()) == tiny_cfg.to_dict()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [3, 6]
    assert metrics == lines[-1] and 0 <= metrics["val/mIoU"] <= 100
    assert {"val/mIoU", "val/mIoU_teacher", "val/IoU/background", "val/IoU/7"} <= set(metrics)
    assert [m["step"] for m, _ in reports] == [3, 6] and all(c for _, c in reports)
    assert [step for step, _ in checkpoint.step_dirs(tmp_path / "checkpoints")] == [3, 6]
    scalars, images = _event_tags(tmp_path)
    expected = {"train/loss", "train/loss_src", "train/loss_mix", "train/loss_pull",
                "train/pseudo_conf_frac", "train/lr", "train/ema_momentum", "train/pull_weight",
                "train/class_weight/background", "train/class_weight/9", "val/mIoU",
                "val/mIoU_teacher", "val/IoU/background", "perf/images_per_s"}
    assert expected <= scalars, expected - scalars
    assert {"images/1_source", "images/2_source_target_like", "images/3_target",
            "images/4_pseudo_label", "images/5_prediction", "images/6_ground_truth"} <= images


def test_resume_reproduces_uninterrupted_run(tiny_cfg, tmp_path):
    full = train(tiny_cfg, device="cpu", run_dir=tmp_path / "full")
    interrupted = tiny_cfg.with_overrides(["train.fail_at_step=4"])
    with pytest.raises(RuntimeError, match="injected failure at step 4"):
        train(interrupted, device="cpu", run_dir=tmp_path / "resumed")
    last = checkpoint.latest(tmp_path / "resumed" / "checkpoints")
    assert last.name == "step_0000003"
    resumed = train(interrupted, device="cpu", run_dir=tmp_path / "resumed", resume=last)
    assert resumed["step"] == 6
    assert resumed["val/mIoU"] == pytest.approx(full["val/mIoU"], abs=1e-6)
    a = checkpoint.load(tmp_path / "full" / "checkpoints" / "step_0000006")["state"]
    b = checkpoint.load(tmp_path / "resumed" / "checkpoints" / "step_0000006")["state"]
    for name, tensor in a["student"].items():
        assert torch.allclose(tensor.float(), b["student"][name].float(), atol=1e-6), name
    steps = [json.loads(x)["step"] for x in
             (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 6]


def test_bad_checkpoint_is_a_clear_error(tiny_cfg, tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="not found"):
        train(tiny_cfg, device="cpu", run_dir=tmp_path / "a", resume=tmp_path / "nope")
    bad = tmp_path / "bad" / "state.pt"
    bad.parent.mkdir()
    bad.write_bytes(b"garbage")
    with pytest.raises(checkpoint.CheckpointError, match="unreadable"):
        train(tiny_cfg, device="cpu", run_dir=tmp_path / "a", resume=bad)
    assert not (tmp_path / "a").exists()  # failed before writing anything


def test_gradients_reach_only_the_student(tiny_cfg):
    from t2sda.data.loaders import build_datasets

    cfg = tiny_cfg.with_overrides(["method.self_training_start=0"])
    data = build_datasets(cfg.data, seed=0)
    state = build_state(cfg, num_classes=data.num_classes, device=torch.device("cpu"))
    src, src_label = (torch.stack(x) for x in zip(*(data.source[i] for i in range(4))))
    tgt = torch.stack([data.target[i][0] for i in range(4)])
    teacher_before = {k: v.clone() for k, v in state.teacher.model.state_dict().items()}
    logs = train_step(state, src, src_label, tgt, cfg)
    assert {"loss_src", "loss_mix", "loss_pull"} <= set(logs)
    assert all(p.grad is None for p in state.teacher.parameters())
    grads = dict(state.student.named_parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in grads.values())
    # The pull reaches the projection head, the losses the classifier: non-zero gradients.
    assert all(p.grad.abs().sum() > 0 for k, p in grads.items() if k.startswith("proj."))
    classifier = {k: p for k, p in grads.items() if k.startswith("segmentor.head.classifier.")}
    assert classifier and all(p.grad.abs().sum() > 0 for p in classifier.values())
    # The teacher moved by exactly the EMA rule at k = 0 (alpha = 0: a copy of the student).
    for (name, t), s in zip(state.teacher.model.state_dict().items(),
                            state.student.state_dict().values(), strict=True):
        if t.dtype.is_floating_point:
            assert torch.allclose(t, s), name
    assert any(not torch.equal(teacher_before[k], v)
               for k, v in state.teacher.model.state_dict().items())


def test_nonfinite_loss_names_step_and_term(tiny_cfg, tmp_path):
    cfg = tiny_cfg.with_overrides(["optim.lr=1e30", "optim.warmup_iters=0"])
    with pytest.raises(NonFiniteLossError, match=r"step \d+: loss term 'loss\w*' is (nan|inf)"):
        train(cfg, device="cpu", run_dir=tmp_path)


def test_infinite_sampler_resumes_and_shards():
    full = InfiniteSampler(10, seed=3)
    stream = [i for _, i in zip(range(25), full)]
    assert sorted(stream[:10]) == list(range(10)) and stream[:10] != stream[10:20]
    later = InfiniteSampler(10, seed=3, start=13)
    assert [i for _, i in zip(range(12), later)] == stream[13:25]
    ranks = [InfiniteSampler(10, seed=3, rank=r, world_size=2) for r in (0, 1)]
    shards = [[i for _, i in zip(range(5), s)] for s in ranks]
    assert sorted(shards[0] + shards[1]) == list(range(10))


def test_resuming_a_finished_run_returns_its_metrics(tiny_cfg, tmp_path):
    done = train(tiny_cfg, device="cpu", run_dir=tmp_path)
    last = checkpoint.latest(tmp_path / "checkpoints")
    again = train(tiny_cfg, device="cpu", run_dir=tmp_path, resume=last)
    assert again["step"] == 6 and again["val/mIoU"] == pytest.approx(done["val/mIoU"])
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    # metrics.jsonl is strict JSON: classes without an IoU are null, never NaN.
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))


def test_prune_keeps_best_by_score_and_the_latest(tmp_path):
    from t2sda import checkpoint

    for step, score in [(10, 5.0), (20, 9.0), (30, 7.0), (40, 1.0), (50, 3.0)]:
        checkpoint.save(tmp_path / f"step_{step:07d}", {"state": {}, "step": step}, score=score)
    checkpoint.prune(tmp_path, keep=2)
    assert [s for s, _ in checkpoint.step_dirs(tmp_path)] == [20, 30, 50]  # best 2 + newest
    assert checkpoint.meta(tmp_path / "step_0000050") == {"step": 50, "score": 3.0}


def test_lr_scaling_rules():
    from t2sda.state import lr_scale

    assert lr_scale("none", 4) == 1.0 and lr_scale("linear", 4) == 4.0 and lr_scale("sqrt", 4) == 2.0


def test_adamw_uses_fused_on_cuda_foreach_on_cpu_and_matches_the_loop(tiny_cfg):
    from t2sda.data.loaders import build_datasets
    from t2sda.state import adamw_impl

    assert adamw_impl(torch.device("cuda", 0)) == {"fused": True}
    assert adamw_impl(torch.device("cpu")) == {"foreach": True}
    data = build_datasets(tiny_cfg.data, seed=0)
    state = build_state(tiny_cfg, num_classes=data.num_classes, device=torch.device("cpu"))
    assert state.optimizer.defaults["foreach"] is True and not state.optimizer.defaults["fused"]
    # The foreach update equals the per-tensor loop on the same parameters and gradients.
    torch.manual_seed(0)
    params = [torch.randn(5, 3, requires_grad=True), torch.randn(7, requires_grad=True)]
    twins = [p.detach().clone().requires_grad_() for p in params]
    start = [p.detach().clone() for p in params]
    for p, q in zip(params, twins, strict=True):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    fast = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01, **adamw_impl(torch.device("cpu")))
    loop = torch.optim.AdamW(twins, lr=1e-2, weight_decay=0.01, foreach=False)
    for _ in range(3):
        fast.step()
        loop.step()
    for p, q, p0 in zip(params, twins, start, strict=True):
        assert not torch.allclose(p, p0)  # the step did move the parameters
        torch.testing.assert_close(p, q)


def _student(run_dir, step):
    return checkpoint.load(run_dir / "checkpoints" / f"step_{step:07d}")["state"]["student"]


def _same(a, b) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_adapt_seed_changes_only_the_adaptation_and_resumes_from_a_shared_warmup(tiny_cfg, tmp_path):
    """adapt_seed: identical up to method.self_training_start, different after; a replicate
    started from the adapt_seed=0 run's checkpoint at that step (a search's shared warm-up)
    equals the one trained from scratch, and resumes exactly after a failure."""
    base = tiny_cfg.with_overrides(["method.self_training_start=3"])
    other = base.with_overrides({"adapt_seed": 1})
    train(base, device="cpu", run_dir=tmp_path / "a")
    full = train(other, device="cpu", run_dir=tmp_path / "b")
    assert json.loads((tmp_path / "b" / "config.json").read_text())["adapt_seed"] == 1
    assert _same(_student(tmp_path / "a", 3), _student(tmp_path / "b", 3))
    assert not _same(_student(tmp_path / "a", 6), _student(tmp_path / "b", 6))

    warmup = tmp_path / "a" / "checkpoints" / "step_0000003"
    from_warmup = train(other, device="cpu", run_dir=tmp_path / "c", resume=warmup)
    assert from_warmup["val/mIoU"] == full["val/mIoU"]
    assert _same(_student(tmp_path / "b", 6), _student(tmp_path / "c", 6))

    failing = other.with_overrides(["train.fail_at_step=5", "train.checkpoint_every=1"])
    with pytest.raises(RuntimeError, match="injected failure"):
        train(failing, device="cpu", run_dir=tmp_path / "d", resume=warmup)
    last = checkpoint.latest(tmp_path / "d" / "checkpoints")
    assert last.name == "step_0000005"
    train(failing, device="cpu", run_dir=tmp_path / "d", resume=last)
    assert _same(_student(tmp_path / "b", 6), _student(tmp_path / "d", 6))
