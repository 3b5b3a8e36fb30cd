#!/usr/bin/env python
"""Optuna (TPE) + ASHA against random search, and random + ASHA, with the same trial budget.

Each search is a real ``tune.py`` run (its own local Ray) on the same base config. Reported
per search: the best val mIoU found (best-so-far, as the searcher saw it), the compute spent
(training steps: the shared warm-up once plus each trial's own steps; ASHA stops weak trials
early, so it spends fewer) and the wall time; and the anytime curve, best-found mIoU against
steps spent, read from every trial's reports in time order. The goal checked: Optuna + ASHA
gets within 1 mIoU of random search's best at no more than 1/3 of random's compute.
Writes ``<out>/results.json``, ``results.md`` and ``search_curves.png``; a finished search is
reused (``<out>/runs/<method>-seed<S>/bench.json``).

    python scripts/bench_search.py                         # digits, 2 seeds, 12 trials each
    python scripts/bench_search.py --seeds 0 --num-samples 6 --methods optuna+asha random
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
# searches fit on two cores (12 trials: see results/bench_search/results.md).
DEFAULT_SET = ["train.iters=600", "method.self_training_start=300", "train.eval_every=100",
               "train.checkpoint_every=100", "method.pull_warmup=50", "method.weight_warmup=150"]
METHODS = {  # name -> tune.py flags
    "optuna+asha": ["--sampler", "tpe", "--scheduler", "asha"],
    "random+asha": ["--sampler", "random", "--scheduler", "asha"],
    "random": ["--sampler", "random", "--scheduler", "none"],
}
METRIC = "val/best_mIoU"
GOAL_GAP, GOAL_SHARE = 1.0, 1 / 3  # within 1 mIoU of random's best, at <= 1/3 of its steps


def anytime_curve(exp: Path) -> list[tuple[int, float]]:
    """(steps spent, best-so-far metric) after every trial report, in time order.

    Steps spent = the shared warm-up's steps (once, when the search had one) + for each trial
    its last reported step minus the step it started at."""
    warm = exp / "warmup.json"
    start = json.loads(warm.read_text())["step"] if warm.exists() else 0
    events = []
    for path in sorted(exp.glob("trial-*/result.json")):
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash
            if "step" in row:
                events.append((row.get("timestamp", 0), row.get("time_total_s", 0), path.parent.name,
                               int(row["step"]), row.get(METRIC)))
    events.sort()
    latest: dict[str, int] = {}
    curve, best, spent = [], None, start
    for _, _, trial, step, value in events:
        spent += max(step - latest.get(trial, start), 0)
        latest[trial] = max(latest.get(trial, start), step)
        if isinstance(value, (int, float)) and value == value:
            best = value if best is None else max(best, value)
        if best is not None:
            curve.append((spent, best))
    return curve


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((steps for steps, best in curve if best >= target), None)


def run_search(method: str, seed: int, args) -> dict:
    name = f"{method.replace('+', '_')}-seed{seed}"
    exp = args.out / "runs" / name
    summary = exp / "bench.json"
    if summary.exists():  # finished earlier: reuse
        return json.loads(summary.read_text())
    cmd = [sys.executable, "tune.py", "--space", args.space, "--preset", args.preset,
           "--num-samples", str(args.num_samples), "--max-concurrent", str(args.max_concurrent),
           "--seed", str(seed), "--storage", str(args.out / "runs"), "--name", name,
           "--confirm", "0",  # searches compared as searches: no confirmation runs in the timings
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
    curve = anytime_curve(exp)
    result = {"method": method, "seed": seed, "trials": len(rows),
              "best": max(values) if values else None,
              "steps": curve[-1][0] if curve else sum(int(r["steps"] or 0) for r in rows),
              "wall_s": wall, "errored": sum(r["status"] == "ERROR" for r in rows),
              "curve": curve}
    summary.write_text(json.dumps(result, indent=2) + "\n")
    return result


def goal(results: list[dict]) -> list[dict]:
    """Per seed and method: steps to get within GOAL_GAP of that seed's random best, and
    whether that is at most GOAL_SHARE of random's steps."""
    out = []
    for r in results:
        rand = next((x for x in results if x["method"] == "random" and x["seed"] == r["seed"]), None)
        if r["method"] == "random" or rand is None or rand["best"] is None:
            continue
        steps = steps_to_reach([tuple(p) for p in r["curve"]], rand["best"] - GOAL_GAP)
        out.append({"method": r["method"], "seed": r["seed"], "random_best": rand["best"],
                    "random_steps": rand["steps"], "steps_to_within": steps,
                    "share": None if steps is None else steps / rand["steps"],
                    "met": steps is not None and steps <= GOAL_SHARE * rand["steps"]})
    return out


def table(results: list[dict], goals: list[dict]) -> str:
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
    if goals:
        lines += ["", f"Goal: within {GOAL_GAP:g} mIoU of random search's best at <= 1/3 of its "
                  "steps.", "", "| method | seed | random best | steps to within 1 | "
                  "share of random's steps | met |", "|---|---|---|---|---|---|"]
        for g in goals:
            share = f"{g['share']:.2f}" if g["share"] is not None else "never"
            steps = g["steps_to_within"] if g["steps_to_within"] is not None else "-"
            lines.append(f"| {g['method']} | {g['seed']} | {g['random_best']:.2f} | {steps} | "
                         f"{share} | {'yes' if g['met'] else 'no'} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = dict(zip(METHODS, ("tab:blue", "tab:orange", "tab:grey"), strict=True))
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in results:
        if r["curve"]:
            steps, best = zip(*r["curve"], strict=True)
            ax.step(steps, best, where="post", color=colours[r["method"]],
                    ls=("-", "--", ":")[r["seed"] % 3], label=f"{r['method']} seed {r['seed']}")
    for r in results:
        if r["method"] == "random" and r["best"] is not None:
            ax.axvline(GOAL_SHARE * r["steps"], color="grey", lw=0.8, alpha=0.5)
    ax.set_xlabel("training steps spent (shared warm-up once + every trial's own)")
    ax.set_ylabel(f"best {METRIC} found so far")
    ax.set_title("search: best found against compute (grey lines: 1/3 of random's steps)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--space", default="pull_loss")
    p.add_argument("--preset", default="digits")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--num-samples", type=int, default=12)
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
    goals = goal(results)
    text = table(results, goals)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(results, args.out / "search_curves.png")
    meta = {"space": args.space, "preset": args.preset, "num_samples": args.num_samples,
            "max_concurrent": args.max_concurrent, "grace_period": args.grace_period,
            "set": DEFAULT_SET + args.set, "goal": goals, "results": results}
    (args.out / "results.json").write_text(json.dumps(meta, indent=2) + "\n")
    command = "python scripts/bench_search.py " + " ".join(sys.argv[1:])
    (args.out / "results.md").write_text(
        f"# bench_search: {args.space} on {args.preset}, {args.num_samples} trials, "
        f"{args.max_concurrent} at a time\n\n`{command.strip()}`\n\n{text}\n")
    print(f"wrote {args.out / 'results.md'}, results.json, search_curves.png")


if __name__ == "__main__":
    main()
