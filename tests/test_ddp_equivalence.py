"""What DDP promises, checked through the project's own wrapping (train._wrap_ddp) on 2 gloo
processes: 2 ranks x batch B/2 give the 1 x batch B gradients, and optim.lr_scaling reaches
the optimizer's param groups. No Ray here; the Ray Train path is in test_ray_train.py.

The gradient comparison is exact in what it claims: the first step's source CE with
deterministic inputs (translate=none, no CE on translated images, source-only step, so no
random augmentation or sampling), every pixel labelled (so each rank's mean covers the same
number of pixels), BatchNorm on its running statistics (the student in eval mode). With
BatchNorm on batch statistics the shards' statistics differ, and so do the gradients: that
is asserted too (train.sync_bn fixes it on CUDA; SyncBatchNorm does not run on CPU/gloo).
"""

from __future__ import annotations

import pytest
import torch

from t2sda.config import ConfigError
from t2sda.data.loaders import build_datasets
from t2sda.presets import get_preset
from t2sda.state import build_state
from t2sda.step import train_step
from t2sda.train import _wrap_ddp
from tests.conftest import TINY, spawn_gloo

B = 4
DETERMINISTIC = [*TINY, "method.translate=none", "method.src_ce_on_translated=false",
                 "method.self_training_start=5", "optim.warmup_iters=0"]
RULES = {"none": 1.0, "linear": 2.0, "sqrt": 2.0**0.5}  # the lr factor for 2 processes


def _cfg(*overrides: str):
    return get_preset("digits").with_overrides([*DETERMINISTIC, *overrides])


def _first_step_grads(cfg, *, bn_eval: bool, shard: slice, wrap=None) -> dict[str, torch.Tensor]:
    data = build_datasets(cfg.data, seed=0)
    state = build_state(cfg, num_classes=data.num_classes, device=torch.device("cpu"), wrap=wrap)
    src, label = (torch.stack(x) for x in zip(*(data.source[i] for i in range(B))))
    # Every pixel labelled (ignored ones -> background), so each rank's mean CE is over the
    # same number of pixels: the mean of the two shard means is then the full-batch mean.
    label = label.masked_fill(label == 255, 0)
    tgt = torch.stack([data.target[i][0] for i in range(B)])
    if bn_eval:
        state.student.eval()
    logs = train_step(state, src[shard], label[shard], tgt[shard], cfg)
    assert set(logs) & {"loss_src", "loss_mix", "loss_pull"} == {"loss_src"}
    return {k: p.grad.clone() for k, p in state.student.named_parameters() if p.grad is not None}


def _lrs(cfg) -> list[float]:
    state = build_state(cfg, num_classes=11, device=torch.device("cpu"))
    return [group["lr"] for group in state.optimizer.param_groups]


def _worker(rank: int) -> dict:
    cfg, half = _cfg(), B // 2
    shard = slice(rank * half, (rank + 1) * half)
    result = {bn_eval: _first_step_grads(cfg, bn_eval=bn_eval, shard=shard,
                                         wrap=_wrap_ddp(torch.device("cpu"), cfg))
              for bn_eval in (True, False)}
    result["lrs"] = {rule: _lrs(_cfg(f"optim.lr_scaling={rule}")) for rule in RULES}
    try:
        _wrap_ddp(torch.device("cpu"), _cfg("train.sync_bn=true"))
    except ConfigError as err:
        result["sync_bn_error"] = str(err)
    return result


@pytest.mark.slow  # spawns 2 gloo processes
def test_two_ranks_half_batch_match_one_rank_full_batch_lr_scaling_and_sync_bn(tmp_path):
    ddp = spawn_gloo(_worker, str(tmp_path / "ddp.pt"))
    cfg = _cfg()
    single = _first_step_grads(cfg, bn_eval=True, shard=slice(0, B))
    assert set(ddp[True]) == {f"module.{k}" for k in single}  # every parameter got a gradient
    for name, grad in single.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(ddp[True][f"module.{name}"], grad, rtol=1e-4, atol=1e-7)
    # BatchNorm on batch statistics: each rank normalises by its own half: not the same step.
    train_mode = _first_step_grads(cfg, bn_eval=False, shard=slice(0, B))
    assert any(not torch.allclose(ddp[False][f"module.{k}"], g, rtol=1e-3, atol=1e-6)
               for k, g in train_mode.items())

    base = cfg.optim.lr
    for rule, factor in RULES.items():
        assert ddp["lrs"][rule] == pytest.approx(
            [base * factor, base * factor * cfg.optim.head_lr_mult]), rule
        assert _lrs(_cfg(f"optim.lr_scaling={rule}")) == pytest.approx(
            [base, base * cfg.optim.head_lr_mult]), rule  # one process: never scaled
    # SyncBatchNorm does not run on CPU/gloo: one line naming the key, before anything is built.
    assert ddp["sync_bn_error"].startswith("train.sync_bn=true: SyncBatchNorm needs CUDA workers")
    assert _wrap_ddp(torch.device("cpu"), _cfg("train.sync_bn=true")) is None  # 1 process: no-op
