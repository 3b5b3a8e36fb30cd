"""A confirmation's verdict: the search's top configs and the default, each trained with the same
seeds, compared pair by pair (t2sda/stats.py). Written to confirm.json, confirm.png and
TensorBoard beside the search's results; best_config.json says whether it was confirmed.

No Ray here (tested on fabricated replicates). A replicate is a dict: ``config`` (a label:
"default", "#1", ...), ``seed`` (the replicate's seed value), ``value`` (the search metric,
None if the run failed) and ``target_miou`` (best-so-far target mIoU, None without labels).
"""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure

from t2sda import stats
from t2sda.ray_glue.report import atomic_write
from t2sda.ray_glue.selection import finite

DEFAULT = "default"
SEED_KINDS = {"adaptation": "adapt_seed: data order and sampling after the shared warm-up",
              "full": "seed: initialisation, warm-up, data and sampling"}


def _by_seed(replicates: list[dict], label: str, key: str) -> dict[int, float]:
    return {r["seed"]: float(r[key]) for r in replicates if r["config"] == label and finite(r.get(key))}


def _compare(replicates, labels, key: str, mode: str) -> dict:
    """Per config: its seeds' summary; per challenger: the paired difference to the default."""
    configs, diffs = {}, {}
    for label in labels:
        values = _by_seed(replicates, label, key)
        try:
            s = stats.describe(list(values.values()), what=f"{label} {key}")
            configs[label] = {"n": s.n, "mean": s.mean, "std": s.std, "ci": [s.ci_low, s.ci_high],
                              "values": {str(k): v for k, v in sorted(values.items())}}
        except stats.StatsError as err:
            configs[label] = {"n": len(values), "values": {str(k): v for k, v in values.items()},
                              "error": str(err)}
    ref = _by_seed(replicates, DEFAULT, key)
    tested = {}  # label -> stats.Difference, for Holm and the verdict
    for label in labels:
        if label == DEFAULT:
            continue
        mine = _by_seed(replicates, label, key)
        seeds = sorted(set(ref) & set(mine))
        try:
            d = stats.paired([mine[s] for s in seeds], [ref[s] for s in seeds],
                             what=f"{label} against the default")
        except stats.StatsError as err:
            diffs[label] = {"n": len(seeds), "error": str(err), "verdict": "cannot say"}
            continue
        tested[label] = d
        diffs[label] = {"n": d.n, "seeds": seeds, "mean": d.mean, "std": d.std,
                        "ci": [d.ci_low, d.ci_high], "p_t": d.p_t, "p_wilcoxon": d.p_wilcoxon,
                        "p_sign": d.p_sign, "smallest_significant": stats.smallest_significant(d.std, d.n)}
    for (label, d), p in zip(tested.items(), stats.holm([d.p_t for d in tested.values()])):
        diffs[label].update(p_holm=p, verdict=stats.verdict(d, mode=mode, p=p))
    return {"configs": configs, "vs_default": diffs}


def confirm(replicates: list[dict], labels: list[str], *, metric: str, mode: str, kind: str,
            seeds: list[int], candidates: dict[str, dict], default_ranked_first: bool = False) -> dict:
    """The whole verdict as one JSON-able dict. ``labels``: the default first, then the
    challengers in search rank; ``candidates``: label -> {trial_id, params, search_value}."""
    out = {"metric": metric, "mode": mode, "seed_kind": kind, "seed_kind_means": SEED_KINDS[kind],
           "seeds": seeds, "decided_by": "paired t-test (Holm-adjusted over the challengers); "
           "Wilcoxon signed-rank and sign tests reported, they cannot reach p < 0.05 below 6 pairs",
           "candidates": candidates, "replicates": replicates, "default_ranked_first": default_ranked_first,
           **_compare(replicates, labels, "value", mode)}
    if metric != "val/best_mIoU" and any(finite(r.get("target_miou")) for r in replicates):
        out["target_miou"] = _compare(replicates, labels, "target_miou", "max")
    out["verdict"] = verdict_line(out)
    return out


def _unit(metric: str) -> str:
    return "mIoU" if metric == "val/best_mIoU" else metric.split("/", 1)[-1].removeprefix("best_")


def verdict_line(result: dict) -> str:
    """One line: the search's best challenger against the default."""
    challengers = list(result["vs_default"])
    if not challengers:
        return "no config to confirm against the default (the search ranked only the default)"
    top = challengers[0]
    row = result["vs_default"][top]
    first = "the default ranked first in the search; " if result["default_ranked_first"] else ""
    kind = f"{result['seed_kind']} seeds"
    if "error" in row:
        return f"{first}best vs default: cannot say ({row['error']})"
    lo, hi = row["ci"]
    unit = _unit(result["metric"])
    holm = f", Holm over {len(challengers)}" if len(challengers) > 1 else ""
    where = f"95 % CI {lo:+.2f}..{hi:+.2f}, {row['n']} paired {kind}{holm}"
    if row["verdict"] == "better":
        return f"{first}best vs default: {row['mean']:+.2f} {unit} ({where}): better"
    if row["verdict"] == "worse":
        return (f"{first}best vs default: {row['mean']:+.2f} {unit} ({where}): worse: the search's "
                "best is below the default beyond seed noise")
    return (f"{first}no config found beats the default beyond seed noise (best {row['mean']:+.2f} "
            f"{unit}, CI {lo:+.2f}..{hi:+.2f}, {row['n']} paired {kind}; it would call "
            f"{row['smallest_significant']:.2f} or more)")


def format_table(result: dict) -> str:
    unit = _unit(result["metric"])
    lines = [f"confirmation: {len(result['seeds'])} paired {result['seed_kind']} seeds "
             f"({result['seed_kind_means']}); {result['metric']} ({result['mode']})",
             f"  {'config':<8} {'trial':<12} {'n':>2} {'mean ± std':>15} {'95 % CI':>17} "
             f"{'vs default':>10} {'95 % CI':>17} {'p (t)':>7} {'p (W)':>7}  verdict"]
    for label, cfg in result["configs"].items():
        trial = result["candidates"].get(label, {}).get("trial_id") or "-"
        if "mean" not in cfg:
            lines.append(f"  {label:<8} {trial:<12} {cfg['n']:>2}  {cfg['error']}")
            continue
        text = (f"  {label:<8} {trial:<12} {cfg['n']:>2} {cfg['mean']:>7.2f} ± {cfg['std']:<5.2f} "
                f"{cfg['ci'][0]:>8.2f}..{cfg['ci'][1]:<7.2f}")
        d = result["vs_default"].get(label)
        if d and "mean" in d:
            p = d.get("p_holm", d["p_t"])
            text += (f" {d['mean']:>+10.2f} {d['ci'][0]:>+8.2f}..{d['ci'][1]:<+7.2f} {p:>7.3f} "
                     f"{d['p_wilcoxon']:>7.3f}  {d['verdict']}")
        elif d:
            text += f"  {d['error']}"
        else:
            text += f"  {'(reference)':>10}"
        lines.append(text)
    lines.append(f"  (values in {unit}; p (t): the deciding paired t-test"
                 + (", Holm-adjusted" if len(result["vs_default"]) > 1 else "")
                 + "; p (W): Wilcoxon signed-rank)")
    target = result.get("target_miou")
    if target:
        for label, d in target["vs_default"].items():
            if "mean" in d:
                lines.append(f"  target mIoU (labels, not the ranking metric) {label} vs default: "
                             f"{d['mean']:+.2f} (95 % CI {d['ci'][0]:+.2f}..{d['ci'][1]:+.2f})")
    return "\n".join(lines)


def figure(result: dict) -> Figure:
    """Each config's replicates as points, one seed's points joined across configs, the
    default's mean as a reference line."""
    labels = list(result["configs"])
    fig = Figure(figsize=(1.8 + 1.6 * len(labels), 4.2), layout="constrained")
    ax = fig.subplots()
    seeds = sorted({r["seed"] for r in result["replicates"]})
    for i, seed in enumerate(seeds):
        pts = [(x, result["configs"][label]["values"].get(str(seed))) for x, label in enumerate(labels)]
        pts = [(x, v) for x, v in pts if v is not None]
        color = f"C{i % 10}"
        ax.plot([x for x, _ in pts], [v for _, v in pts], "-o", color=color, alpha=0.7, label=f"seed {seed}")
    ref = result["configs"].get(DEFAULT, {})
    if "mean" in ref:
        ax.axhline(ref["mean"], color="black", ls="--", lw=1, label="default mean")
    names = []
    for label in labels:
        d = result["vs_default"].get(label)
        names.append(label if d is None or "mean" not in d else f"{label}\n{d['mean']:+.2f} {d['verdict']}")
    ax.set_xticks(range(len(labels)), names)
    ax.set_xlim(-0.5, len(labels) - 0.5)
    ax.set_ylabel(result["metric"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(result["verdict"], fontsize=8, wrap=True)
    return fig


def write(result: dict, out_dir: Path) -> None:
    """confirm.json and confirm.png, atomically; best_config.json gains ``confirmed``."""
    out_dir = Path(out_dir)
    atomic_write(out_dir / "confirm.json", json.dumps(result, indent=2) + "\n")
    fig = figure(result)
    atomic_write(out_dir / "confirm.png", lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    best = out_dir / "best_config.json"
    if best.exists():
        record = json.loads(best.read_text())
        record["confirmed"] = confirmed(result, record.get("trial_id"))
        atomic_write(best, json.dumps(record, indent=2) + "\n")


def confirmed(result: dict, trial_id: str | None) -> dict:
    """What best_config.json says of its trial: confirmed better than the default or not."""
    label = next((k for k, c in result["candidates"].items() if c.get("trial_id") == trial_id), None)
    row = result["vs_default"].get(label) if label else None
    if label == DEFAULT:
        return {"confirmed": False, "why": "the best trial is the default itself",
                "verdict": result["verdict"]}
    if row is None or "mean" not in row:
        return {"confirmed": False, "why": "not confirmed" if row is None else row["error"],
                "verdict": result["verdict"]}
    return {"confirmed": row["verdict"] == "better", "vs_default": row["verdict"],
            "difference": row["mean"], "ci": row["ci"], "p": row.get("p_holm", row["p_t"]),
            "seeds": row["n"], "seed_kind": result["seed_kind"], "verdict": result["verdict"]}


def tensorboard(result: dict, logdir: Path) -> None:
    """The replicates as scalars (x: the seed) and the table as text, under ``logdir``."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(logdir)) as writer:
        for label, cfg in result["configs"].items():
            for seed, value in cfg["values"].items():
                writer.add_scalar(f"confirm/{label}", value, int(seed))
        for label, d in result["vs_default"].items():
            if "mean" in d:
                writer.add_scalar(f"confirm_vs_default/{label}", d["mean"], 0)
        writer.add_text("confirm/verdict", result["verdict"], 0)
        writer.add_text("confirm/table", "    " + format_table(result).replace("\n", "\n    "), 0)
