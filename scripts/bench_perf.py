#!/usr/bin/env python
"""CPU measurements of the performance switches: train.compile and train.grad_checkpoint.

    .venv/bin/python scripts/bench_perf.py                    # both parts, results/bench_perf/
    .venv/bin/python scripts/bench_perf.py --parts checkpoint --size 128 --batch 2

One torch thread (``torch.set_num_threads(1)``), random init, generated data.

compile: the real ``t2sda.step.train_step`` (every part of the method on from step 0: teacher
pseudo labels, ClassMix, pull loss, re-weighting) of ``small_cnn`` (digits preset) and
``deeplabv2_r101`` (gta2cs_deeplabv2 preset) at ``--compile-size`` px, eager
(``train.compile=none``) against ``train.compile=default``. "first step s" is the first step
(it holds the compilation of the teacher's and the student's graphs, forward and backward);
steps/s is over ``--steps`` further steps after one more warm-up step.

checkpoint: one forward + backward of the segmentor alone (``daformer_mitb5``,
``deeplabv2_r101``) in training mode on ``--batch`` images of ``--size`` px, without and with
``set_grad_checkpointing`` (what ``train.grad_checkpoint=true`` sets). Peak MiB = peak of
tensor memory above what was live before the pass, gradients already allocated (so it is the
activations saved for the backward and the recomputation), from torch.profiler's memory events
(``t2sda.perf.cpu_peak_bytes``); time = mean wall time of ``--repeats`` passes without the
profiler. The machine may be shared: times are indicative, the memory is not affected by load.

Writes ``<out>/bench_perf.json`` and ``.md`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from t2sda.models import build_model  # noqa: E402
from t2sda.perf import cpu_peak_bytes  # noqa: E402
from t2sda.presets import get_preset  # noqa: E402
from t2sda.state import build_state  # noqa: E402
from t2sda.step import train_step  # noqa: E402

COMPILE_MODELS = {"small_cnn": ("digits", 10), "deeplabv2_r101": ("gta2cs_deeplabv2", 19)}
CHECKPOINT_MODELS = ("deeplabv2_r101", "daformer_mitb5")


def say(text: str) -> None:
    print(f"bench_perf: {text}", flush=True)


def batch(size: int, b: int, classes: int) -> tuple[torch.Tensor, ...]:
    block = max(size // 8, 1)
    label = torch.randint(0, classes, (b, size // block, size // block))
    label = label.repeat_interleave(block, 1).repeat_interleave(block, 2)
    return torch.rand(b, 3, size, size), label, torch.rand(b, 3, size, size)


def compile_run(model: str, mode: str, size: int, b: int, steps: int) -> dict:
    preset, classes = COMPILE_MODELS[model]
    cfg = get_preset(preset).with_overrides({
        "model.pretrained": "", "method.fd_weight": 0, "train.compile": mode, "data.batch_size": b,
        "data.image_size": size,
        "method.self_training_start": 0, "method.num_queries": 16, "method.num_negatives": 16})
    torch._dynamo.reset()
    state = build_state(cfg, num_classes=classes, device=torch.device("cpu"))
    data = batch(size, b, classes)
    times = []
    for i in range(steps + 2):
        torch.manual_seed(i)
        tic = time.perf_counter()
        train_step(state, *data, cfg)
        times.append(time.perf_counter() - tic)
        if i == 0:
            say(f"{model} compile={mode}: first step {times[0]:.1f} s")
    return {"model": model, "compile": mode, "size": size, "batch": b,
            "first_step_s": times[0], "steps_per_s": steps / sum(times[2:])}


def checkpoint_run(model: str, ckpt: bool, size: int, b: int, repeats: int) -> dict:
    torch.manual_seed(0)
    net = build_model(model, num_classes=19).train()
    if ckpt:
        net.set_grad_checkpointing(True)
    image = torch.rand(b, 3, size, size)

    def step():
        logits, feature = net(image)
        (logits.float().square().mean() + feature.float().mean()).backward()

    step()  # gradients allocated: the peak below is the pass's own memory
    peak = cpu_peak_bytes(step)
    tic = time.perf_counter()
    for _ in range(repeats):
        step()
    seconds = (time.perf_counter() - tic) / repeats
    say(f"{model} grad_checkpoint={ckpt}: peak {peak / 2**20:.0f} MiB, {seconds:.2f} s/pass")
    return {"model": model, "grad_checkpoint": ckpt, "size": size, "batch": b,
            "peak_mib": peak / 2**20, "pass_s": seconds}


def table(result: dict) -> str:
    lines = [f"CPU: {result['cpu']}, 1 torch thread, torch {result['torch']}; shared machine "
             "(times indicative)."]
    if result["compile"]:
        lines += ["", "| model | size | batch | compile | first step s | steps/s | speed-up |",
                  "|---|---|---|---|---|---|---|"]
        eager = {r["model"]: r["steps_per_s"] for r in result["compile"] if r["compile"] == "none"}
        for r in result["compile"]:
            lines.append(f"| {r['model']} | {r['size']} | {r['batch']} | {r['compile']} | "
                         f"{r['first_step_s']:.1f} | {r['steps_per_s']:.3f} | "
                         f"{r['steps_per_s'] / eager[r['model']]:.2f}x |")
    if result["checkpoint"]:
        lines += ["", "| model | size | batch | grad_checkpoint | peak activation MiB | "
                  "of eager | fwd+bwd s | of eager |", "|---|---|---|---|---|---|---|---|"]
        eager = {r["model"]: r for r in result["checkpoint"] if not r["grad_checkpoint"]}
        for r in result["checkpoint"]:
            e = eager[r["model"]]
            lines.append(f"| {r['model']} | {r['size']} | {r['batch']} | {r['grad_checkpoint']} | "
                         f"{r['peak_mib']:.0f} | {100 * r['peak_mib'] / e['peak_mib']:.0f} % | "
                         f"{r['pass_s']:.2f} | {100 * r['pass_s'] / e['pass_s']:.0f} % |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["compile", "checkpoint"],
                        choices=("compile", "checkpoint"))
    parser.add_argument("--compile-models", nargs="+", default=list(COMPILE_MODELS),
                        choices=list(COMPILE_MODELS))
    parser.add_argument("--compile-size", type=int, default=64)
    parser.add_argument("--compile-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per compile run")
    parser.add_argument("--size", type=int, default=128, help="checkpoint part: image side")
    parser.add_argument("--batch", type=int, default=2, help="checkpoint part: images")
    parser.add_argument("--repeats", type=int, default=2, help="checkpoint part: timed passes")
    parser.add_argument("--out", default=str(ROOT / "results/bench_perf"))
    args = parser.parse_args(argv)
    for key in ("compile_size", "compile_batch", "steps", "size", "batch", "repeats"):
        if getattr(args, key) < 1 or (key.endswith("size") and getattr(args, key) < 32):
            print(f"bench_perf: error: --{key.replace('_', '-')} {getattr(args, key)}: too small",
                  file=sys.stderr)
            return 2
    torch.set_num_threads(1)
    result = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
              "args": vars(args), "compile": [], "checkpoint": []}
    if "compile" in args.parts:
        for model in args.compile_models:
            for mode in ("none", "default"):
                result["compile"].append(compile_run(model, mode, args.compile_size,
                                                     args.compile_batch, args.steps))
    if "checkpoint" in args.parts:
        for model in CHECKPOINT_MODELS:
            for ckpt in (False, True):
                result["checkpoint"].append(checkpoint_run(model, ckpt, args.size, args.batch,
                                                           args.repeats))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_perf.json").write_text(json.dumps(result, indent=2) + "\n")
    text = table(result)
    (out / "bench_perf.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
