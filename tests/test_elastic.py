"""Elastic worker counts without a cluster: the MIN-MAX flag, and the rule for a run that
resumes on another number of workers (each worker keeps its batch; the lr follows
optim.lr_scaling). The multi-node run itself is in tests/test_multinode.py."""

import pytest
import torch

from t2sda.__main__ import main
from t2sda.config import ConfigError
from t2sda.ray_glue import search
from t2sda.settings import parse_workers
from t2sda.state import build_state


@pytest.mark.parametrize("text, expected", [("2", 2), ("1-4", (1, 4)), (" 2-2 ", 2), ("0", 0)])
def test_workers_spec(text, expected):
    assert parse_workers(text, "--workers", minimum=0) == expected


@pytest.mark.parametrize("text, fragment", [("4-1", "1 <= MIN <= MAX"), ("0-2", "1 <= MIN <= MAX"),
                                             ("two", "a number N or a range"), ("1-2-3", "a number N")])
def test_bad_workers_spec_names_flag_and_value(text, fragment):
    with pytest.raises(ConfigError, match=fragment) as err:
        parse_workers(text, "--workers-per-trial")
    assert str(err.value).startswith(f"--workers-per-trial {text!r}" if "number" in fragment
                                     else f"--workers-per-trial {text}")


def test_bad_worker_ranges_exit_2_with_one_line(capsys):
    assert main(["train", "--workers", "3-1"]) == 2
    assert search.main(["--space", "pull_loss", "--workers-per-trial", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--workers 3-1" in err[0] and "--workers-per-trial 0" in err[1]


@pytest.mark.parametrize("rule, factor", [("none", 1.0), ("linear", 0.5), ("sqrt", 0.5**0.5)])
def test_resume_on_fewer_workers_rescales_the_lr_by_the_rule(tiny_cfg, rule, factor):
    """A checkpoint written by 2 workers, resumed by 1 (this process): each worker keeps its
    batch, so the global batch halves and the lr follows optim.lr_scaling."""
    cfg = tiny_cfg.with_overrides({"optim.lr_scaling": rule})
    saved = build_state(cfg, num_classes=11, device=torch.device("cpu")).state_dict()
    assert saved["world_size"] == 1
    saved["world_size"] = 2  # as if two workers had written it
    for group in saved["optimizer"]["param_groups"]:
        group["initial_lr"] *= 2 if rule == "linear" else 2**0.5 if rule == "sqrt" else 1
        group["lr"] = group["initial_lr"]
    before = [g["initial_lr"] for g in saved["optimizer"]["param_groups"]]
    state = build_state(cfg, num_classes=11, device=torch.device("cpu"))
    state.load_state_dict(saved)
    after = [g["initial_lr"] for g in state.optimizer.param_groups]
    assert after == pytest.approx([b * factor for b in before])
    assert after == pytest.approx([cfg.optim.lr, cfg.optim.lr * cfg.optim.head_lr_mult])
