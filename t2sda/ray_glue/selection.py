"""How well each label-free validator would have chosen among a search's trials.

No Ray here (tested on fabricated rows). For every validator of ``t2sda.validators``: the
Spearman rank correlation of its best-so-far value with the trial's target mIoU (``val/best_mIoU``,
which needs target labels), oriented so that +1 means "orders the trials exactly as target mIoU
does" (a ``min`` validator such as entropy is negated first); the trial it would pick; and that
trial's real target mIoU. Written to selection.json and selection.png beside results.csv.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from matplotlib.figure import Figure

from t2sda.ray_glue.report import atomic_write
from t2sda.validators import DIRECTIONS, LABEL_FREE


def _ranks(values: list[float]) -> torch.Tensor:
    """Ranks 1..n, ties sharing their average rank."""
    x = torch.tensor(values, dtype=torch.float64)
    order = x.argsort()
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=torch.float64)
    for value in x.unique():
        same = x == value
        ranks[same] = ranks[same].mean()
    return ranks


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rho (Pearson correlation of the ranks); None for fewer than 3 pairs or a
    constant side."""
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} values against {len(y)}")
    if len(x) < 3:
        return None
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = (rx.square().sum() * ry.square().sum()).sqrt()
    return None if denom == 0 else (rx @ ry / denom).item()


def finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def selection(rows) -> dict[str, dict]:
    """rows: TrialRow-like objects with ``trial_id``, ``status`` and ``scores`` (validator name
    or ``target_miou`` -> best-so-far value). Errored trials are never picked."""
    ok = [r for r in rows if r.status != "ERROR"]
    out = {}
    for name in LABEL_FREE:
        scored = [r for r in ok if finite(r.scores.get(name))]
        if not scored:
            continue
        sign = 1.0 if DIRECTIONS[name] == "max" else -1.0
        picked = max(scored, key=lambda r: sign * r.scores[name])  # first of ties
        labelled = [r for r in scored if finite(r.scores.get("target_miou"))]
        rho = spearman([sign * r.scores[name] for r in labelled],
                       [r.scores["target_miou"] for r in labelled])
        out[name] = {"mode": DIRECTIONS[name], "spearman": rho, "picked_trial": picked.trial_id,
                     "picked_target_miou": picked.scores.get("target_miou"),
                     "trials": len(scored)}
    best = [r for r in ok if finite(r.scores.get("target_miou"))]
    if best and out:
        top = max(best, key=lambda r: r.scores["target_miou"])
        out["target_miou"] = {"mode": "max", "spearman": 1.0, "picked_trial": top.trial_id,
                              "picked_target_miou": top.scores["target_miou"], "trials": len(best)}
    return out


def format_selection(table: dict[str, dict]) -> str:
    if not table:
        return "model selection: no trial reported a validator (train.validators=false?)"
    lines = ["model selection (spearman: +1 = ranks trials as target mIoU does; target_miou "
             "uses target labels):",
             f"  {'validator':<12} {'mode':<4} {'spearman':>8}  {'picks':<12} {'its target mIoU':>15}"]
    for name, row in table.items():
        rho = "n/a" if row["spearman"] is None else f"{row['spearman']:+.3f}"
        miou = "n/a" if row["picked_target_miou"] is None else f"{row['picked_target_miou']:.2f}"
        lines.append(f"  {name:<12} {row['mode']:<4} {rho:>8}  {row['picked_trial']:<12} {miou:>15}")
    return "\n".join(lines)


def write_selection(rows, out_dir: Path) -> str:
    """selection.json and selection.png, each written atomically; returns the table."""
    table = selection(rows)
    if table:
        out_dir = Path(out_dir)
        atomic_write(out_dir / "selection.json", json.dumps(table, indent=2) + "\n")
        fig = _figure(rows, table)
        atomic_write(out_dir / "selection.png", lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return format_selection(table)


def _figure(rows, table: dict[str, dict]) -> Figure:
    """One panel per validator: its value against the trial's target mIoU, the pick starred."""
    names = [n for n in table if n != "target_miou"]
    fig = Figure(figsize=(4 * len(names), 3.6), layout="constrained")
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    ok = [r for r in rows if r.status != "ERROR"]
    for ax, name in zip(axes, names):
        pts = [r for r in ok if finite(r.scores.get(name)) and finite(r.scores.get("target_miou"))]
        ax.scatter([r.scores[name] for r in pts], [r.scores["target_miou"] for r in pts],
                   color="tab:blue", alpha=0.8)
        pick = [r for r in pts if r.trial_id == table[name]["picked_trial"]]
        if pick:
            ax.scatter([pick[0].scores[name]], [pick[0].scores["target_miou"]], marker="*", s=260,
                       color="gold", edgecolors="black", zorder=3)
        rho = table[name]["spearman"]
        ax.set_title(f"{name} ({table[name]['mode']}): rho {'n/a' if rho is None else f'{rho:+.2f}'}")
        ax.set_xlabel(f"select/best_{name}")
        ax.set_ylabel("target mIoU (val/best_mIoU)")
        ax.grid(alpha=0.3)
    fig.suptitle("label-free validators against target mIoU over trials (star: the validator's pick)")
    return fig
