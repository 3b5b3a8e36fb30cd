"""Cost of the evaluation-time extra pass: feature diagnostics (feat/) and validators (select/).

    .venv/bin/python scripts/bench_diagnostics.py                  # digits, 1 thread
    .venv/bin/python scripts/bench_diagnostics.py --preset digits_hard --repeats 5

In one process and one thread, interleaved so machine load hits every part alike, it times:
training steps in the source-only warm-up and in the adaptation phase (median), the existing
evaluation (target val mIoU, student + teacher; the validators' agreement and entropy read its
logits, as in training), and the monitor's two parts. It extrapolates
to the preset's whole run (iters steps, an evaluation every eval_every / checkpoint_every
steps) and reports each part's share of that run's wall time. Prints a table and writes
``results/bench_diagnostics/<preset>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(preset: str, extra: list[str], steps: int, repeats: int) -> dict:
    import torch

    from t2sda.data.loaders import batch_stream, build_datasets
    from t2sda.monitor import Monitor
    from t2sda.presets import get_preset
    from t2sda.state import build_state
    from t2sda.step import train_step
    from t2sda.train import _validate

    torch.set_num_threads(1)
    cfg = get_preset(preset).with_overrides(extra)
    device = torch.device("cpu")
    data = build_datasets(cfg.data, seed=0)
    state = build_state(cfg, num_classes=data.num_classes, device=device)
    monitor = Monitor(data, cfg, device)
    streams = [batch_stream(d, batch_size=cfg.data.batch_size, seed=i)
               for i, d in enumerate((data.source, data.target))]
    times = {"step_warmup": [], "step_adapt": [], "eval": [], "diagnostics": [], "validators": []}
    start = cfg.method.self_training_start if cfg.method.self_training else cfg.train.iters

    def steps_at(phase_step: int, key: str) -> None:
        state.step = phase_step
        for i in range(steps):
            (src, src_label), (tgt, _) = next(streams[0]), next(streams[1])
            tic = time.perf_counter()
            train_step(state, src, src_label, tgt, cfg)
            if i:  # the first step warms up oneDNN
                times[key].append(time.perf_counter() - tic)

    for r in range(repeats):
        print(f"repeat {r + 1}/{repeats}", flush=True)
        steps_at(0, "step_warmup")
        if start < cfg.train.iters:
            steps_at(start, "step_adapt")
        tic = time.perf_counter()
        _validate(state, data, cfg, device, monitor.observe)  # as training: validators share it
        times["eval"].append(time.perf_counter() - tic)
        metrics, _, _ = monitor(state)
        times["diagnostics"].append(metrics["perf/diagnostics_s"])
        times["validators"].append(metrics["perf/validators_s"])
    med = {k: statistics.median(v) for k, v in times.items() if v}
    iters, every = cfg.train.iters, min(cfg.train.eval_every, cfg.train.checkpoint_every)
    evals = len({s for s in range(1, iters + 1)
                 if s % cfg.train.eval_every == 0 or s % cfg.train.checkpoint_every == 0
                 or s == iters}) if every else 1
    adapt_steps = max(iters - start, 0)
    base = (iters - adapt_steps) * med["step_warmup"] + adapt_steps * med.get("step_adapt", 0) \
        + evals * med["eval"]
    total = base + evals * (med["diagnostics"] + med["validators"])
    return {"preset": preset, "overrides": extra, "iters": iters, "evaluations": evals,
            "repeats": repeats, "median_s": med,
            "run_s": {"without_monitor": base, "with_monitor": total},
            "share_pct": {"diagnostics": 100 * evals * med["diagnostics"] / total,
                          "validators": 100 * evals * med["validators"] / total}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="digits")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=6, help="timed steps per phase per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "results" / "bench_diagnostics"))
    args = p.parse_args()
    res = measure(args.preset, args.set, args.steps, args.repeats)
    med = res["median_s"]
    rows = [("train step, warm-up (ms)", 1000 * med["step_warmup"]),
            ("train step, adaptation (ms)", 1000 * med.get("step_adapt", float("nan"))),
            ("evaluation: target mIoU (s)", med["eval"]),
            ("diagnostics feat/ (s per evaluation)", med["diagnostics"]),
            ("validators select/ (s per evaluation)", med["validators"]),
            (f"run estimate without extra pass (s, {res['evaluations']} evaluations)",
             res["run_s"]["without_monitor"]),
            ("diagnostics share of run (%)", res["share_pct"]["diagnostics"]),
            ("validators share of run (%)", res["share_pct"]["validators"])]
    print(f"\n{args.preset} ({' '.join(args.set) or 'preset as is'}), 1 thread, median of "
          f"{args.repeats}\n| part | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value:.2f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.preset}.json").write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out / (args.preset + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
