"""Export benchmark: fidelity and CPU latency of the exported files against eager PyTorch.

For each model (random init, 19 classes) and size, exports the uint8 -> logits graph of
``t2sda export`` to ONNX (dynamo exporter) and TorchScript (trace), then reports max abs logit
difference and argmax agreement vs eager on a random image, and the median latency of eager
PyTorch, onnxruntime (CPU execution provider) and the TorchScript file over --repeats runs
(batch 1, after one warm-up run), all with --threads intra-op threads.

    .venv/bin/python scripts/bench_export.py --models small_cnn deeplabv2_r101 \\
        --sizes 64x64 256x512 --repeats 5 --threads 1 --out results/bench_export
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from t2sda import model_export
from t2sda.models import MODELS, build_model


def _median_ms(fn, image: torch.Tensor, repeats: int) -> float:
    fn(image)  # warm-up: onnxruntime and TorchScript optimise on the first run
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(image)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def bench(name: str, size: tuple[int, int], *, repeats: int, folder: Path) -> dict:
    module = model_export.Deployable(build_model(name, num_classes=19))
    image = model_export.example_input(module, size, seed=1)
    row = {"model": name, "size": f"{size[0]}x{size[1]}"}

    def eager(x):
        with torch.no_grad():
            return module(x)

    row["eager_ms"] = _median_ms(eager, image, repeats)
    for fmt in model_export.FORMATS:
        path = folder / f"{name}-{row['size']}.{fmt}"
        start = time.perf_counter()
        model_export.export(module, path, fmt=fmt, size=size, dynamic=True)
        row[f"{fmt}_export_s"] = time.perf_counter() - start
        run = model_export.load_runner(path, fmt)
        check = model_export.compare(module, run, image)
        row[f"{fmt}_max_abs_diff"] = check["max_abs_diff"]
        row[f"{fmt}_agreement"] = check["agreement"]
        row[f"{fmt}_ms"] = _median_ms(run, image, repeats)
        print(f"  {name} {row['size']} {fmt}: exported in {row[f'{fmt}_export_s']:.0f} s", flush=True)
    return row


def table(rows: list[dict]) -> str:
    head = ("| model | size | eager ms | onnxruntime ms | torchscript ms | ONNX max abs diff | "
            "ONNX argmax agree | TS max abs diff | TS argmax agree |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['size']} | {r['eager_ms']:.1f} | {r['onnx_ms']:.1f} | "
                     f"{r['torchscript_ms']:.1f} | {r['onnx_max_abs_diff']:.2g} | "
                     f"{100 * r['onnx_agreement']:.3f} % | {r['torchscript_max_abs_diff']:.2g} | "
                     f"{100 * r['torchscript_agreement']:.3f} % |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--sizes", nargs="+", default=["64x64", "256x512"], metavar="HxW")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="results/bench_export")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from t2sda.cli.export import parse_size

    try:
        sizes = [parse_size(s) for s in args.sizes]
        model_export.check_packages("onnx")
    except model_export.ExportError as err:
        parser.error(str(err))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            for size in sizes:
                rows.append(bench(name, size, repeats=args.repeats, folder=Path(folder)))
    import onnxruntime

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "threads": args.threads, "repeats": args.repeats, "batch": 1, "input": "uint8",
            "output": "logits", "machine": platform.processor() or platform.machine()}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    text = table(rows)
    (out / "results.md").write_text(text + "\n")
    print(text)
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")


if __name__ == "__main__":
    main()
