"""The pull study: which form of the pull loss, if any, beats translation-only training.

    .venv/bin/python scripts/bench_pull.py                              # screening + finals
    .venv/bin/python scripts/bench_pull.py --presets digits --seeds 0 --variants t2sda tau_0.07
    .venv/bin/python scripts/bench_pull.py --report-only                 # table + plot from runs

Every variant is compared with ``translation`` (target-like translation + self-training, no
pull), the right baseline for the pull. Runs share their source-only warm-up: for each
(preset, seed) the steps before ``method.self_training_start`` are trained once per group of
variants that differ only in keys read after adaptation starts (the search's rule,
``t2sda.ray_glue.shared_warmup.fits``), and each variant resumes from that checkpoint with
``train --resume --change-on-resume`` (schedules and step counts stay those of the full run).
Each run is a ``python -m t2sda train`` process on one thread, ``--jobs`` at a time; finished
runs are kept, so re-running adds only what is missing; a run whose directory is gone (run
dirs are not committed) but which ``<out>/results.json`` records is taken from there
(``--fresh`` reruns it).

The last evaluation of each run gives the student's target mIoU and the feature diagnostics
(``feat/proj/...``, ``feat/decoder/...``: docs/diagnostics.md). The step-time overhead of the
pull + re-weighting is measured in-process afterwards (interleaved, as bench_adaptation).
Writes ``<out>/results.json``, ``<out>/results.md`` and ``<out>/pull_study.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_adaptation import WITHOUT_PULL, interleaved_step_ms  # noqa: E402

BASELINE = "translation"
# name -> (what it tests, overrides on the preset). Each row changes one thing of the default.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    BASELINE: ("translation + self-training, no pull (baseline)", ["method.pull_weight=0"]),
    "t2sda": ("+ pull, the preset's default (both queries, teacher keys, bank)", []),
    "q_source": ("queries: target-like source only", ["method.pull_target_pixels=false"]),
    "q_target": ("queries: confident target pixels only", ["method.pull_source_pixels=false"]),
    "keys_student": ("keys from the student's source pass", ["method.pull_key_net=student"]),
    "keys_batch": ("positives from the batch, no bank", ["method.pull_keys=batch"]),
    "neg_prototypes": ("negatives: the bank's prototypes", ["method.negatives=prototypes"]),
    "tau_0.07": ("temperature 0.07", ["method.pull_temperature=0.07"]),
    "tau_0.5": ("temperature 0.5", ["method.pull_temperature=0.5"]),
    "lambda_1": ("lambda 1.0 (10x)", ["method.pull_weight=1.0"]),
    "lambda_0.01": ("lambda 0.01", ["method.pull_weight=0.01"]),
    "no_ramp": ("lambda without ramp", ["method.pull_warmup=0"]),
    "proj_256": ("projection dim 256", ["model.proj_dim=256"]),
    "decoder": ("pull the decoder feature (no projection)", ["method.pull_feature=decoder"]),
}
SCREEN = ["t2sda", "q_source", "q_target", "keys_student", "keys_batch", "neg_prototypes",
          "tau_0.07", "lambda_1", "decoder"]
FEATURES = ("feat/proj/target_to_source_acc", "feat/proj/cross_domain_cos",
            "feat/decoder/target_to_source_acc", "feat/decoder/cross_domain_cos",
            "feat/decoder/separability_target")


def variant_config(preset: str, variant: str, seed: int, extra: list[str]):
    from t2sda.presets import get_preset

    return get_preset(preset).with_overrides(
        [*VARIANTS[variant][1], f"seed={seed}", "train.threads=1", *extra])


def warmup_config(cfg):
    """The warm-up a variant can start from: its config with every key read only after
    adaptation starts put back to the preset default, keeping whether the pull exists."""
    from t2sda.config import Config
    from t2sda.ray_glue.shared_warmup import AFTER_ADAPTATION
    from t2sda.settings import flatten

    default = flatten(Config().to_dict())
    own = flatten(cfg.to_dict())
    reset = {k: default[k] for k in AFTER_ADAPTATION if own[k] != default[k]}
    if (cfg.method.pull_weight > 0) != (default["method.pull_weight"] > 0):
        reset["method.pull_weight"] = cfg.method.pull_weight  # the module set must not change
    return cfg.with_overrides(reset)


class Runner:
    def __init__(self, root: Path, extra: list[str]):
        self.root, self.extra = root, extra
        self.locks: dict[Path, threading.Lock] = {}
        self.guard = threading.Lock()
        self.done, self.total, self.start = 0, 0, time.perf_counter()

    def _lock(self, path: Path) -> threading.Lock:
        with self.guard:
            return self.locks.setdefault(path, threading.Lock())

    def warmup(self, preset: str, cfg) -> Path:
        """Train (once) the steps before adaptation of ``cfg``; returns its run dir."""
        digest = hashlib.sha1(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
        path = self.root / "warmups" / f"{preset}-seed{cfg.seed}-{digest}"
        with self._lock(path):
            done = path / "done"
            if not done.exists():
                shutil.rmtree(path, ignore_errors=False) if path.exists() else None
                path.mkdir(parents=True)
                (path / "warmup_config.json").write_text(json.dumps(cfg.to_dict()))
                code = ("import json,sys; from t2sda.config import Config; from t2sda.train import train; "
                        "cfg=Config.from_dict(json.load(open(sys.argv[1]))); "
                        "train(cfg, device='cpu', run_dir=sys.argv[2], "
                        "stop_at=cfg.method.self_training_start)")
                tic = time.perf_counter()
                proc = subprocess.run([sys.executable, "-c", code, str(path / "warmup_config.json"),
                                       str(path / "run")], capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SystemExit(f"warm-up {path.name} failed:\n{proc.stderr[-2000:]}")
                done.write_text(f"{time.perf_counter() - tic:.1f}\n")
                print(f"  warm-up {path.name}: {float(done.read_text()):.0f} s", flush=True)
        return path

    def run(self, preset: str, variant: str, seed: int) -> dict:
        cfg = variant_config(preset, variant, seed, self.extra)
        run_dir = self.root / "runs" / preset / f"{variant}-seed{seed}"
        metrics_file = run_dir / "metrics.jsonl"
        if not (run_dir / "wall_seconds").exists():
            from t2sda.ray_glue.shared_warmup import fits

            warm_cfg = warmup_config(cfg)
            if not fits(warm_cfg, cfg):
                raise SystemExit(f"{variant}: changes a key that acts during the warm-up")
            warm = self.warmup(preset, warm_cfg)
            if run_dir.exists():
                shutil.rmtree(run_dir)
            shutil.copytree(warm / "run", run_dir)
            overrides = [*VARIANTS[variant][1], f"seed={seed}", "train.threads=1", *self.extra]
            cmd = [sys.executable, "-m", "t2sda", "train", "--preset", preset, "--run-dir",
                   str(run_dir), "--resume", "--change-on-resume", "--set", *overrides]
            tic = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"run {preset} {variant} seed {seed} failed:\n{proc.stderr[-2000:]}")
            (run_dir / "wall_seconds").write_text(f"{time.perf_counter() - tic:.1f}\n")
        rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
        evals = [r for r in rows if "val/mIoU" in r]
        last = evals[-1]
        with self.guard:
            self.done += 1
            elapsed = time.perf_counter() - self.start
            eta = elapsed / self.done * (self.total - self.done)
            print(f"[{self.done}/{self.total}] {preset} {variant} seed {seed}: "
                  f"mIoU {last['val/mIoU']:.1f}  ({elapsed / 60:.1f} min, ETA {eta / 60:.1f} min)",
                  flush=True)
        return {"preset": preset, "variant": variant, "seed": seed, "mIoU": last["val/mIoU"],
                "mIoU_teacher": last["val/mIoU_teacher"], "step": last["step"],
                "adapt_wall_s": float((run_dir / "wall_seconds").read_text()),
                "features": {k: last[k] for k in FEATURES if k in last},
                "curves": {k: [(r["step"], r[k]) for r in evals if k in r]
                           for k in ("val/mIoU", *FEATURES)}}

    def finished(self, job: tuple[str, str, int]) -> bool:
        preset, variant, seed = job
        return (self.root / "runs" / preset / f"{variant}-seed{seed}" / "wall_seconds").exists()


def recorded_runs(path: Path, overrides: list[str]) -> dict:
    """The runs (with their curves) of an earlier results.json made with the same ``--set``
    overrides, keyed (preset, variant, seed); {} when there is none or it used others."""
    if not path.exists():
        return {}
    try:
        payload = json.loads(path.read_text())
        if payload.get("overrides", []) != overrides:
            print(f"{path}: made with --set {payload.get('overrides')}, not {overrides}: "
                  "its runs are not reused", flush=True)
            return {}
        curves = {(c["preset"], c["variant"], c["seed"]): c["curves"] for c in payload["curves"]}
        return {(r["preset"], r["variant"], r["seed"]):
                {**r, "curves": curves.get((r["preset"], r["variant"], r["seed"]), {})}
                for r in payload["runs"]}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise SystemExit(f"{path}: not a results file of this script ({err}); move it away") from None


def run_jobs(root: Path, jobs: list[tuple[str, str, int]], overrides: list[str], *, n_jobs: int,
             report_only: bool, fresh: bool = False) -> dict:
    """The (preset, variant, seed) runs, ``n_jobs`` at a time, keyed like ``jobs``: finished
    ones are read back, a run whose dir is gone (run dirs are not committed) comes from
    ``<root>/results.json`` unless ``fresh``; with ``report_only`` nothing new is trained."""
    runner = Runner(root, overrides)
    recorded = {} if fresh else recorded_runs(root / "results.json", overrides)
    rows = {j: recorded[j] for j in jobs if j in recorded and not runner.finished(j)}
    todo = [j for j in jobs if j not in rows and (runner.finished(j) or not report_only)]
    runner.total = len(todo)
    print(f"{len(todo)} runs, {n_jobs} at a time ({len(rows)} taken from results.json)", flush=True)
    with ThreadPoolExecutor(max_workers=n_jobs) as pool:
        rows.update(zip(todo, pool.map(lambda job: runner.run(*job), todo)))
    return rows


def runs_payload(results: list[dict]) -> dict:
    """results.json's ``runs`` (without curves) and ``curves`` entries."""
    return {"runs": [{k: v for k, v in r.items() if k != "curves"} for r in results],
            "curves": [{"preset": r["preset"], "variant": r["variant"], "seed": r["seed"],
                        "curves": r["curves"]} for r in results]}


def summarize(results: list[dict], presets: list[str]) -> dict:
    """Per preset and variant: mean, std, per-seed delta to the baseline of the same seed."""
    out: dict = {}
    for preset in presets:
        mine = [r for r in results if r["preset"] == preset]
        base = {r["seed"]: r["mIoU"] for r in mine if r["variant"] == BASELINE}
        out[preset] = {}
        for variant in dict.fromkeys(r["variant"] for r in mine):
            rows = sorted((r for r in mine if r["variant"] == variant), key=lambda r: r["seed"])
            values = [r["mIoU"] for r in rows]
            deltas = {r["seed"]: r["mIoU"] - base[r["seed"]] for r in rows if r["seed"] in base}
            feats = {k: statistics.mean(r["features"][k] for r in rows if k in r["features"])
                     for k in FEATURES if all(k in r["features"] for r in rows)}
            out[preset][variant] = {
                "seeds": [r["seed"] for r in rows], "mIoU": values, "mean": statistics.mean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "delta_mean": statistics.mean(deltas.values()) if deltas else None,
                "deltas": deltas, "features": feats}
    return out


def verdict(summary: dict, presets: list[str], seeds: list[int]) -> dict:
    """The issue's rule: a variant qualifies when it beats the baseline by >= 1.0 mIoU on
    average on every preset, with every seed positive, over all ``seeds``."""
    qualified, rows = [], {}
    variants = {v for p in presets for v in summary.get(p, {})} - {BASELINE}
    for variant in sorted(variants):
        per = [summary[p].get(variant) for p in presets]
        complete = all(s is not None and set(s["deltas"]) >= set(seeds) for s in per)
        ok = complete and all(s["delta_mean"] >= 1.0 and min(s["deltas"].values()) > 0 for s in per)
        rows[variant] = {"complete": complete, "qualifies": ok}
        if ok:
            qualified.append(variant)
    return {"rule": ">= 1.0 mIoU mean gain over translation-only on every preset, every seed > 0",
            "seeds": seeds, "qualified": qualified, "variants": rows}


def table(summary: dict, presets: list[str]) -> str:
    lines = ["| variant | " + " | ".join(f"{p} mIoU (seeds) | Δ vs baseline" for p in presets)
             + " | t→s acc (proj) | cross-domain cos (proj) |",
             "|---" * (2 * len(presets) + 3) + "|"]
    variants = list(dict.fromkeys(v for p in presets for v in summary.get(p, {})))
    for variant in variants:
        cells = []
        for p in presets:
            s = summary.get(p, {}).get(variant)
            if s is None:
                cells += ["–", "–"]
                continue
            seeds = ", ".join(f"{v:.1f}" for v in s["mIoU"])
            spread = f" ± {s['std']:.1f}" if len(s["mIoU"]) > 1 else ""
            cells.append(f"**{s['mean']:.1f}**{spread} ({seeds})")
            if variant == BASELINE or s["delta_mean"] is None:
                cells.append("–")
            else:
                per = ", ".join(f"{d:+.1f}" for d in s["deltas"].values())
                cells.append(f"{s['delta_mean']:+.1f} ({per})")
        feats = summary[presets[0]].get(variant, {}).get("features", {})
        acc = feats.get("feat/proj/target_to_source_acc")
        cos = feats.get("feat/proj/cross_domain_cos")
        cells.append(f"{acc:.3f}" if acc is not None else "–")
        cells.append(f"{cos:.3f}" if cos is not None else "–")
        lines.append(f"| {variant}: {VARIANTS[variant][0]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict], summary: dict, presets: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(presets) + 1, figsize=(6 * len(presets) + 6, 5))
    for ax, preset in zip(axes, presets, strict=False):
        items = list(summary.get(preset, {}).items())
        for i, (variant, s) in enumerate(items):
            colour = "grey" if variant == BASELINE else "tab:blue"
            ax.bar(i, s["mean"], color=colour, alpha=0.6)
            ax.scatter([i] * len(s["mIoU"]), s["mIoU"], color="black", s=12, zorder=3)
        if BASELINE in summary.get(preset, {}):
            base = summary[preset][BASELINE]
            ax.axhline(base["mean"], color="grey", ls="--", lw=1, label="baseline, mean of its seeds")
            if len(base["mIoU"]) > 1:  # screening variants ran the first seed only
                ax.axhline(base["mIoU"][0], color="grey", ls=":", lw=1,
                           label=f"baseline, seed {base['seeds'][0]} (the screening's reference)")
            ax.legend(fontsize=8, loc="lower left")
        ax.set_xticks(range(len(items)), [v for v, _ in items], rotation=45, ha="right")
        lows = [min(s["mIoU"]) for _, s in items] or [0]
        ax.set_ylim(min(lows) - 3, max(max(s["mIoU"]) for _, s in items) + 2 if items else 1)
        ax.set_ylabel("target mIoU (student, final)")
        ax.set_title(f"{preset}: mean (bar) and seeds (dots)")
    ax = axes[-1]  # feature curves of baseline vs default pull, first preset, seed 0
    for variant, style in ((BASELINE, "--"), ("t2sda", "-")):
        for r in results:
            if r["preset"] == presets[0] and r["variant"] == variant and r["seed"] == min(
                    x["seed"] for x in results if x["preset"] == presets[0]):
                for key, colour in (("feat/decoder/target_to_source_acc", "tab:green"),
                                    ("feat/decoder/cross_domain_cos", "tab:red")):
                    pts = r["curves"].get(key, [])
                    if pts:
                        ax.plot(*zip(*pts, strict=True), style, color=colour,
                                label=f"{variant}: {key.split('/')[-1]}")
    ax.set_xlabel("step")
    ax.set_title(f"{presets[0]}: decoder-feature diagnostics")
    if ax.lines:  # runs without diagnostics (train.diagnostics=false) leave the panel empty
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def step_overhead(preset: str, extra: list[str], steps: int, repeats: int) -> dict:
    """Step time with and without pull + re-weighting, ``repeats`` independent interleaved
    timings (fresh models each): per setting the median ms, per overhead the median and the
    range over the repeats (one timing moves by several points on a shared machine)."""
    settings = {"without": WITHOUT_PULL, "with": [],
                "with_student_keys": ["method.pull_key_net=student"]}
    runs = [interleaved_step_ms(preset, extra, steps, settings) for _ in range(repeats)]
    out = {name: statistics.median(r[name] for r in runs) for name in settings}
    for name, key in (("with", "overhead_pct"), ("with_student_keys", "overhead_student_keys_pct")):
        pct = [100 * (r[name] / r["without"] - 1) for r in runs]
        out[key], out[f"{key}_range"] = statistics.median(pct), [min(pct), max(pct)]
    out["repeats"] = runs
    return out


def timing_text(t: dict, preset: str, steps: int) -> str:
    def pct(key: str) -> str:
        low, high = t[f"{key}_range"]
        return f"+{t[key]:.1f} % (range {low:+.1f} to {high:+.1f} %)"

    return (f"Step time ({preset}, 1 thread, adaptation phase, interleaved, median of {steps} "
            f"steps; median of {len(t['repeats'])} repeats): {t['without']:.0f} ms without pull + "
            f"re-weighting, {t['with']:.0f} ms with, {pct('overhead_pct')}; "
            f"{t['with_student_keys']:.0f} ms with keys from the student's own source pass "
            f"(`method.pull_key_net=student`), {pct('overhead_student_keys_pct')}.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["digits", "digits_hard"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="seeds of the baseline, the default pull and the --finalists")
    parser.add_argument("--variants", nargs="+", default=SCREEN, choices=list(VARIANTS),
                        help="variants screened on the first seed")
    parser.add_argument("--finalists", nargs="*", default=[], choices=list(VARIANTS),
                        help="variants also run on every seed")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--out", default="results/bench_pull")
    parser.add_argument("--timing-steps", type=int, default=40, help="0 = skip the overhead timing")
    parser.add_argument("--timing-repeats", type=int, default=3,
                        help="independent interleaved timings; the median is reported")
    parser.add_argument("--report-only", action="store_true", help="only runs already finished")
    parser.add_argument("--fresh", action="store_true",
                        help="ignore the runs recorded in <out>/results.json (rerun them)")
    args = parser.parse_args()
    root = Path(args.out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    full = [BASELINE, "t2sda", *args.finalists]
    jobs = [(p, v, s) for s in args.seeds for p in args.presets for v in full]
    jobs += [(p, v, args.seeds[0]) for p in args.presets for v in args.variants if v not in full]
    jobs = list(dict.fromkeys(jobs))
    rows = run_jobs(root, jobs, args.set, n_jobs=args.jobs, report_only=args.report_only,
                    fresh=args.fresh)
    results = [rows[j] for j in jobs if j in rows]
    summary = summarize(results, args.presets)
    text = table(summary, args.presets)
    rule = verdict(summary, args.presets, args.seeds)
    text += (f"\n\nRule ({rule['rule']}, seeds {', '.join(map(str, args.seeds))}): "
             + (f"met by {', '.join(rule['qualified'])}." if rule["qualified"] else "met by no variant."))
    timing = None
    if args.timing_steps:
        timing = step_overhead(args.presets[0], args.set, args.timing_steps, args.timing_repeats)
        text += "\n\n" + timing_text(timing, args.presets[0], args.timing_steps)
    print(text)
    plot(results, summary, args.presets, root / "pull_study.png")
    payload = {"command": " ".join(sys.argv), "presets": args.presets, "seeds": args.seeds,
               "overrides": args.set, "variants": {v: VARIANTS[v] for v in dict.fromkeys(j[1] for j in jobs)},
               "summary": summary, "verdict": rule, "step_time_ms": timing, **runs_payload(results)}
    (root / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    (root / "results.md").write_text(text + "\n")
    print(f"wrote {root / 'results.md'}, {root / 'results.json'}, {root / 'pull_study.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
