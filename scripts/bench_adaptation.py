"""Adaptation benchmark on the embedded data: the ablation ladder over several seeds.

    .venv/bin/python scripts/bench_adaptation.py                      # digits, seeds 0 1 2
    .venv/bin/python scripts/bench_adaptation.py --preset digits_hard --seeds 0
    .venv/bin/python scripts/bench_adaptation.py --variants mean_teacher t2sda --set train.iters=600
    .venv/bin/python scripts/bench_adaptation.py --timing-only --timing-steps 10 \
        --set model.name=deeplabv2_r101 data.batch_size=2 data.image_size=128
    .venv/bin/python scripts/bench_adaptation.py --variants style_random fd_init --seeds 0

Each (variant, seed) is one ``python -m t2sda train`` run in its own process (one CPU thread
each, ``--jobs`` at a time). Final target mIoU (student, and the teacher beside it) is read
from each run's metrics.jsonl. Afterwards the step time with and without the pull loss +
re-weighting (and with style translation / the feature distance added) is measured
in-process, alone on the machine. Prints a markdown table and writes ``<out>/results.json``
and ``<out>/results.md`` (``--timing-only``: ``<out>/step_time.json``).

Two variants measure cost, not quality, and are not in the default ladder: ``style_random``
runs ``method.translate=style`` with random weights in the published checkpoint format (the
real style-augmentation files cannot be shipped), ``fd_init`` runs DAFormer's feature distance
toward the seeded initial backbone (the digits model has no ImageNet weights).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# The ablation ladder of docs/METHOD.md: each row adds one T2S-DA piece to the one above.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "source_only": ("source only", ["method.self_training=false", "method.pull_weight=0",
                                    "method.translate=none"]),
    "mean_teacher": ("mean teacher (DAFormer-style)", ["method.pull_weight=0",
                                                       "method.translate=none"]),
    "translation": ("+ target-like translation", ["method.pull_weight=0"]),
    "pull_uniform": ("+ pull loss, uniform weights", ["method.weight_mode=uniform"]),
    "t2sda": ("+ dynamic weights (full T2S-DA)", []),
    "oracle": ("target oracle", ["data.oracle=true", "method.self_training=false",
                                 "method.pull_weight=0", "method.translate=none"]),
    # Cost only ({style} / {init}: files written under the output folder, see cost_files).
    "style_random": ("full T2S-DA, style translation, random weights (cost only)",
                     ["method.translate=style", "method.style_checkpoint={style}"]),
    "fd_init": ("full T2S-DA + feature distance to the initial backbone (cost only)",
                ["method.fd_weight=0.005", "model.pretrained={init}"]),
}
DEFAULT_VARIANTS = ["source_only", "mean_teacher", "translation", "pull_uniform", "t2sda", "oracle"]


def cost_files(root: Path, preset: str, extra: list[str], seed: int = 0) -> dict[str, str]:
    """The files the cost-only variants point at: random style weights in the published format,
    and the preset's backbone at its seeded initialisation (what build_state would create)."""
    import torch

    from t2sda.data.loaders import build_datasets
    from t2sda.method.style import write_random_checkpoint
    from t2sda.models import build_model
    from t2sda.presets import get_preset

    folder = root / "runs" / "cost_files"  # runs/ folders are not committed
    files = {"style": folder / "style_random", "init": folder / f"init_backbone_seed{seed}.pth"}
    if not (files["style"] / "checkpoint_embeddings.pth").exists():
        write_random_checkpoint(files["style"], seed)
    if not files["init"].exists():
        folder.mkdir(parents=True, exist_ok=True)
        cfg = get_preset(preset).with_overrides(extra)
        num_classes = build_datasets(cfg.data, seed=seed).num_classes
        torch.manual_seed(seed)
        model = build_model(cfg.model.name, num_classes=num_classes, pretrained=cfg.model.pretrained)
        torch.save(model.backbone.state_dict(), files["init"])
    return {name: str(path) for name, path in files.items()}


def variant_overrides(variant: str, files: dict[str, str]) -> list[str]:
    return [o.format(**files) for o in VARIANTS[variant][1]]


def run_one(root: Path, preset: str, variant: str, seed: int, extra: list[str],
            files: dict[str, str]) -> dict:
    run_dir = root / "runs" / f"{variant}-seed{seed}"
    metrics_file = run_dir / "metrics.jsonl"
    overrides = [*variant_overrides(variant, files), f"seed={seed}", "train.threads=1", *extra]
    if not metrics_file.exists():  # finished runs are kept: re-running resumes the table
        cmd = [sys.executable, "-m", "t2sda", "train", "--preset", preset, "--run-dir",
               str(run_dir), "--set", *overrides]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"run {variant} seed {seed} failed:\n{proc.stderr[-2000:]}")
        (run_dir / "wall_seconds").write_text(f"{wall:.1f}\n")
    last = json.loads(metrics_file.read_text().splitlines()[-1])
    return {"variant": variant, "seed": seed, "mIoU": last["val/mIoU"],
            "mIoU_teacher": last["val/mIoU_teacher"], "step": last["step"],
            "wall_s": float((run_dir / "wall_seconds").read_text())}


def interleaved_step_ms(preset: str, extra: list[str], steps: int,
                        settings: dict[str, list[str]]) -> dict[str, float]:
    """Median ms per adaptation step, one thread, of each setting (overrides on the preset).

    All settings train side by side on the same batches, alternating blocks of 5 steps, so
    drifting machine load hits them alike; the first 5 steps of each (oneDNN warm-up) are not
    counted.
    """
    import torch

    from t2sda.data.loaders import batch_stream, build_datasets
    from t2sda.presets import get_preset
    from t2sda.state import build_state
    from t2sda.step import train_step

    torch.set_num_threads(1)
    base = get_preset(preset).with_overrides(
        [*extra, "method.self_training_start=0", "method.pull_warmup=0"])
    data = build_datasets(base.data, seed=0)  # the settings change the method only
    runs = {}
    for name, overrides in settings.items():
        cfg = base.with_overrides(overrides)
        state = build_state(cfg, num_classes=data.num_classes, device=torch.device("cpu"))
        runs[name] = (cfg, state, [])
    streams = [batch_stream(d, batch_size=base.data.batch_size, seed=i)
               for i, d in enumerate((data.source, data.target))]
    batches = [(next(streams[0]), next(streams[1])) for _ in range(steps + 5)]
    for start in range(0, len(batches), 5):
        for cfg, state, times in runs.values():
            for i in range(start, min(start + 5, len(batches))):
                (src, src_label), (tgt, _) = batches[i]
                torch.manual_seed(i)
                tic = time.perf_counter()
                train_step(state, src, src_label, tgt, cfg)
                if i >= 5:
                    times.append(time.perf_counter() - tic)
    return {name: 1000 * statistics.median(times) for name, (_, _, times) in runs.items()}


# The pull loss + re-weighting switched off: the baseline of every overhead figure.
WITHOUT_PULL = ["method.pull_weight=0", "method.weight_mode=uniform"]


def step_time(preset: str, extra: list[str], steps: int, files: dict[str, str]) -> dict:
    """ms per adaptation step with and without pull loss + re-weighting, and the full method
    with style translation (random weights) or the feature distance added."""
    out = interleaved_step_ms(preset, extra, steps, {
        "without": WITHOUT_PULL, "with": [], "with_student_keys": ["method.pull_key_net=student"],
        "with_style": variant_overrides("style_random", files),
        "with_fd": variant_overrides("fd_init", files)})
    out["overhead_pct"] = 100 * (out["with"] / out["without"] - 1)
    out["overhead_student_keys_pct"] = 100 * (out["with_student_keys"] / out["without"] - 1)
    out["style_vs_fda_pct"] = 100 * (out["with_style"] / out["with"] - 1)
    out["fd_overhead_pct"] = 100 * (out["with_fd"] / out["with"] - 1)
    return out


def table(results: list[dict], seeds: list[int]) -> tuple[str, dict]:
    lines = ["| variant | " + " | ".join(f"seed {s}" for s in seeds)
             + " | mean ± std | teacher mean | wall s / run |",
             "|---" * (len(seeds) + 4) + "|"]
    summary = {}
    for variant in dict.fromkeys(r["variant"] for r in results):
        rows = {r["seed"]: r for r in results if r["variant"] == variant}
        values = [rows[s]["mIoU"] for s in seeds if s in rows]
        mean = statistics.mean(values)
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        teacher = statistics.mean(rows[s]["mIoU_teacher"] for s in seeds if s in rows)
        wall = statistics.mean(rows[s]["wall_s"] for s in seeds if s in rows)
        summary[variant] = {"mean": mean, "std": std, "teacher_mean": teacher, "wall_s": wall}
        cells = [f"{rows[s]['mIoU']:.1f}" if s in rows else "–" for s in seeds]
        lines.append(f"| {VARIANTS[variant][0]} | " + " | ".join(cells)
                     + f" | **{mean:.1f} ± {std:.1f}** | {teacher:.1f} | {wall:.0f} |")
    return "\n".join(lines), summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="digits")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="overrides applied to every run")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--out", default="results/bench_adaptation")
    parser.add_argument("--timing-steps", type=int, default=40,
                        help="steps timed per setting for the pull-loss overhead (0 = skip)")
    parser.add_argument("--timing-only", action="store_true",
                        help="only the step-time comparison (e.g. for another --set model.name)")
    args = parser.parse_args()
    root = Path(args.out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    files = cost_files(root, args.preset, args.set)
    if args.timing_only:
        load = [os.getloadavg()[0]]
        timing = step_time(args.preset, args.set, args.timing_steps, files)
        payload = {"preset": args.preset, "overrides": args.set, "timing_steps": args.timing_steps,
                   "command": " ".join(sys.argv), "step_time_ms": timing,
                   "load_average_start_end": [*load, os.getloadavg()[0]], "cpus": os.cpu_count()}
        print(json.dumps(payload, indent=2))
        (root / "step_time.json").write_text(json.dumps(payload, indent=2) + "\n")
        return 0
    jobs = [(v, s) for v in args.variants for s in args.seeds]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(lambda job: run_one(root, args.preset, *job, args.set, files), jobs))
    text, summary = table(results, args.seeds)
    timing = step_time(args.preset, args.set, args.timing_steps, files) if args.timing_steps else None
    if timing:
        text += (f"\n\nStep time (1 thread, adaptation phase, median of {args.timing_steps}): "
                 f"{timing['without']:.0f} ms without pull loss + re-weighting, "
                 f"{timing['with']:.0f} ms with (+{timing['overhead_pct']:.1f} %), "
                 f"{timing['with_student_keys']:.0f} ms with keys from the student's own source "
                 f"pass (`method.pull_key_net=student`, +{timing['overhead_student_keys_pct']:.1f} %); "
                 f"full T2S-DA with style translation (random weights, cost only) "
                 f"{timing['with_style']:.0f} ms ({timing['style_vs_fda_pct']:+.1f} % vs FDA), with "
                 f"the feature distance {timing['with_fd']:.0f} ms ({timing['fd_overhead_pct']:+.1f} %).")
    print(text)
    payload = {"preset": args.preset, "seeds": args.seeds, "overrides": args.set,
               "runs": results, "summary": summary, "step_time_ms": timing}
    (root / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    (root / "results.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
