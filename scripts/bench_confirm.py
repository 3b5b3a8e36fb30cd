#!/usr/bin/env python
"""Can the confirmation see a real difference, and where may ASHA stop trials on a preset?

    .venv/bin/python scripts/bench_confirm.py worse                  # digits: pull weight 5 vs default
    .venv/bin/python scripts/bench_confirm.py worse --variant ema_0.9999:method.ema_momentum=0.9999
    .venv/bin/python scripts/bench_confirm.py asha runs/tune/fifo_s0 runs/tune/fifo_s1

``worse``: the preset as a search trains it (``--preset``, default digits, with its search
overrides: 900 steps on digits), its source-only warm-up trained once, then the default and
each ``--variant NAME:KEY=VALUE[,KEY=VALUE]`` trained from it with ``--seeds`` adaptation
seeds (``adapt_seed`` 0..n-1, exactly the replicates ``tune.py --confirm`` trains, here
in-process, ``--jobs`` at a time on one thread each). The verdict is t2sda.ray_glue.verdict's
on val/best_mIoU. Writes ``<out>/worse.json``, ``worse.md`` and ``confirm.png``.

``asha``: finished experiments of ``tune.py --scheduler none`` (every trial ran to the end).
For every evaluation step before the end that all trials share: the Spearman correlation of
the trials' search metric there with their final value, and what ASHA (the space's reduction
factor, trials in the order Tune started them) would have stopped with its first rung there:
trials stopped, steps saved, whether the best trial survived. Writes ``<out>/asha.json`` and
``asha.md``. The grace to choose is the earliest step whose correlation is >= 0.5 on every
experiment (none if no step qualifies).
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from t2sda.ray_glue import rungs, verdict  # noqa: E402


def _train(job: dict) -> dict:
    import torch

    from t2sda.config import Config
    from t2sda.train import train

    torch.set_num_threads(1)
    cfg = Config.from_dict(job["config"])
    tic = time.time()
    metrics = train(cfg, device="cpu", run_dir=job["run_dir"], resume=job.get("resume"),
                    stop_at=job.get("stop_at"))
    run_dir = Path(job["run_dir"])
    return {**{k: job[k] for k in ("label", "seed")}, "value": metrics.get("val/best_mIoU"),
            "target_miou": metrics.get("val/best_mIoU"), "final_miou": metrics.get("val/mIoU"),
            "run_dir": str(run_dir.relative_to(ROOT) if run_dir.is_relative_to(ROOT) else run_dir),
            "wall_s": time.time() - tic}


def worse(args) -> None:
    from t2sda import checkpoint
    from t2sda.presets import search_preset

    base = search_preset(args.preset).with_overrides(["train.threads=1", *args.set])
    start = base.method.self_training_start
    runs = args.out / "runs"
    warm_dir = runs / "warmup"
    done = warm_dir / "checkpoints" / f"step_{start:07d}"
    if not done.exists():
        print(f"warm-up: steps 0-{start}", flush=True)
        _train({"label": "warmup", "seed": 0, "config": base.to_dict(), "run_dir": str(warm_dir),
                "stop_at": start})
    warm = checkpoint.latest(warm_dir / "checkpoints")
    variants = {"default": []} | {v.split(":", 1)[0]: v.split(":", 1)[1].split(",") for v in args.variant}
    jobs = [{"label": name, "seed": k, "resume": str(warm),
             "config": base.with_overrides([*over, f"adapt_seed={k}"]).to_dict(),
             "run_dir": str(runs / f"{name}-s{k}")}
            for k in range(args.seeds) for name, over in variants.items()]
    reps, tic = [], time.time()
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        for i, rep in enumerate(pool.imap_unordered(_train, jobs), 1):
            reps.append({"config": rep["label"], **rep})
            eta = (time.time() - tic) / i * (len(jobs) - i)
            print(f"[{i}/{len(jobs)}] {rep['label']} seed {rep['seed']}: {rep['value']:.2f} "
                  f"({rep['wall_s']:.0f} s; ETA {eta:.0f} s)", flush=True)
    labels = list(variants)
    cands = {k: {"trial_id": k, "params": dict(x.split("=", 1) for x in variants[k]), "search_value": None}
             for k in labels}
    renamed = {name: ("default" if name == "default" else f"#{i}") for i, name in enumerate(labels)}
    for r in reps:
        r["config"] = renamed[r["config"]]
    result = verdict.confirm(reps, [renamed[k] for k in labels], metric="val/best_mIoU", mode="max",
                             kind="adaptation", seeds=list(range(args.seeds)),
                             candidates={renamed[k]: v for k, v in cands.items()})
    result["names"] = renamed
    result["command"] = " ".join(sys.argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "worse.json").write_text(json.dumps(result, indent=2) + "\n")
    fig = verdict.figure(result)
    fig.savefig(args.out / "confirm.png", dpi=100)
    table = verdict.format_table(result)
    names = ", ".join(f"{v} = {k} ({' '.join(variants[k]) or 'the preset'})" for k, v in renamed.items())
    text = (f"# bench_confirm worse: {args.preset}, {args.seeds} adaptation seeds\n\n"
            f"`{result['command']}`\n\n{names}\n\n```\n{table}\n```\n\n{result['verdict']}\n")
    (args.out / "worse.md").write_text(text)
    print(table)
    print(result["verdict"])


def _histories(exp: Path, metric: str) -> tuple[dict, list[str], int, int]:
    """trial id -> [(step, value)] from each trial's metrics.jsonl; Tune's trial order."""
    with (exp / "results.csv").open() as f:
        order = [row["trial_id"] for row in csv.DictReader(f)]
    cfg = json.loads((exp / "settings.json").read_text())["config"]
    iters = cfg["train"]["iters"]
    hist = {}
    for tid in order:
        path = exp / f"train-{tid}" / "metrics.jsonl"
        rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        hist[tid] = [(r["step"], r[metric]) for r in rows if r.get(metric) is not None]
    return hist, order, iters, cfg["method"]["self_training_start"]


def simulate_asha(hist: dict, order: list[str], *, grace: int, rf: int, iters: int,
                  reference: str | None = None) -> dict:
    """Trials in start order; at the rung, stop below the (1 - 1/rf) quantile of what the rung
    has recorded so far (Ray's ASHA). The reference (default: the first trial Tune started,
    the preset's own point) is never stopped."""
    reference = order[0] if reference is None else reference
    recorded, stopped = [], []
    for tid in order:
        value = rungs.value_at(hist[tid], grace)
        if value is None:
            continue
        cut = np.nanpercentile(recorded, (1 - 1 / rf) * 100) if recorded else None
        if cut is not None and value < cut and tid != reference:
            stopped.append(tid)
        recorded.append(value)
    finals = {t: rungs.value_at(h, iters) for t, h in hist.items()}
    best = max(finals, key=lambda t: finals[t])
    return {"grace": grace, "stopped": len(stopped), "steps_saved": len(stopped) * (iters - grace),
            "best_survives": best not in stopped}


def asha(args) -> None:
    out, lines = [], []
    for exp in args.experiments:
        hist, order, iters, start = _histories(exp, args.metric)
        steps = sorted(set.intersection(*({s for s, _ in h} for h in hist.values()))) if hist else []
        candidates = [s for s in steps if s < iters]
        result = rungs.analyse(hist, iters=iters, rungs=candidates, mode="max")
        sims = [simulate_asha(hist, order, grace=g, rf=args.reduction_factor, iters=iters)
                for g in candidates]
        adapt = iters - start  # each trial's adaptation steps (the warm-up is shared)
        out.append({"experiment": str(exp), "trials": len(hist), "iters": iters, "rungs": result,
                    "asha": sims, "adaptation_steps": adapt})
        for row, sim in zip(result["rungs"], sims):
            rho = "n/a" if row["spearman"] is None else f"{row['spearman']:+.2f}"
            lines.append(f"| {exp.name} | {len(hist)} | {row['rung']} | {rho} | {sim['stopped']} | "
                         f"{sim['steps_saved']} of {len(hist) * adapt} "
                         f"({100 * sim['steps_saved'] / (len(hist) * adapt):.0f} %) | "
                         f"{'yes' if sim['best_survives'] else 'no'} |")
    reliable = [s for s in {r["rung"] for e in out for r in e["rungs"]["rungs"]}
                if all(any(r["rung"] == s and r["reliable"] for r in e["rungs"]["rungs"]) for e in out)]
    choice = min(reliable) if reliable else None
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "asha.json").write_text(json.dumps({"experiments": out, "choice": choice,
                                                    "command": " ".join(sys.argv)}, indent=2) + "\n")
    head = ("| experiment | trials | first rung (step) | spearman vs end | ASHA would stop | "
            "adaptation steps saved | best survives |\n|---|---|---|---|---|---|---|")
    text = (f"# bench_confirm asha\n\n`{' '.join(sys.argv)}`\n\n{head}\n" + "\n".join(lines)
            + f"\n\nreliable first rung on every experiment (spearman >= {rungs.RELIABLE}): "
            + (f"step {choice}" if choice else "none: no early stopping") + "\n")
    (args.out / "asha.md").write_text(text)
    print(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    w = sub.add_parser("worse")
    w.add_argument("--preset", default="digits")
    w.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]")
    w.add_argument("--seeds", type=int, default=3)
    w.add_argument("--jobs", type=int, default=2)
    w.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE")
    w.add_argument("--out", type=Path, default=ROOT / "results" / "bench_confirm")
    a = sub.add_parser("asha")
    a.add_argument("experiments", type=Path, nargs="+")
    a.add_argument("--metric", default="val/best_mIoU")
    a.add_argument("--reduction-factor", type=int, default=2)
    a.add_argument("--out", type=Path, default=ROOT / "results" / "bench_confirm")
    args = p.parse_args()
    if args.what == "worse":
        if not args.variant:
            args.variant = ["pull_weight_5:method.pull_weight=5"]
        if args.seeds < 2:
            p.error(f"--seeds {args.seeds}: a verdict needs at least 2")
        worse(args)
    else:
        for exp in args.experiments:
            if not (exp / "results.csv").exists():
                p.error(f"{exp}: no results.csv (a finished tune.py experiment?)")
        asha(args)


if __name__ == "__main__":
    main()
