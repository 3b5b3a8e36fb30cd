#!/usr/bin/env python
"""HRDA on T2S-DA: the plain model against the same with HRDA's multi-resolution training.

    .venv/bin/python scripts/bench_hrda.py                         # digits at 128 px, seeds 0 1 2
    .venv/bin/python scripts/bench_hrda.py --presets digits digits_hard --seeds 0 1 2 3 4
    .venv/bin/python scripts/bench_hrda.py --report-only           # table from finished runs

At the embedded 64 px HRDA cannot help (the whole image already fits at full resolution; see
docs/METHOD.md), so the runs default to ``data.image_size=128``, where a context at
``model.hrda_context_scale`` 0.5 sees the digits at the 64 px the plain preset trains on and a
64 px detail crop (``model.hrda_detail_crop=64``, sliding detail windows at stride 32 for the
pseudo labels and evaluation) sees them at full resolution. HRDA changes the network (the scale
attention) from step 0, so no warm-up is shared: every run is a full ``python -m t2sda train``
process from scratch, one thread each, ``--jobs`` at a time; both variants of a seed get the same
seed. A third variant, ``plain64``, trains the plain model on the same scenes rendered at 64 px
(scored on the 64 px renders of the same val scenes): the resolution HRDA's context sees, i.e.
what HRDA's detail branch has to add to. ``--set`` changes all of them (default: half the
preset's length, to fit a 2-core machine).

Per run: the student's target mIoU at the last evaluation, its wall time and the process's peak
resident memory; for HRDA runs also the fused, context-only and detail-only mIoU of the final
student and its mean scale attention. Per preset: mean ± std of each variant, and for HRDA
against each other variant the per-seed differences, their mean with a 95 % t interval and the
paired t-test's p (``t2sda.stats``). Writes
``<out>/results.json``, ``<out>/results.md`` and ``<out>/curves.png``. Finished runs (a
``result.json`` in their directory) are read back, not trained again.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from t2sda import stats

VARIANTS = {"plain": ("the preset's model at full resolution", []),
            "hrda": ("+ HRDA: context 0.5, 64 px detail crop, class-wise scale attention",
                     ["model.hrda=true", "model.hrda_detail_crop=64"]),
            "plain64": ("the preset's model on the scenes rendered at 64 px, the size of HRDA's context",
                        ["data.image_size=64"])}
COLOURS = {"plain": "tab:blue", "hrda": "tab:orange", "plain64": "tab:green"}
COMPARISONS = (("hrda", "plain"), ("hrda", "plain64"))  # (variant, against)
DEFAULT_SET = ["data.image_size=128", "train.iters=600", "method.self_training_start=300",
               "train.eval_every=150", "train.checkpoint_every=600"]


class Runner:
    """Full training runs in subprocesses, with a progress line (rate, ETA) per finished run;
    a run with a ``result.json`` is read back, not trained."""

    def __init__(self, root: Path, overrides: list[str]):
        self.root, self.overrides, self.total = root, overrides, 0
        self.done, self.start, self.guard = 0, time.perf_counter(), threading.Lock()

    def result(self, preset: str, variant: str, seed: int) -> Path:
        return self.root / "runs" / preset / f"{variant}-seed{seed}" / "result.json"

    def run(self, preset: str, variant: str, seed: int) -> dict:
        result = self.result(preset, variant, seed)
        run_dir = result.parent
        if result.exists():
            return json.loads(result.read_text())
        cmd = [sys.executable, "-m", "t2sda", "train", "--preset", preset, "--run-dir", str(run_dir),
               "--set", *self.overrides, *VARIANTS[variant][1], f"seed={seed}", "train.threads=1"]
        tic = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        err = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise SystemExit(f"run {preset} {variant} seed {seed} failed (exit {proc.returncode}):\n"
                             f"{err[-2000:]}")
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in rows if "val/mIoU" in r]
        result.write_text(json.dumps({
            "preset": preset, "variant": variant, "seed": seed, "mIoU": evals[-1]["val/mIoU"],
            "mIoU_teacher": evals[-1]["val/mIoU_teacher"], "step": evals[-1]["step"],
            "wall_s": round(time.perf_counter() - tic, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024),
            "curve": [(r["step"], r["val/mIoU"]) for r in evals]}) + "\n")
        row = json.loads(result.read_text())
        with self.guard:  # the rate and ETA count only the runs trained by this call
            self.done += 1
            elapsed = time.perf_counter() - self.start
            eta = elapsed / self.done * (self.total - self.done)
            print(f"[{self.done}/{self.total}] {preset} {variant} seed {seed}: mIoU {row['mIoU']:.2f} "
                  f"({row['wall_s']:.0f} s; {elapsed / 60:.1f} min elapsed, ETA {eta / 60:.1f} min)",
                  flush=True)
        return row


def compare(base: list[float], other: list[float], name: str = "the variant") -> dict:
    """Each side's mean and std, the per-seed differences other - base and, with two or more
    seeds, their 95 % interval, the paired t p-value and the verdict of t2sda.stats."""
    out = {"diffs": [o - b for b, o in zip(base, other, strict=True)], "ci95": None, "p": None,
           "verdict": "one seed: no test"}
    for side, values in (("base", base), ("other", other)):
        out[f"{side}_mean"] = statistics.mean(values)
        out[f"{side}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    out["diff_mean"] = statistics.mean(out["diffs"])
    if len(base) > 1:
        d = stats.paired(other, base)
        words = {"better": f"{name} better, beyond seed noise", "worse": f"{name} worse, beyond seed noise"}
        out.update(ci95=[d.ci_low, d.ci_high], p=d.p_t if d.std > 0 else None,
                   verdict=words.get(stats.verdict(d), "no difference beyond seed noise"))
    return out


def branches(run_dir: Path) -> dict:
    """What each part of a trained HRDA student scores on the target val set (mIoU): the fused
    prediction, the context prediction alone, the sliding detail windows alone, and the mean
    scale attention (the detail's weight) over the val images."""
    import torch

    from t2sda.data.loaders import digits_val, eval_loader
    from t2sda.inference import load_trained
    from t2sda.models.hrda import downscale
    from t2sda.scoring import classes_at, confusion_matrix, iou_from_confusion

    trained = load_trained(run_dir=run_dir, which="latest")
    model, n = trained.models["student"], len(trained.class_names)
    parts = {"fused": lambda x: model(x)[0], "context": lambda x: model(x, context_only=True)[0],
             "detail": model.detail_logits}
    confs = {k: torch.zeros(n, n, dtype=torch.long) for k in parts}
    attention = []
    with torch.no_grad():
        for image, label in eval_loader(digits_val(trained.config.data), batch_size=64):
            for k, fn in parts.items():
                confs[k] += confusion_matrix(classes_at(fn(image), label.shape[-2:]), label, n)
            features = model.base.encode(downscale(image, model.context_scale))
            att = model.base.apply_head(model.scale_attention, features)
            attention.append(torch.sigmoid(att[0] if isinstance(att, tuple) else att).mean().item())
    out = {k: 100 * iou_from_confusion(c)[1].item() for k, c in confs.items()}
    return {**out, "attention": statistics.mean(attention)}


def table(summary: dict, rows: dict) -> str:
    lines = ["| preset | variant | seeds | mIoU mean ± std | per seed | median wall s | "
             "median peak RSS MiB |", "|---" * 7 + "|"]
    for preset, s in summary.items():
        for v, values in s["values"].items():
            mine = [rows[(preset, v, seed)] for seed in s["seeds"]]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            lines.append(f"| {preset} | {v} | {', '.join(map(str, s['seeds']))} | "
                         f"{statistics.mean(values):.2f} ± {std:.2f} | "
                         f"{', '.join(f'{x:.2f}' for x in values)} | "
                         f"{statistics.median(r['wall_s'] for r in mine):.0f} | "
                         f"{statistics.median(r['peak_rss_mib'] for r in mine):.0f} |")
    lines += ["", "| preset | difference | per seed | mean (95 % CI) | paired t p | verdict |",
              "|---" * 6 + "|"]
    for preset, s in summary.items():
        for key, c in s["comparisons"].items():
            ci = f" ({c['ci95'][0]:+.2f}..{c['ci95'][1]:+.2f})" if c["ci95"] else ""
            p = f"{c['p']:.3f}" if c["p"] is not None else "–"
            lines.append(f"| {preset} | {key} | {', '.join(f'{d:+.2f}' for d in c['diffs'])} | "
                         f"{c['diff_mean']:+.2f}{ci} | {p} | {c['verdict']} |")
    parts = [(key, r) for key, r in sorted(rows.items()) if "branches" in r]
    if parts:
        lines += ["", "HRDA's student, part by part (target val mIoU; attention: the detail's mean weight):",
                  "", "| preset | seed | fused | context alone | detail windows alone | attention |",
                  "|---" * 6 + "|"]
        lines += [f"| {p} | {seed} | {r['branches']['fused']:.2f} | {r['branches']['context']:.2f} | "
                  f"{r['branches']['detail']:.2f} | {r['branches']['attention']:.2f} |"
                  for (p, _, seed), r in parts]
    return "\n".join(lines)


def plot(rows: dict, presets: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(presets), figsize=(5.5 * len(presets), 4), squeeze=False)
    for ax, preset in zip(axes[0], presets, strict=True):
        for (p, v, seed), r in sorted(rows.items()):
            if p == preset:
                steps, miou = zip(*r["curve"], strict=True)
                ax.plot(steps, miou, color=COLOURS[v], alpha=0.8,
                        label=f"{v}" if seed == min(s for (q, w, s) in rows if q == p and w == v) else None)
        ax.set(title=f"{preset}: student target mIoU (each line one seed)", xlabel="step", ylabel="mIoU")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["digits"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", nargs="+", default=DEFAULT_SET, metavar="KEY=VALUE",
                        help=f"overrides for both variants (default: {' '.join(DEFAULT_SET)})")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--out", default="results/bench_hrda")
    parser.add_argument("--report-only", action="store_true", help="only runs already finished")
    args = parser.parse_args()
    root = Path(args.out).resolve()
    jobs = [(p, v, s) for p in args.presets for s in args.seeds for v in VARIANTS]
    runner = Runner(root, args.set)
    recorded = [j for j in jobs if runner.result(*j).exists()]
    if args.report_only:
        jobs = recorded
    runner.total = len(jobs) - len(recorded)
    print(f"{runner.total} runs to train ({len(recorded)} finished), {args.jobs} at a time, "
          f"--set {' '.join(args.set)}", flush=True)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = dict(zip(jobs, pool.map(lambda job: runner.run(*job), jobs), strict=True))
    for (preset, variant, seed), row in rows.items():
        if variant == "hrda" and "branches" not in row:
            result = root / "runs" / preset / f"hrda-seed{seed}" / "result.json"
            row["branches"] = branches(result.parent)
            result.write_text(json.dumps(row) + "\n")
    summary = {}
    for preset in args.presets:
        seeds = [s for s in args.seeds if all((preset, v, s) in rows for v in VARIANTS)]
        if seeds:
            values = {v: [rows[(preset, v, s)]["mIoU"] for s in seeds] for v in VARIANTS}
            summary[preset] = {"seeds": seeds, "values": values, "comparisons": {
                f"{v} − {base}": compare(values[base], values[v], v) for v, base in COMPARISONS}}
    text = table(summary, rows)
    print(text)
    root.mkdir(parents=True, exist_ok=True)
    payload = {"command": " ".join(["scripts/bench_hrda.py", *sys.argv[1:]]), "overrides": args.set,
               "variants": VARIANTS, "summary": summary, "runs": list(rows.values())}
    (root / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    (root / "results.md").write_text(text + "\n")
    if rows:
        plot(rows, [p for p in args.presets if p in summary], root / "curves.png")
    print(f"wrote {root / 'results.md'}, {root / 'results.json'}, {root / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
