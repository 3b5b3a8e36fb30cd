"""A search's shared warm-up: which spaces may share it, which trials may start from it, and
that a trial started from it trains exactly what it would have trained from scratch."""

import json

import pytest
import torch

import tune_spaces
from t2sda import checkpoint
from t2sda.presets import get_preset
from t2sda.ray_glue import shared_warmup
from t2sda.state import build_state
from t2sda.step import train_step
from t2sda.train import train


def _searched(space_name: str) -> set[str]:
    space = tune_spaces.load(space_name, adaptation_steps=600)
    return {name for trial in tune_spaces.draw(space, 50, seed=0) for name in trial.distributions}


def test_plan_per_space():
    base = get_preset("digits")
    cfg, why = shared_warmup.plan(base, _searched("pull_loss"))
    # pull_loss searches the teacher's momentum, which acts during the warm-up unless the
    # teacher restarts from the student when adaptation begins.
    assert cfg is not None and cfg.method.teacher_reset and not base.method.teacher_reset
    assert "teacher_reset" in why
    cfg, why = shared_warmup.plan(base, _searched("full"))  # searches optim.lr, weight_mode...
    assert cfg is None and "optim.lr" in why
    cfg, why = shared_warmup.plan(base.with_overrides(["method.self_training_start=0"]),
                                  {"method.pull_weight"})
    assert cfg is None and "self_training_start=0" in why
    cfg, why = shared_warmup.plan(base, {"method.pull_temperature", "method.pull_weight"})
    assert cfg is base and "0-600" in why


def test_fits_only_trials_that_differ_after_adaptation():
    warm, _ = shared_warmup.plan(get_preset("digits"), {"method.ema_momentum"})
    assert shared_warmup.fits(warm, warm.with_overrides(["method.pull_temperature=0.05",
                                                         "method.ema_momentum=0.995"]))
    assert not shared_warmup.fits(warm, warm.with_overrides(["optim.lr=0.01"]))
    assert not shared_warmup.fits(warm, warm.with_overrides(["method.weight_momentum=0.5"]))
    # replicates: the adaptation's seed fits the warm-up, the full seed does not
    assert shared_warmup.fits(warm, warm.with_overrides({"adapt_seed": 2}))
    assert not shared_warmup.fits(warm, warm.with_overrides({"seed": 1}))
    # no projection head in the trial: the warm-up's state does not fit its modules
    assert not shared_warmup.fits(warm, warm.with_overrides(["method.pull_weight=0"]))
    plain = get_preset("digits")  # without teacher_reset the momentum acts in the warm-up
    assert not shared_warmup.fits(plain, plain.with_overrides(["method.ema_momentum=0.995"]))


def test_record_round_trip_and_mismatch(tmp_path):
    warm = get_preset("digits")
    assert shared_warmup.load_record(tmp_path, warm) is None
    shared_warmup.save_record(tmp_path, warm, "/x/checkpoint_1", {"val/mIoU": 40.0})
    assert shared_warmup.load_record(tmp_path, warm) == "/x/checkpoint_1"
    assert shared_warmup.load_record(tmp_path, warm.with_overrides(["seed=1"])) is None
    (tmp_path / shared_warmup.RECORD).write_text("{not json")
    assert shared_warmup.load_record(tmp_path, warm) is None


def test_teacher_reset_copies_the_student_when_adaptation_starts(tiny_cfg):
    cfg = tiny_cfg.with_overrides(["method.teacher_reset=true", "method.ema_momentum=0.9"])
    state = build_state(cfg, num_classes=11, device=torch.device("cpu"))
    torch.manual_seed(0)
    img, label = torch.rand(4, 3, 32, 32), torch.randint(0, 11, (4, 32, 32))
    start = cfg.method.self_training_start
    for _ in range(start):
        train_step(state, img, label, torch.rand(4, 3, 32, 32), cfg)
    before = [p.detach().clone() for p in state.student.parameters()]
    train_step(state, img, label, torch.rand(4, 3, 32, 32), cfg)
    # reset: teacher = student before the step; then one EMA update towards the new student
    momentum = min(1 - 1 / (start + 1), 0.9)
    after = list(state.student.parameters())
    for t, old, new in zip(state.teacher.model.parameters(), before, after, strict=True):
        assert torch.allclose(t, momentum * old + (1 - momentum) * new.detach(), atol=1e-6)


def test_trial_from_the_warmup_equals_the_trial_from_scratch(tiny_cfg, tmp_path):
    base = tiny_cfg.with_overrides(["method.teacher_reset=true", "method.ema_momentum=0.5"])
    start = base.method.self_training_start
    trial = base.with_overrides(["method.ema_momentum=0.9", "method.pull_temperature=0.05"])
    assert shared_warmup.fits(base, trial)
    scratch = train(trial, device="cpu", run_dir=tmp_path / "scratch")
    warm = train(base, device="cpu", run_dir=tmp_path / "warmup", stop_at=start)
    assert warm["step"] == start  # evaluated and checkpointed at the stop
    shared = checkpoint.latest(tmp_path / "warmup" / "checkpoints")
    assert shared.name == f"step_{start:07d}"
    resumed = train(trial, device="cpu", run_dir=tmp_path / "trial", resume=shared)
    assert resumed["step"] == scratch["step"] == trial.train.iters
    for key in ("val/mIoU", "val/mIoU_teacher"):
        assert resumed[key] == pytest.approx(scratch[key], abs=1e-9), key
    last = f"step_{trial.train.iters:07d}"
    a = checkpoint.load(tmp_path / "scratch" / "checkpoints" / last)["state"]
    b = checkpoint.load(tmp_path / "trial" / "checkpoints" / last)["state"]
    for part in ("student", "teacher"):
        for name, tensor in a[part].items():
            assert torch.equal(tensor, b[part][name]), (part, name)
    rows = [json.loads(x) for x in (tmp_path / "trial" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6]  # the trial logs only its own steps
