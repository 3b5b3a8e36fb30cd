"""train.compile and train.grad_checkpoint: same numbers as eager, less activation memory."""

import copy
import logging

import pytest
import torch

from t2sda.config import ConfigError
from t2sda.models import build_model
from t2sda.perf import CompileError, compile_forward, cpu_peak_bytes
from t2sda.state import build_state
from t2sda.step import train_step


def _batch(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    size, b = cfg.data.image_size, cfg.data.batch_size
    label = torch.randint(0, 10, (b, size // 8, size // 8), generator=g)
    label = label.repeat_interleave(8, 1).repeat_interleave(8, 2)
    return torch.rand(b, 3, size, size, generator=g), label, torch.rand(b, 3, size, size, generator=g)


def _step(cfg, step):
    """One full train_step (translation, teacher, mixing, pull loss) at ``step``: logs, grads."""
    state = build_state(cfg, num_classes=10, device=torch.device("cpu"))
    state.step = step
    torch.manual_seed(1)
    logs = train_step(state, *_batch(cfg), cfg)
    return logs, {n: p.grad.clone() for n, p in state.student.named_parameters() if p.grad is not None}


def test_compile_and_checkpoint_keys_are_validated(tiny_cfg):
    with pytest.raises(ConfigError, match="train.compile='fast'"):
        tiny_cfg.with_overrides(["train.compile=fast"])
    with pytest.raises(ConfigError, match="model.name=small_cnn has no activation checkpointing"):
        build_state(tiny_cfg.with_overrides(["train.grad_checkpoint=true"]), num_classes=10,
                    device=torch.device("cpu"))


@pytest.mark.slow
def test_compiled_step_matches_eager_loss_and_gradients(tiny_cfg, caplog):
    # Step 3 is past self_training_start: teacher pseudo labels, mixing and the pull loss run.
    eager_logs, eager_grads = _step(tiny_cfg, 3)
    torch._dynamo.reset()
    with caplog.at_level(logging.INFO, logger="t2sda.perf"):
        logs, grads = _step(tiny_cfg.with_overrides(["train.compile=default"]), 3)
    for key in ("loss", "loss_src", "loss_mix", "loss_pull"):
        assert logs[key] == pytest.approx(eager_logs[key], rel=1e-4, abs=1e-6), key
    assert grads.keys() == eager_grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-3, atol=1e-5, msg=name)
    # One summary line per compiled model (the teacher runs first), with the graph-break count.
    lines = [r.getMessage() for r in caplog.records if "graph break" in r.getMessage()]
    assert len(lines) == 2 and "teacher small_cnn" in lines[0] and "student small_cnn" in lines[1]


def test_compile_failure_is_one_line_naming_the_model():
    model = torch.nn.Linear(4, 2)

    def broken_backend(graph, example_inputs):
        raise RuntimeError("no compiler here\nsecond line")

    compile_forward(model, mode="default", name="student demo", backend=broken_backend)
    with pytest.raises(CompileError) as err:
        model(torch.ones(1, 4))
    message = str(err.value)
    assert "\n" not in message and "student demo" in message and "train.compile=none" in message


@pytest.mark.slow
@pytest.mark.parametrize("name", ["deeplabv2_r101", "daformer_mitb5"])
def test_grad_checkpointing_same_gradients_less_memory(name):
    torch.manual_seed(0)
    eager = build_model(name, num_classes=5).train()
    ckpt = copy.deepcopy(eager)
    ckpt.set_grad_checkpointing(True)
    image = torch.rand(2, 3, 96, 96)

    def run(model):
        torch.manual_seed(1)  # same dropout masks in the head
        logits, feature = model(image)
        (logits.square().mean() + feature.mean()).backward()

    peaks = {}
    for key, model in (("eager", eager), ("ckpt", ckpt)):
        run(model)  # gradients allocated now, so the measured peak is activations
        model.zero_grad(set_to_none=False)
        peaks[key] = cpu_peak_bytes(lambda model=model: run(model))
    for (n, p), q in zip(eager.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=n)
    # BatchNorm statistics (DeepLabV2's ResNet) are not updated twice by the recomputation.
    for (n, a), b in zip(eager.named_buffers(), ckpt.buffers(), strict=True):
        torch.testing.assert_close(b, a, msg=n)
    assert peaks["ckpt"] < 0.7 * peaks["eager"], peaks
    # Evaluation (no grad) and the forward output are unchanged.
    with torch.no_grad():
        torch.testing.assert_close(ckpt.eval()(image)[0], eager.eval()(image)[0])
