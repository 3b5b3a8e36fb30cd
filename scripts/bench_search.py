#!/usr/bin/env python
"""Optuna (TPE) + ASHA against random search with the same trial budget, over seeds.

Each search is a real ``tune.py`` run (its own local Ray) on the same base config. Reported
per search: the best val mIoU found (best-so-far, as the searcher saw it), the compute spent
(training steps summed over trials; ASHA stops weak trials early, so it spends fewer) and the
wall time. Writes ``<out>/results.json`` and ``results.md``; a finished search is reused.

    python scripts/bench_search.py                         # digits, 2 seeds, 4 trials each
    python scripts/bench_search.py --seeds 0 1 2 --num-samples 8 --set train.iters=1200
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A shorter digits schedule (same shape: half source-only warm-up, then adaptation) so the
# four searches fit in about half an hour on two cores.
DEFAULT_SET = ["train.iters=600", "method.self_training_start=300", "train.eval_every=100",
               "train.checkpoint_every=100", "method.pull_warmup=50", "method.weight_warmup=150"]
METHODS = {  # name -> tune.py flags
    "optuna+asha": ["--sampler", "tpe", "--scheduler", "asha"],
    "random": ["--sampler", "random", "--scheduler", "none"],
}


def run_search(method: str, seed: int, args) -> dict:
    name = f"{method.replace('+', '_')}-seed{seed}"
    exp = args.out / "runs" / name
    summary = exp / "bench.json"
    if summary.exists():  # finished earlier: reuse
        return json.loads(summary.read_text())
    cmd = [sys.executable, "tune.py", "--space", args.space, "--preset", args.preset,
           "--num-samples", str(args.num_samples), "--max-concurrent", str(args.max_concurrent),
           "--seed", str(seed), "--storage", str(args.out / "runs"), "--name", name,
           *(["--grace-period", str(args.grace_period)] if args.grace_period else []),
           *METHODS[method],
           "--set", *DEFAULT_SET, *args.set]
    env = dict(os.environ, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"))
    env.pop("RAY_ADDRESS", None)  # each search gets its own local Ray, same conditions
    tic = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.monotonic() - tic
    if proc.returncode not in (0, 1):
        sys.exit(f"bench_search: {name} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    with (exp / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    values = [float(r["value"]) for r in rows if r["value"] and r["status"] != "ERROR"]
    result = {"method": method, "seed": seed, "trials": len(rows),
              "best": max(values) if values else None,
              "steps": sum(int(r["steps"] or 0) for r in rows), "wall_s": wall,
              "errored": sum(r["status"] == "ERROR" for r in rows)}
    summary.write_text(json.dumps(result, indent=2) + "\n")
    return result


def table(results: list[dict]) -> str:
    lines = ["| method | seed | trials | best val mIoU | steps spent | wall (s) |",
             "|---|---|---|---|---|---|"]
    for r in results:
        best = f"{r['best']:.2f}" if r["best"] is not None else "-"
        lines.append(f"| {r['method']} | {r['seed']} | {r['trials']} | {best} | {r['steps']} | "
                     f"{r['wall_s']:.0f} |")
    for method in METHODS:
        mine = [r for r in results if r["method"] == method and r["best"] is not None]
        if mine:
            bests = [r["best"] for r in mine]
            spread = f" ± {statistics.stdev(bests):.2f}" if len(bests) > 1 else ""
            lines.append(f"| **{method}** | mean | | {statistics.mean(bests):.2f}{spread} | "
                         f"{statistics.mean(r['steps'] for r in mine):.0f} | "
                         f"{statistics.mean(r['wall_s'] for r in mine):.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--space", default="pull_loss")
    p.add_argument("--preset", default="digits")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--max-concurrent", type=int, default=2)
    p.add_argument("--grace-period", type=int, help="ASHA first rung in steps (default: tune.py's "
                   "rule, the first evaluation after adaptation starts)")
    p.add_argument("--methods", nargs="+", choices=tuple(METHODS), default=list(METHODS))
    p.add_argument("--set", nargs="+", default=[], help="extra base-config overrides")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "bench_search")
    args = p.parse_args()
    args.out = args.out.resolve()
    results = []
    for seed in args.seeds:
        for method in args.methods:
            results.append(run_search(method, seed, args))
            print(f"{method} seed {seed}: best {results[-1]['best']}, {results[-1]['steps']} "
                  f"steps, {results[-1]['wall_s']:.0f} s", flush=True)
    text = table(results)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"space": args.space, "preset": args.preset, "num_samples": args.num_samples,
            "max_concurrent": args.max_concurrent, "grace_period": args.grace_period,
            "set": DEFAULT_SET + args.set, "results": results}
    (args.out / "results.json").write_text(json.dumps(meta, indent=2) + "\n")
    (args.out / "results.md").write_text(
        f"# bench_search: {args.space} on {args.preset}, {args.num_samples} trials, "
        f"{args.max_concurrent} at a time\n\n`python scripts/bench_search.py`\n\n{text}\n")


if __name__ == "__main__":
    main()
