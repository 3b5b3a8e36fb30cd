"""Cost of the target-like translations (method.translate) per training batch.

    .venv/bin/python scripts/bench_translate.py                       # CPU, 1 thread, 512², batch 2
    .venv/bin/python scripts/bench_translate.py --device cuda --repeats 20

Times ``translate()`` on random images for fda, color (Lab), style and style at half
resolution (``method.style_downsample=2``). The style network has random weights of the
published shapes: the time is what the real checkpoint costs, the images mean nothing. On CUDA
the style network runs in bf16 (as in training) and each timing is synchronised. Prints a
markdown table and writes ``<out>/results.json`` and ``<out>/results.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from t2sda.method.style import StyleRandomizer
from t2sda.method.translate import translate

VARIANTS = {  # name -> (translate mode, style downsample)
    "fda": ("fda", 1),
    "color": ("color", 1),
    "style": ("style", 1),
    "style_downsample2": ("style", 2),
}


def time_variant(mode: str, downsample: int, src: torch.Tensor, ref: torch.Tensor,
                 repeats: int) -> list[float]:
    style = StyleRandomizer(downsample=downsample).to(src.device) if mode == "style" else None
    sync = torch.cuda.synchronize if src.is_cuda else (lambda: None)
    times = []
    for i in range(repeats + 1):  # the first call warms up (oneDNN / cuDNN plans)
        sync()
        tic = time.perf_counter()
        out = translate(src, ref, mode=mode, fda_beta=0.01, color_space="lab", style=style)
        sync()
        if i:
            times.append(time.perf_counter() - tic)
        assert out.shape == src.shape
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", default="results/bench_translate")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--device {args.device}: CUDA is not available here", file=sys.stderr)
        return 2
    if min(args.size, args.batch, args.repeats, args.threads) < 1:
        print("--size, --batch, --repeats and --threads must be >= 1", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    src = torch.rand(args.batch, 3, args.size, args.size, device=device)
    ref = torch.rand(args.batch, 3, args.size, args.size, device=device)
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows = {}
    for name in args.variants:
        mode, downsample = VARIANTS[name]
        times = time_variant(mode, downsample, src, ref, args.repeats)
        rows[name] = {"median_ms": 1000 * statistics.median(times), "min_ms": 1000 * min(times),
                      "max_ms": 1000 * max(times), "repeats": len(times)}
        print(f"{name}: {rows[name]['median_ms']:.1f} ms", file=sys.stderr, flush=True)
    load = [load_start, os.getloadavg()[0]] if load_start is not None else None
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                  f"{args.threads} torch thread(s)"
                  + (f", load average {load[0]:.0f} -> {load[1]:.0f}" if load else ""))
    lines = [f"Translation cost per batch of {args.batch} x {args.size}² on {where} "
             f"(median of {args.repeats}; style with random weights):", "",
             "| method.translate | median ms | min ms | max ms |", "|---|---|---|---|"]
    lines += [f"| {name} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | {r['max_ms']:.1f} |"
              for name, r in rows.items()]
    text = "\n".join(lines)
    print(text)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    payload = {"device": where, "torch": torch.__version__, "batch": args.batch, "size": args.size,
               "threads": args.threads, "load_average_start_end": load,
               "command": " ".join(sys.argv), "results": rows}
    (root / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    (root / "results.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
