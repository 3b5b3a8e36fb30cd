"""Speed and memory switches applied to built networks: ``train.compile``, ``train.grad_checkpoint``.

Both act on the segmentor (backbone + decoder head) only. The rest of ``Network.forward`` (the
pixel picker, whose sample sizes depend on the labels, and the projection head on the picked
pixels) stays eager: compiling it would mean a graph break or a recompilation per step.
See docs/performance.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from torch import nn

from t2sda.config import ConfigError, TrainConfig

log = logging.getLogger(__name__)


class CompileError(RuntimeError):
    """torch.compile failed on a model; one line naming the model and how to run without it."""


def _dynamo_counts() -> tuple[int, int, dict[str, int]]:
    """(graphs compiled, graph breaks, break reasons) so far in this process."""
    from torch._dynamo.utils import counters

    reasons = dict(counters["graph_break"])
    return counters["stats"]["unique_graphs"], sum(reasons.values()), reasons


def compile_error(err: Exception, name: str, mode: str) -> CompileError:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
    return CompileError(f"train.compile={mode}: torch.compile of the {name} failed "
                        f"({type(err).__name__}: {first}); run with train.compile=none")


def compile_forward(module: nn.Module, *, mode: str, name: str, backend="inductor") -> None:
    """Replace ``module.forward`` by its ``torch.compile`` (mode "default" or "max-autotune").

    The first call compiles; it logs, once, how many graphs that made and how many graph
    breaks (with their reasons), and turns a compiler failure into a one-line ``CompileError``
    naming ``name``. The parameters and ``state_dict`` keys stay those of ``module``.
    ``backend`` is torch.compile's (``mode`` applies to inductor only).
    Call it after any ``copy.deepcopy`` of the module: a copy would share this forward.
    """
    import torch._dynamo  # here, not at import: it takes seconds, and most runs never compile

    eager = module.forward
    mode_arg = None if mode == "default" or backend != "inductor" else mode
    compiled = torch.compile(eager, mode=mode_arg, backend=backend)
    first_call = True

    def forward(*args, **kwargs):
        nonlocal first_call
        if not first_call:
            return compiled(*args, **kwargs)
        graphs, breaks, reasons = _dynamo_counts()
        try:
            out = compiled(*args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as err:
            raise compile_error(err, name, mode) from None
        first_call = False
        graphs_after, breaks_after, reasons_after = _dynamo_counts()
        new = {k: v - reasons.get(k, 0) for k, v in reasons_after.items() if v > reasons.get(k, 0)}
        shown = "; ".join(f"{k.splitlines()[0][:120]} (x{v})" for k, v in list(new.items())[:3])
        (log.warning if new else log.info)(
            "compile (%s): %s: %d graph(s), %d graph break(s)%s", mode, name,
            graphs_after - graphs, breaks_after - breaks, f": {shown}" if shown else "")
        return out

    module.forward = forward


def apply(train: TrainConfig, *, student: nn.Module, teacher: nn.Module, model_name: str) -> None:
    """Apply ``train.grad_checkpoint`` to the student segmentor and ``train.compile`` to both.

    Call before DDP wraps the student (torch's advice for compiled submodules under DDP: the
    compiled region's gradients are all-reduced by DDP's hooks like any others) and after the
    teacher has been copied from it.
    """
    if train.grad_checkpoint:
        try:
            student.set_grad_checkpointing(True)
        except NotImplementedError:
            raise ConfigError(f"train.grad_checkpoint=true: model.name={model_name} has no "
                              "activation checkpointing (daformer_mitb5 and deeplabv2_r101 "
                              "do)") from None
    if train.compile != "none":
        compile_forward(student, mode=train.compile, name=f"student {model_name}")
        compile_forward(teacher, mode=train.compile, name=f"teacher {model_name}")


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak CPU memory allocated by tensors during ``fn()``, above what was live before it.

    From torch.profiler's memory events: each op's own allocations and frees (and those made
    outside ops) in time order; the peak is the running sum's maximum. Transient buffers freed
    inside one op are not seen, so this is the peak of tensors that outlive an op:
    activations saved for the backward, gradients, outputs.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = sorted((event.time_range.start, event.self_cpu_memory_usage)
                    for event in prof.events() if event.self_cpu_memory_usage)
    live = peak = 0
    for _, delta in deltas:
        live += delta
        peak = max(peak, live)
    return peak
