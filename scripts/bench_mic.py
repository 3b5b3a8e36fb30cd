#!/usr/bin/env python
"""MIC on T2S-DA: the default method against the same with MIC's masked image consistency.

    .venv/bin/python scripts/bench_mic.py                           # digits, seeds 0 1 2
    .venv/bin/python scripts/bench_mic.py --presets digits digits_hard
    .venv/bin/python scripts/bench_mic.py --report-only             # table from finished runs

For each preset and seed, ``t2sda`` (the preset) and ``mic`` (the preset with
``method.mic_weight=1``; mask ratio 0.7 and the preset's block, 8 px on digits) resume from one
shared source-only warm-up (MIC acts only after ``method.self_training_start``), so each pair
differs in MIC alone. The runs go through scripts/bench_pull.py's runner (``python -m t2sda
train`` processes, one thread each, ``--jobs`` at a time); finished runs are kept, and runs
recorded in ``<out>/results.json`` are reused when their directories are gone. The score is
the student's target mIoU at the last evaluation; the paired difference is tested with a
two-sided paired t-test over seeds. Writes ``<out>/results.json`` and ``<out>/results.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_pull  # noqa: E402

from t2sda import stats  # noqa: E402

BASELINE, MIC = "t2sda", "mic"
bench_pull.VARIANTS[MIC] = ("+ MIC: masked target, teacher pseudo labels (weight 1, ratio 0.7)",
                            ["method.mic_weight=1"])


def paired(base: list[float], other: list[float]) -> dict:
    """Mean and std of each, the per-seed differences (MIC - T2S-DA), their mean, the 95 % t
    interval and the paired t-test's p (t2sda.stats; None with fewer than two pairs)."""
    diff = [b - a for a, b in zip(base, other, strict=True)]
    out = {"base_mean": statistics.mean(base), "mean": statistics.mean(other),
           "base_std": statistics.stdev(base) if len(base) > 1 else 0.0,
           "std": statistics.stdev(other) if len(other) > 1 else 0.0,
           "diffs": diff, "diff_mean": statistics.mean(diff), "ci95": None, "p": None,
           "verdict": "one seed: no test"}
    if len(diff) > 1:
        d = stats.paired(other, base)
        out.update(ci95=[d.ci_low, d.ci_high], p=d.p_t if d.std > 0 else None,
                   verdict={"better": "MIC better, beyond seed noise",
                            "worse": "MIC worse, beyond seed noise"}.get(
                       stats.verdict(d), "no difference beyond seed noise"))
    return out


def verdict(s: dict) -> str:
    return s["verdict"]


def table(summary: dict) -> str:
    lines = ["| preset | seeds | T2S-DA mIoU | T2S-DA + MIC mIoU | MIC − T2S-DA per seed | mean (95 % CI) | "
             "paired t p | verdict |", "|---" * 8 + "|"]
    for preset, s in summary.items():
        ci = f" ({s['ci95'][0]:+.2f}..{s['ci95'][1]:+.2f})" if s["ci95"] else ""
        p = f"{s['p']:.3f}" if s["p"] is not None else "–"
        lines.append(
            f"| {preset} | {', '.join(map(str, s['seeds']))} | {s['base_mean']:.2f} ± {s['base_std']:.2f} "
            f"({', '.join(f'{v:.1f}' for v in s['base'])}) | {s['mean']:.2f} ± {s['std']:.2f} "
            f"({', '.join(f'{v:.1f}' for v in s['mic'])}) | {', '.join(f'{d:+.2f}' for d in s['diffs'])} | "
            f"{s['diff_mean']:+.2f}{ci} | {p} | {verdict(s)} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["digits"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--out", default="results/bench_mic")
    parser.add_argument("--report-only", action="store_true", help="only runs already finished")
    args = parser.parse_args()
    root = Path(args.out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    # Baselines of all seeds first: the first --jobs runs train different warm-ups at once.
    jobs = [(p, v, s) for p in args.presets for v in (BASELINE, MIC) for s in args.seeds]
    rows = bench_pull.run_jobs(root, jobs, args.set, n_jobs=args.jobs, report_only=args.report_only)
    summary = {}
    for preset in args.presets:
        seeds = [s for s in args.seeds if (preset, BASELINE, s) in rows and (preset, MIC, s) in rows]
        if not seeds:
            continue
        base = [rows[(preset, BASELINE, s)]["mIoU"] for s in seeds]
        mic = [rows[(preset, MIC, s)]["mIoU"] for s in seeds]
        summary[preset] = {"seeds": seeds, "base": base, "mic": mic, **paired(base, mic)}
    text = table(summary)
    walls = {v: [r["adapt_wall_s"] for (_, var, _), r in rows.items() if var == v] for v in (BASELINE, MIC)}
    if all(walls.values()):
        text += ("\n\nWall time of the adaptation phase (after the shared warm-up), median over runs, "
                 f"one thread, {args.jobs} runs at a time on a shared machine: T2S-DA "
                 f"{statistics.median(walls[BASELINE]):.0f} s, + MIC {statistics.median(walls[MIC]):.0f} s.")
    print(text)
    results = [rows[j] for j in jobs if j in rows]
    payload = {"command": " ".join(sys.argv), "presets": args.presets, "seeds": args.seeds,
               "overrides": args.set, "variants": {v: bench_pull.VARIANTS[v] for v in (BASELINE, MIC)},
               "summary": summary, **bench_pull.runs_payload(results)}
    (root / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    (root / "results.md").write_text(text + "\n")
    print(f"wrote {root / 'results.md'}, {root / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
