#!/usr/bin/env python
"""GPU check: DAFormer, HRDA and DeepLabV2 training steps on one GPU through Ray Train with NCCL.

On a lent GPU machine, from the repository root (one prepared run of at most 8 minutes):

    bash scripts/gpu_check.sh                        # scripts/setup.sh, then this script
    T2SDA_PYTHON=python3 bash scripts/gpu_check.sh   # offline image: its python3 holds torch/timm

Results go to ``$OUT/gpu_check.json`` and ``gpu_check.md`` when ``$OUT`` is set (the device
tool brings back what is under it), else to ``results/gpu_check/`` (``--out`` overrides).
On a CPU, ``--cpu-smoke`` runs the same code at toy sizes over gloo, without CUDA timing (the
test suite does; results ``gpu_check_cpu_smoke.*``).

What it measures, for ``daformer_mitb5``, ``deeplabv2_r101`` and ``daformer_mitb5_hrda``
(DAFormer with ``model.hrda``: the ``gta2cs_hrda`` preset's step on 1024x1024 context crops
with a 512x512 detail crop; in bf16 with and without checkpointing) (random init) in fp32
(``train.amp=none``: PyTorch's defaults, i.e. TF32 in cuDNN convolutions, not in matmuls) and
bf16 (``train.amp=bf16``: autocast), and for DAFormer in bf16 also with the performance
switches (docs/performance.md): ``+ckpt`` (``train.grad_checkpoint=true``), ``+compile``
(``train.compile=default``) and both; the configurations run in the order of ``RUNS`` (most
needed first) and ``--configs`` picks others:
- the real ``t2sda.step.train_step`` of the model's GTA->Cityscapes preset (batch 2 of 512x512
  crops, 19 classes; self-training, pull loss and re-weighting from the first step) on generated
  data: random images and labels in random 32x32 blocks, made on the GPU once, so data loading
  is left out;
- images/s = 2 x batch x steps / time over ``--steps`` steps after ``--warmup`` (source + target
  images, as ``perf/images_per_s``), between ``torch.cuda.synchronize()`` calls;
- the step split, over ``--phase-steps`` further steps, from CUDA events recorded around the
  student forward, teacher forward, pull loss (bank update + loss; its backward is part of
  backward), re-weighting (the class weights' update and read-out), backward
  (``Tensor.backward``), optimizer step and EMA update; "other" is the step minus those
  (translation, pseudo labels, mixing, augmentation, cross-entropies). The events come from
  wrapping those calls during these steps only: the step itself is the training code,
  unchanged. "pull+rw" is the pull loss + re-weighting share of that step (their forward side;
  the pull loss's backward is inside backward);
- peak memory: ``torch.cuda.max_memory_allocated`` and ``max_memory_reserved`` over building
  the state and all steps (compilation included), and the process's memory outside torch's
  allocator (CUDA context, cuBLAS / cuDNN workspaces: device memory in use minus reserved, after
  the steps); a card "fits" a configuration when reserved + that overhead is at most its size
  (11, 24 and 80 GiB, the sizes of the usual 11, 24 and 80 GB cards);
- FLOPs per step from ``torch.utils.flop_counter`` over one step (matmuls and convolutions,
  forward and backward); the model's TFLOP/s = FLOPs per step / step time;
- the matmul share: the model's TFLOP/s over the TFLOP/s of a large bf16 matmul (8192^3)
  measured on this card (the achievable peak), and over the card's dense bf16 peak from its
  data sheet (``SPEC_BF16_TFLOPS``, by device name, where known).
Also: ``torch.cuda.get_device_name()``, capability, torch / CUDA / cuDNN / NCCL versions, bf16
support, and the worker's process group (backend, which must be NCCL, and a checked all_reduce).

The worker is one Ray Train ``TorchTrainer`` worker with ``use_gpu=True`` (Ray joins it into an
NCCL group). Where ray is not installed (``--launcher auto``), the same check runs in this
process in a one-process NCCL group (``torch.distributed``); the results name the launcher.
A model that runs out of memory is reported as such; configurations that would start after
``--budget-s`` seconds are skipped, so the whole run stays inside its time.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {"daformer_mitb5": "gta2cs_daformer", "deeplabv2_r101": "gta2cs_deeplabv2",
           "daformer_mitb5_hrda": "gta2cs_hrda"}
# HRDA (model.hrda) trains on context crops twice the side of the DAFormer recipe's, with a
# detail crop of the DAFormer crop's side inside: 1024² and 512² on the GPU, as HRDA's recipe.
HRDA_MODELS = {"daformer_mitb5_hrda": "daformer_mitb5"}
AMPS = ("none", "bf16")
NUM_CLASSES = 19
# Dense bf16 tensor-core peaks (no sparsity) from the data sheets, TFLOP/s; first match wins.
SPEC_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
                    ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0))
SIZES = {  # crop, batch, warm-up / timed / phase-timed steps, matmul side
    "gpu": {"size": 512, "batch": 2, "warmup": 5, "steps": 20, "phase_steps": 10, "matmul": 8192},
    "cpu_smoke": {"size": 64, "batch": 1, "warmup": 1, "steps": 2, "phase_steps": 1, "matmul": 256},
}
PHASES = ("student forward", "teacher forward", "pull loss", "re-weighting", "backward", "optimizer",
          "EMA")
# Configurations: "<amp>[+compile][+ckpt]". In order: a run cut by the budget loses the last ones.
RUNS = (("daformer_mitb5", "bf16"), ("daformer_mitb5", "bf16+ckpt"), ("daformer_mitb5_hrda", "bf16+ckpt"),
        ("daformer_mitb5_hrda", "bf16"), ("deeplabv2_r101", "bf16"),
        ("daformer_mitb5", "none"), ("deeplabv2_r101", "none"), ("daformer_mitb5", "bf16+compile"),
        ("daformer_mitb5", "bf16+compile+ckpt"))
CARDS_GIB = (11, 24, 80)


def parse_config(label: str) -> dict:
    """"bf16+compile+ckpt" -> the run's train.* overrides; a bad label raises ValueError."""
    amp, *switches = label.split("+")
    if amp not in AMPS or not set(switches) <= {"compile", "ckpt"} or len(set(switches)) < len(switches):
        raise ValueError(f"configuration {label!r}: expected <{'|'.join(AMPS)}>[+compile][+ckpt]")
    return {"train.amp": amp, "train.compile": "default" if "compile" in switches else "none",
            "train.grad_checkpoint": "ckpt" in switches}


class Clock:
    """Spans of named phases: CUDA events on the GPU (no synchronisation inside a step),
    ``perf_counter`` on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans = defaultdict(list)

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @contextlib.contextmanager
    def phase(self, name: str):
        start = self._mark()
        yield
        self.spans[name].append((start, self._mark()))

    def mean_ms(self, steps: int) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
        span = (lambda a, b: a.elapsed_time(b)) if self.cuda else (lambda a, b: 1000 * (b - a))
        return {name: sum(span(a, b) for a, b in spans) / steps for name, spans in self.spans.items()}


@contextlib.contextmanager
def timed(clock: Clock, name: str, owner, attr: str):
    """Time every call of ``owner.<attr>`` as phase ``name`` inside the block."""
    original = getattr(owner, attr)
    own = attr in vars(owner)  # a class's or module's attribute is put back, an instance's removed

    def wrapper(*args, **kwargs):
        with clock.phase(name):
            return original(*args, **kwargs)

    setattr(owner, attr, wrapper)
    try:
        yield
    finally:
        if own:
            setattr(owner, attr, original)
        else:
            delattr(owner, attr)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_batches(count: int, batch: int, size: int, device: torch.device) -> list[tuple]:
    """(source image, source label, target image) triples: uniform noise, labels in blocks."""
    block = max(size // 16, 1)
    out = []
    for _ in range(count):
        cells = torch.randint(0, NUM_CLASSES, (batch, size // block, size // block), device=device)
        label = cells.repeat_interleave(block, 1).repeat_interleave(block, 2)
        out.append((torch.rand(batch, 3, size, size, device=device), label,
                    torch.rand(batch, 3, size, size, device=device)))
    return out


def matmul_tflops(device: torch.device, n: int, iters: int = 10) -> float:
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    synchronize(device)
    tic = time.perf_counter()
    for _ in range(iters):
        a @ b
    synchronize(device)
    return 2 * n**3 * iters / (time.perf_counter() - tic) / 1e12


def spec_peak(name: str) -> float | None:
    return next((tflops for key, tflops in SPEC_BF16_TFLOPS if key in name), None)


def check_group(device: torch.device) -> dict:
    """The worker's process group: backend, and an all_reduce whose sum is checked."""
    import torch.distributed as tdist

    value = torch.full((1,), float(tdist.get_rank() + 1), device=device)
    tic = time.perf_counter()
    tdist.all_reduce(value)
    synchronize(device)
    world = tdist.get_world_size()
    return {"backend": tdist.get_backend(), "world_size": world,
            "all_reduce_ok": value.item() == world * (world + 1) / 2,
            "all_reduce_ms": 1000 * (time.perf_counter() - tic)}


def device_info(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "device": "cpu"}
    if device.type == "cuda":
        from torch.backends import cudnn  # not a global: see check()

        props = torch.cuda.get_device_properties(device)
        nccl = torch.cuda.nccl.version()
        info.update(device=torch.cuda.get_device_name(device), capability=f"{props.major}.{props.minor}",
                    memory_gib=props.total_memory / 2**30, cuda=torch.version.cuda,
                    cudnn=cudnn.version(),
                    nccl=".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl),
                    bf16_supported=torch.cuda.is_bf16_supported())
    return info


def phase_split(state, batches, cfg, device: torch.device, first: int, steps: int) -> dict:
    import t2sda.step as step_module

    clock = Clock(device)
    hooks = [("student forward", state.student, "forward"),
             ("teacher forward", state.teacher, "forward"),
             ("pull loss", step_module, "pull_loss"), ("pull loss", state.bank, "update"),
             ("re-weighting", state.weighter, "update"), ("re-weighting", state.weighter, "weights"),
             ("backward", torch.Tensor, "backward"), ("optimizer", state.optimizer, "step"),
             ("EMA", state.teacher, "update")]
    with contextlib.ExitStack() as stack:
        for name, owner, attr in hooks:
            if owner is not None:  # no bank without the pull loss
                stack.enter_context(timed(clock, name, owner, attr))
        for i in range(first, first + steps):
            with clock.phase("step"):
                run_step(state, batches, cfg, i)
    ms = clock.mean_ms(steps)
    step_ms = ms.pop("step")
    phases = {name: ms.get(name, 0.0) for name in PHASES}
    phases["other"] = step_ms - sum(phases.values())
    share = (phases["pull loss"] + phases["re-weighting"]) / step_ms
    return {"step_ms_phase_timed": step_ms, "phases_ms": phases, "pull_reweight_share": share}


def run_step(state, batches, cfg, i: int) -> None:
    from t2sda.step import train_step

    torch.manual_seed(i)  # as the training loop does: a seed per step
    train_step(state, *batches[i % len(batches)], cfg)


_BACKBONES: dict[str, str] = {}


def _initial_backbone(model: str) -> str:
    """A file holding the randomly initialised backbone of ``model`` (seed 0), made once."""
    if model not in _BACKBONES:
        from t2sda.models import build_model

        torch.manual_seed(0)
        folder = Path(tempfile.mkdtemp(prefix="gpu-check-init-"))
        path = folder / f"{model}_init.pth"
        name = HRDA_MODELS.get(model, model)
        torch.save(build_model(name, num_classes=NUM_CLASSES).backbone.state_dict(), path)
        _BACKBONES[model] = str(path)
    return _BACKBONES[model]


def measure(model: str, label: str, device: torch.device, sizes: dict) -> dict:
    import torch._dynamo
    from torch.utils.flop_counter import FlopCounterMode

    from t2sda.presets import get_preset
    from t2sda.state import build_state

    overrides = parse_config(label)
    # No weights can be fetched on a lent machine: random init, and the recipe's feature
    # distance (method.fd_weight) measured against that initial backbone, written to a file.
    size, hrda = sizes["size"], {}
    if model in HRDA_MODELS:
        size, hrda = 2 * size, {"model.hrda_detail_crop": size, "model.hrda_detail_stride": size // 2}
    cfg = get_preset(PRESETS[model]).with_overrides(
        {"model.pretrained": _initial_backbone(model), "data.batch_size": sizes["batch"],
         **hrda, **overrides})
    cuda = device.type == "cuda"
    torch._dynamo.reset()  # each configuration compiles (or not) from scratch
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    state = build_state(cfg, num_classes=NUM_CLASSES, device=device)
    batches = make_batches(4, sizes["batch"], size, device)
    warmup, steps = sizes["warmup"], sizes["steps"]
    for i in range(warmup):
        run_step(state, batches, cfg, i)
    synchronize(device)
    tic = time.perf_counter()
    for i in range(warmup, warmup + steps):
        run_step(state, batches, cfg, i)
    synchronize(device)
    step_s = (time.perf_counter() - tic) / steps
    out = {"model": model, "config": label, "amp": overrides["train.amp"],
           "compile": overrides["train.compile"], "grad_checkpoint": overrides["train.grad_checkpoint"],
           "images_per_s": 2 * sizes["batch"] / step_s,
           "step_ms": 1000 * step_s,
           **phase_split(state, batches, cfg, device, warmup + steps, sizes["phase_steps"])}
    try:
        with FlopCounterMode(display=False) as counter:
            run_step(state, batches, cfg, warmup + steps + sizes["phase_steps"])
        out["tflop_per_step"] = counter.get_total_flops() / 1e12
        out["model_tflops"] = out["tflop_per_step"] / step_s
    except Exception as err:  # the counter under torch.compile: keep the other numbers
        out["tflop_per_step"] = out["model_tflops"] = None
        out["flop_error"] = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"
    out.update(peak_memory_gib=None, peak_reserved_gib=None, overhead_gib=None)
    if cuda:
        free, total = torch.cuda.mem_get_info(device)
        out.update(peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30,
                   peak_reserved_gib=torch.cuda.max_memory_reserved(device) / 2**30,
                   overhead_gib=(total - free - torch.cuda.memory_reserved(device)) / 2**30)
        need = out["peak_reserved_gib"] + out["overhead_gib"]
        out["fits_gib"] = {str(card): need <= card for card in CARDS_GIB}
    return out


def check(loop_config: dict, device: torch.device) -> None:
    """Everything measured in the worker; writes ``loop_config["result"]`` (a JSON file)."""
    sizes = SIZES[loop_config["sizes"]]
    if device.type == "cuda":
        # Imported here: Ray pickles this script's functions, and cuDNN's module cannot be.
        from torch.backends import cudnn

        cudnn.benchmark = True  # as t2sda.train does on CUDA
    else:
        torch.set_num_threads(1)
    info = device_info(device)
    # sys.__stdout__: under Ray, print's own stdout would show each line twice.
    print(f"gpu_check: device {info['device']}", file=sys.__stdout__, flush=True)
    result = {**info, "launcher": loop_config["launcher"], "group": check_group(device),
              "sizes": sizes, "matmul_bf16_tflops": matmul_tflops(device, sizes["matmul"]),
              "spec_bf16_tflops": spec_peak(info["device"]), "runs": []}
    deadline = time.monotonic() + loop_config["budget_s"]
    for model, label in loop_config["runs"]:
        named = {"model": model, "config": label, "amp": label.split("+")[0]}
        if time.monotonic() > deadline:
            result["runs"].append({**named, "error": "skipped: over budget"})
            continue
        tic = time.monotonic()
        try:
            run = measure(model, label, device, sizes)
        except torch.cuda.OutOfMemoryError:
            run = {**named, "error": "out of memory"}
        except Exception as err:  # one broken configuration must not cost the others' numbers
            first = (str(err).strip().splitlines() or [""])[0][:200]
            run = {**named, "error": f"{type(err).__name__}: {first}"}
        run["wall_s"] = time.monotonic() - tic
        result["runs"].append(run)
        print(f"gpu_check: {model} {label}: "
              + (run.get("error") or f"{run['images_per_s']:.1f} img/s") + f" ({run['wall_s']:.0f} s)",
              file=sys.__stdout__, flush=True)
        # Written after each configuration: a run cut short still leaves what it measured.
        Path(loop_config["result"]).write_text(json.dumps(result, indent=2) + "\n")
        Path(loop_config["result"]).with_suffix(".md").write_text(table(result) + "\n")


def ray_worker(loop_config: dict) -> None:
    import ray.train.torch

    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    check(loop_config, device)


def launch_ray(loop_config: dict, use_gpu: bool) -> None:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    started = not ray.is_initialized()
    if started:  # RAY_ADDRESS, when set, wins (e.g. the test session's cluster); else a fresh one
        # With the dashboard: Ray Train's cleaner needs its state API.
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local")
    try:
        if use_gpu and ray.cluster_resources().get("GPU", 0) < 1:  # else the worker waits unplaced
            raise SystemExit("gpu_check: error: the Ray cluster has no GPU (--launcher torch runs "
                             "without Ray)")
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as storage:
            TorchTrainer(ray_worker, train_loop_config=loop_config,
                         scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=use_gpu),
                         run_config=ray.train.RunConfig(
                             name="gpu_check", storage_path=storage,
                             failure_config=ray.train.FailureConfig(
                                 max_failures=0, controller_failure_limit=0))).fit()
    finally:
        if started:
            ray.shutdown()


def launch_local(loop_config: dict, device: torch.device) -> None:
    import torch.distributed as tdist

    if device.type == "cuda":
        torch.cuda.set_device(device)
    tdist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                             store=tdist.HashStore(), rank=0, world_size=1)
    try:
        check(loop_config, device)
    finally:
        tdist.destroy_process_group()


def table(result: dict) -> str:
    group, sizes = result["group"], result["sizes"]
    spec = result["spec_bf16_tflops"]
    versions = ", ".join(f"{k} {result[k]}" for k in ("torch", "cuda", "cudnn", "nccl") if k in result)
    lines = [f"Device: **{result['device']}**"
             + (f" (capability {result['capability']}, {result['memory_gib']:.0f} GiB)"
                if "capability" in result else "") + f"; {versions}",
             f"Launcher: {result['launcher']}; process group {group['backend']}, world size "
             f"{group['world_size']}, all_reduce {'ok' if group['all_reduce_ok'] else 'WRONG'} "
             f"({group['all_reduce_ms']:.1f} ms); bf16 supported: {result.get('bf16_supported', '–')}",
             f"bf16 matmul {sizes['matmul']}^3: {result['matmul_bf16_tflops']:.1f} TFLOP/s measured"
             + (f", {100 * result['matmul_bf16_tflops'] / spec:.0f} % of the {spec:.0f} TFLOP/s "
                "dense bf16 spec peak" if spec else ", no spec peak known for this device"),
             f"Per step: batch {sizes['batch']} of {sizes['size']}x{sizes['size']} source + target "
             f"crops, {NUM_CLASSES} classes, random init, generated data; {sizes['steps']} timed "
             f"steps after {sizes['warmup']}, split over {sizes['phase_steps']} more; HRDA "
             f"(*_hrda, gta2cs_hrda): {2 * sizes['size']}x{2 * sizes['size']} context crops with "
             f"a {sizes['size']}x{sizes['size']} detail crop.", "",
             "| model | config | images/s | step ms | split step ms | " + " | ".join(PHASES)
             + " | other | pull+rw | peak GiB | TFLOP/step | TFLOP/s | of bf16 matmul | of spec peak |",
             "|---" * (len(PHASES) + 12) + "|"]
    fits = []
    for run in result["runs"]:
        if "error" in run:
            lines.append(f"| {run['model']} | {run.get('config', run['amp'])} | {run['error']} |")
            continue
        phases = " | ".join(f"{run['phases_ms'][p]:.1f}" for p in (*PHASES, "other"))
        peak = f"{run['peak_memory_gib']:.1f}" if run["peak_memory_gib"] is not None else "–"
        flops = run["tflop_per_step"] is not None
        share = f"{100 * run['model_tflops'] / result['matmul_bf16_tflops']:.1f} %" if flops else "–"
        of_spec = f"{100 * run['model_tflops'] / spec:.1f} %" if spec and flops else "–"
        lines.append(f"| {run['model']} | {run['config']} | {run['images_per_s']:.1f} | "
                     f"{run['step_ms']:.1f} | {run['step_ms_phase_timed']:.1f} | {phases} | "
                     f"{100 * run['pull_reweight_share']:.1f} % | {peak} | "
                     + (f"{run['tflop_per_step']:.2f} | {run['model_tflops']:.1f}" if flops else "– | –")
                     + f" | {share} | {of_spec} |")
        if run.get("fits_gib"):
            need = run["peak_reserved_gib"] + run["overhead_gib"]
            fits.append(f"| {run['model']} | {run['config']} | {run['peak_memory_gib']:.2f} | "
                        f"{run['peak_reserved_gib']:.2f} | {run['overhead_gib']:.2f} | {need:.2f} | "
                        + " | ".join("yes" if run["fits_gib"][str(c)] else "no" for c in CARDS_GIB)
                        + " |")
    lines.append("\nstep ms: timed steps without hooks. The phases (ms per step, CUDA events on a "
                 "GPU) split the further steps, whose mean is split step ms; other = split step - "
                 "phases; pull+rw = (pull loss + re-weighting) / split step. TFLOP/s counts "
                 "matmuls and convolutions, forward and backward (torch.utils.flop_counter), over "
                 "step ms.")
    if fits:
        lines += ["", "| model | config | peak allocated GiB | peak reserved GiB | outside allocator "
                  "GiB | needs GiB | " + " | ".join(f"fits {c} GiB" for c in CARDS_GIB) + " |",
                  "|---" * (6 + len(CARDS_GIB)) + "|", *fits,
                  "\nneeds = peak reserved + memory outside the allocator (CUDA context, library "
                  "workspaces), measured on this card; fits = needs <= the card's size."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="toy sizes on the CPU over gloo (tests the script without a GPU)")
    parser.add_argument("--models", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--configs", nargs="+", metavar="CONFIG",
                        help="<none|bf16>[+compile][+ckpt] for each of --models (default: RUNS)")
    parser.add_argument("--launcher", default="auto", choices=("auto", "ray", "torch"),
                        help="ray: a Ray Train worker; torch: this process in a one-process group; "
                        "auto: ray where it is installed")
    parser.add_argument("--budget-s", type=float, default=390,
                        help="no configuration starts after this many seconds of measuring")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "results/gpu_check"))
    args = parser.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: error: no CUDA device visible (on a CPU use --cpu-smoke)", file=sys.stderr)
        return 2
    runs = [run for run in RUNS if run[0] in args.models]
    if args.configs:
        for label in args.configs:
            try:
                parse_config(label)
            except ValueError as err:
                print(f"gpu_check: error: --configs: {err}", file=sys.stderr)
                return 2
        runs = [(model, label) for model in args.models for label in args.configs]
    launcher = args.launcher
    if launcher == "auto":
        launcher = "ray" if importlib.util.find_spec("ray") else "torch"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_check_cpu_smoke" if args.cpu_smoke else "gpu_check"
    loop_config = {"sizes": "cpu_smoke" if args.cpu_smoke else "gpu", "runs": runs,
                   "budget_s": args.budget_s, "result": str((out / f"{stem}.json").resolve()),
                   "launcher": ("Ray Train TorchTrainer, 1 worker" if launcher == "ray" else
                                "torch.distributed, one process (ray not used)")}
    if launcher == "ray":
        launch_ray(loop_config, use_gpu=not args.cpu_smoke)
    else:
        launch_local(loop_config, torch.device("cpu") if args.cpu_smoke else torch.device("cuda", 0))
    result = json.loads(Path(loop_config["result"]).read_text())
    text = table(result)
    print(text)
    (out / f"{stem}.md").write_text(text + "\n")
    failed = [run for run in result["runs"] if "error" in run]
    if failed and len(failed) == len(result["runs"]):
        print(f"gpu_check: error: all {len(failed)} configurations failed (first: "
              f"{failed[0]['model']} {failed[0].get('config', failed[0]['amp'])}: {failed[0]['error']})",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
