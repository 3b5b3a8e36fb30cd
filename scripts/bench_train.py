#!/usr/bin/env python
"""Training throughput in-process vs through Ray Train (1 and 2 workers), and 2-worker quality.

    .venv/bin/python scripts/bench_train.py                          # digits, 300 steps, 3 modes
    .venv/bin/python scripts/bench_train.py --steps 600 --repeats 3 --modes in_process ray_1
    .venv/bin/python scripts/bench_train.py --quality --seeds 0 1 2  # 1 x b32 vs 2 x b16, 1200 it

Speed (default). Each mode is one ``python -m t2sda train --workers N`` command in its own
process, one after another, with ``train.threads=1`` and the same per-process batch
(``data.batch_size`` of the preset): (a) ``in_process`` (``--workers 0``), (b) ``ray_1`` (one
Ray Train worker: the same work in one process, plus Ray around it), (c) ``ray_2`` (two workers
under DDP, each with the full per-process batch, so the global batch doubles). Each Ray mode
starts its own local Ray cluster (``RAY_ADDRESS=local``), as a fresh ``python -m t2sda train
--workers N`` on a machine without a cluster does.

- steps/s and images/s are the ``perf/`` metrics of the run's last metrics.jsonl row: the mean
  over all training steps of data + step time, evaluation and checkpoints excluded. steps/s is
  per worker; images/s is global (source + target images of every worker).
- Evaluation, checkpoints and logs happen once, after the last step (``train.eval_every``,
  ``checkpoint_every`` and ``log_every`` are set to the step count), so nothing interrupts the
  timed loop. The preset's source-only warm-up is scaled to the step count
  (``method.self_training_start`` x steps / preset iters), so the run keeps the preset's mix of
  warm-up and adaptation steps.
- start-up s = (time the metrics row is written - launch of the command) - loop time, with
  loop time = steps / (steps/s). It holds interpreter and import time, data generation, model
  building, Ray's cluster and worker-group start, and the one final evaluation before the row is
  written (a second or less on digits; split across workers in ``ray_2``). wall s is the whole
  command, checkpoint and shutdown included.
- ``--repeats R`` runs the modes R times, interleaved (a b c a b c ...), and reports the median.
  The target of the Ray Train issue: ``ray_1`` keeps >= 90 % of ``in_process`` steps/s.

Quality (``--quality``): full preset runs through Ray Train, 1 worker x batch 32 against
2 workers x batch 16 (the same global batch, so the same lr: ``optim.lr_scaling=none``), per
seed; mean ± std final val/mIoU of each and the difference. For the claim "2 workers on CPU
reach the same final digits mIoU as 1 worker within seed noise".

Run dirs live under ``<out>/runs`` and finished ones are reused (delete them to measure again),
so either mode can be run in pieces; an interrupted quality run resumes from its checkpoint
(its wall s then counts the last piece only), an interrupted speed run starts again. Writes
``<out>/<preset>.json`` and ``.md`` (quality: ``<preset>_quality.*``) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = {"in_process": ("in-process", 0), "ray_1": ("Ray Train, 1 worker", 1),
         "ray_2": ("Ray Train, 2 workers", 2)}
TARGET = 0.90  # ray_1 steps/s over in_process steps/s, the bar
QUALITY = {"1x32": (1, 32), "2x16": (2, 16)}  # name -> (workers, per-worker batch)


def last_row(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])


def launch(run_dir: Path, preset: str, workers: int, overrides: list[str], *, restart: bool) -> dict:
    """Run ``python -m t2sda train`` into ``run_dir`` unless a finished run with the same command
    is there; returns its record (command, launch / metrics-row / exit times). An interrupted
    run is started afresh with ``restart`` (resuming would skew its times), else resumed."""
    cmd = ["-m", "t2sda", "train", "--preset", preset, "--run-dir", str(run_dir), "--workers",
           str(workers), "--set", *overrides]
    record_file = run_dir / "bench.json"
    if record_file.exists():  # finished earlier: reuse
        record = json.loads(record_file.read_text())
        if record["cmd"] != cmd:
            sys.exit(f"bench_train: {run_dir} holds a run with other settings; delete it or "
                     "choose another --out")
        return record
    if restart:
        shutil.rmtree(run_dir, ignore_errors=True)
    env = dict(os.environ, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"),
               RAY_ADDRESS="local")  # a fresh local cluster per run, never a running one
    start = time.time()
    proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, env=env)
    end = time.time()
    if proc.returncode != 0:
        sys.exit(f"bench_train: {run_dir.name} failed (exit {proc.returncode}):\n"
                 f"{proc.stderr[-2000:]}")
    record = {"cmd": cmd, "launch": start, "row_written": (run_dir / "metrics.jsonl").stat().st_mtime,
              "end": end}
    record_file.write_text(json.dumps(record, indent=2) + "\n")
    return record


def speed_overrides(preset: str, steps: int, extra: list[str]) -> list[str]:
    from t2sda.presets import get_preset

    cfg = get_preset(preset)
    start = round(cfg.method.self_training_start * steps / cfg.train.iters) if cfg.train.iters else 0
    # Ours last but the preset scaling first: --set may change anything but the one-evaluation
    # layout the start-up time is defined on.
    return [f"method.self_training_start={start}", "train.threads=1", *extra,
            f"train.iters={steps}", f"train.eval_every={steps}", f"train.checkpoint_every={steps}",
            f"train.log_every={steps}"]


def measure(root: Path, preset: str, mode: str, repeat: int, overrides: list[str]) -> dict:
    workers = MODES[mode][1]
    run_dir = root / "runs" / f"{preset}-{mode}-r{repeat}"
    record = launch(run_dir, preset, workers, overrides, restart=True)
    last = last_row(run_dir)
    loop = last["step"] / last["perf/steps_per_s"]
    return {"mode": mode, "workers": workers, "repeat": repeat, "steps": last["step"],
            "steps_per_s": last["perf/steps_per_s"], "images_per_s": last["perf/images_per_s"],
            "loop_s": loop, "startup_s": record["row_written"] - record["launch"] - loop,
            "wall_s": record["end"] - record["launch"]}


def speed_table(runs: list[dict]) -> tuple[str, dict]:
    summary = {}
    for mode in dict.fromkeys(r["mode"] for r in runs):
        rows = [r for r in runs if r["mode"] == mode]
        summary[mode] = {key: statistics.median(r[key] for r in rows)
                         for key in ("steps_per_s", "images_per_s", "startup_s", "wall_s")}
        summary[mode].update(workers=rows[0]["workers"], repeats=len(rows))
    base = summary.get("in_process", {}).get("steps_per_s")
    lines = ["| mode | workers | steps/s (per worker) | images/s (global) | steps/s vs in-process "
             "| start-up s | wall s |", "|---|---|---|---|---|---|---|"]
    for mode, s in summary.items():
        ratio = f"{100 * s['steps_per_s'] / base:.1f} %" if base else "–"
        lines.append(f"| {MODES[mode][0]} | {s['workers']} | {s['steps_per_s']:.2f} | "
                     f"{s['images_per_s']:.0f} | {ratio} | {s['startup_s']:.1f} | {s['wall_s']:.1f} |")
    if base and "ray_1" in summary:
        ratio = summary["ray_1"]["steps_per_s"] / base
        summary["ray_1_vs_in_process"] = ratio
        summary["target_met"] = ratio >= TARGET
        lines.append(f"\nRay Train with 1 worker keeps {100 * ratio:.1f} % of the in-process steps/s "
                     f"(target ≥ {100 * TARGET:.0f} %: {'met' if ratio >= TARGET else 'NOT met'}).")
    return "\n".join(lines), summary


def quality_run(root: Path, preset: str, name: str, seed: int, extra: list[str]) -> dict:
    workers, batch = QUALITY[name]
    run_dir = root / "runs" / f"{preset}-quality-{name}-seed{seed}"
    overrides = [f"seed={seed}", "train.threads=1", f"data.batch_size={batch}",
                 "optim.lr_scaling=none", *extra]
    record = launch(run_dir, preset, workers, overrides, restart=False)
    last = last_row(run_dir)
    return {"setting": name, "workers": workers, "batch_per_worker": batch, "seed": seed,
            "mIoU": last["val/mIoU"], "mIoU_teacher": last["val/mIoU_teacher"],
            "step": last["step"], "wall_s": record["end"] - record["launch"]}


def quality_table(runs: list[dict], seeds: list[int]) -> tuple[str, dict]:
    lines = ["| setting | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std | "
             "teacher mean | wall s / run |", "|---" * (len(seeds) + 4) + "|"]
    summary = {}
    for name, (workers, batch) in QUALITY.items():
        rows = {r["seed"]: r for r in runs if r["setting"] == name}
        values = [rows[s]["mIoU"] for s in seeds]
        summary[name] = {"mean": statistics.mean(values),
                         "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                         "teacher_mean": statistics.mean(rows[s]["mIoU_teacher"] for s in seeds),
                         "wall_s": statistics.mean(rows[s]["wall_s"] for s in seeds)}
        s = summary[name]
        lines.append(f"| {workers} worker{'s' if workers > 1 else ''} x batch {batch} | "
                     + " | ".join(f"{rows[seed]['mIoU']:.1f}" for seed in seeds)
                     + f" | **{s['mean']:.1f} ± {s['std']:.1f}** | {s['teacher_mean']:.1f} | "
                     f"{s['wall_s']:.0f} |")
    miou = {(r["setting"], r["seed"]): r["mIoU"] for r in runs}
    diffs = [miou["2x16", seed] - miou["1x32", seed] for seed in seeds]
    diff = statistics.mean(diffs)
    noise = max(summary[name]["std"] for name in QUALITY)
    summary["difference"] = {"mean": diff, "std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
                             "within_seed_noise": abs(diff) <= noise}
    lines.append(f"\n2 workers - 1 worker: {diff:+.1f} mIoU (per seed: "
                 + ", ".join(f"{d:+.1f}" for d in diffs) + f"); the larger seed std is {noise:.1f}: "
                 + ("within" if abs(diff) <= noise else "NOT within") + " seed noise.")
    return "\n".join(lines), summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="digits")
    parser.add_argument("--steps", type=int, default=300, help="training steps per speed run")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--repeats", type=int, default=1, help="runs per mode (median reported)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="overrides applied to every run")
    parser.add_argument("--quality", action="store_true",
                        help="final mIoU of 1 worker x batch 32 vs 2 workers x batch 16 instead")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="for --quality")
    parser.add_argument("--out", default="results/bench_train")
    args = parser.parse_args()
    root = Path(args.out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if args.quality:
        runs = [quality_run(root, args.preset, name, seed, args.set)
                for seed in args.seeds for name in QUALITY]
        text, summary = quality_table(runs, args.seeds)
        payload = {"preset": args.preset, "seeds": args.seeds, "overrides": args.set,
                   "runs": runs, "summary": summary}
        stem = f"{args.preset}_quality"
    else:
        overrides = speed_overrides(args.preset, args.steps, args.set)
        runs = [measure(root, args.preset, mode, repeat, overrides)
                for repeat in range(args.repeats) for mode in args.modes]
        text, summary = speed_table(runs)
        text = (f"{args.preset}, {args.steps} steps, overrides: `{' '.join(overrides)}`, median of "
                f"{args.repeats} run(s) per mode, {os.cpu_count()} CPUs\n\n{text}")
        payload = {"preset": args.preset, "steps": args.steps, "overrides": overrides,
                   "cpus": os.cpu_count(), "runs": runs, "summary": summary}
        stem = args.preset
    print(text)
    (root / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (root / f"{stem}.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
