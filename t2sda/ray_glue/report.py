"""What a finished (or interrupted) search leaves behind: CSV, best config, plot, importances.

No Ray here on purpose: the driver converts Tune's results into ``TrialRow``, so everything
below is tested on fabricated rows and an in-memory Optuna study.
Every file is written beside its final name and renamed over it, so a search killed mid-write
leaves the previous file whole, never a truncated one.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

LOG_SPAN = 10**1.5  # a numeric parameter spanning more than 1.5 decades gets a log x-axis


@dataclasses.dataclass
class TrialRow:
    trial_id: str
    status: str  # TERMINATED | ERROR | RUNNING | PENDING | STOPPED (ASHA stops show as TERMINATED)
    params: dict[str, object]  # dotted config key -> sampled value
    value: float | None  # best-so-far metric, None if never reported
    steps: int  # last training step reported
    config: dict | None  # the trial's full resolved config (Config.to_dict())
    error: str | None = None
    # Best-so-far target mIoU ("target_miou") and label-free validators (t2sda/validators.py).
    scores: dict[str, float] = dataclasses.field(default_factory=dict)
    run_dir: str | None = None  # the trial's training run dir (``evaluate --run-dir`` takes it)
    checkpoint: str | None = None  # its best checkpoint dir by val mIoU, None if none is local


def best_checkpoint(run_dir: Path) -> str | None:
    """The checkpoint ``evaluate --run-dir`` would pick (highest val mIoU), None without one."""
    from t2sda.checkpoint import CheckpointError
    from t2sda.inference import pick_checkpoint

    try:
        return str(pick_checkpoint(Path(run_dir), "best"))
    except CheckpointError:
        return None


def write_results(rows: list[TrialRow], exp_dir: Path, *, metric: str, mode: str, top: int = 5) -> str:
    """Write results.csv, best_config.json (when the best trial carries its config) and
    summary.png; return the top-trials table.

    Errored trials are listed but never ranked: a config that crashed would crash again when
    retrained from best_config.json, whatever it reported before.
    """
    exp_dir = Path(exp_dir)
    exp_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(exp_dir / "results.csv", _csv_text(rows))
    ranked = _ranked(rows, mode)
    if not ranked:
        return f"no trial reported {metric}: " + _counts(rows)
    best = ranked[0]
    if best.config is not None:
        record = {"trial_id": best.trial_id, "metric": metric, "value": best.value,
                  "params": best.params, "config": best.config}
        atomic_write(exp_dir / "best_config.json", json.dumps(record, indent=2) + "\n")
    if _param_names(rows):
        fig = _summary_figure(rows, best, metric)
        atomic_write(exp_dir / "summary.png", lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    text = _table(ranked[:top], len(ranked), metric, mode, exp_dir) + "\n" + _counts(rows)
    if best.checkpoint and best.run_dir:
        text += f"\nevaluate the best: python -m t2sda evaluate --run-dir {best.run_dir}"
    return text


def _ranked(rows: list[TrialRow], mode: str) -> list[TrialRow]:
    """Trials that did not error and reported a finite value, best first (ties keep trial order)."""
    scored = [r for r in rows if r.status != "ERROR" and _has_value(r)]
    return sorted(scored, key=lambda r: r.value, reverse=mode == "max")


def importances(study: optuna.Study, exp_dir: Path) -> dict[str, float]:
    """Optuna's parameter importances (default evaluator), saved to importances.json.

    Only parameters that took two or more values count: one that never varied explains
    nothing. With fewer than two completed trials or nothing varying, returns {} and writes
    nothing.
    """
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    values: dict[str, set[str]] = {}
    for trial in complete:
        for name, value in trial.params.items():
            values.setdefault(name, set()).add(repr(value))
    varying = [name for name, seen in values.items() if len(seen) > 1]
    if len(complete) < 2 or not varying:
        return {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "too few trials" notes at small budgets
        result = optuna.importance.get_param_importances(study, params=varying)
    result = dict(sorted(result.items(), key=lambda kv: kv[1], reverse=True))
    atomic_write(Path(exp_dir) / "importances.json", json.dumps(result, indent=2) + "\n")
    return result


def format_importances(imp: dict[str, float]) -> str:
    if not imp:
        return "parameter importances: need 2+ completed trials and a parameter that varied"
    width = max(map(len, imp))
    lines = ["parameter importances (sum to 1):"]
    lines += [f"  {name:<{width}}  {share:5.3f}  {'#' * round(share * 40)}" for name, share in imp.items()]
    return "\n".join(lines)


def _has_value(row: TrialRow) -> bool:
    return row.value is not None and math.isfinite(row.value)


def _param_names(rows: list[TrialRow]) -> list[str]:
    """The union of searched parameters, in the order trials first drew them."""
    return list(dict.fromkeys(name for row in rows for name in row.params))


def atomic_write(path: Path, content: str | Callable[[Path], None]) -> None:
    """Write text (or call ``content(tmp)``) to a temp file beside ``path``, then rename it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if isinstance(content, str):
            tmp.write_text(content)
        else:
            content(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _csv_text(rows: list[TrialRow]) -> str:
    names = _param_names(rows)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    scores = list(dict.fromkeys(name for row in rows for name in row.scores))
    writer.writerow(["trial_id", "status", "value", "steps", *scores, *names, "run_dir",
                     "checkpoint", "error"])
    for r in rows:
        params = [r.params.get(name, "") for name in names]  # "" where a branch skipped it
        writer.writerow([r.trial_id, r.status, _blank(r.value), r.steps,
                         *(_blank(r.scores.get(name)) for name in scores), *params,
                         _blank(r.run_dir), _blank(r.checkpoint), _blank(r.error)])
    return out.getvalue()


def _blank(value):
    return "" if value is None else value


def _short_names(names: list[str]) -> dict[str, str]:
    """Last dotted part (``pull_temperature``) unless two sections share it."""
    tails = [name.rsplit(".", 1)[-1] for name in names]
    return {name: tail if tails.count(tail) == 1 else name for name, tail in zip(names, tails)}


def _compact(params: dict[str, object], short: dict[str, str]) -> str:
    return " ".join(
        f"{short[k]}={v:.4g}" if isinstance(v, float) else f"{short[k]}={v}" for k, v in params.items()
    )


def _where(checkpoint: str | None, exp_dir: Path) -> str:
    """A checkpoint dir relative to the experiment dir when inside it; "-" when unknown."""
    if not checkpoint:
        return "-"
    path = Path(checkpoint)
    return path.relative_to(exp_dir).as_posix() if path.is_relative_to(exp_dir) else checkpoint


def _table(shown: list[TrialRow], total: int, metric: str, mode: str, exp_dir: Path) -> str:
    short = _short_names(_param_names(shown))
    id_width = max(5, *(len(r.trial_id) for r in shown))
    value_width = max(8, len(metric))
    where = [_where(r.checkpoint, exp_dir) for r in shown]
    where_width = max(10, *map(len, where))
    lines = [
        f"top {len(shown)} of {total} trials by {metric} ({mode})",
        f"{'rank':>4}  {'trial':<{id_width}}  {metric:>{value_width}}  {'steps':>6}  "
        f"{'checkpoint':<{where_width}}  params",
    ]
    for rank, (r, w) in enumerate(zip(shown, where), 1):
        lines.append(f"{rank:>4}  {r.trial_id:<{id_width}}  {r.value:>{value_width}.4g}  "
                     f"{r.steps:>6}  {w:<{where_width}}  {_compact(r.params, short)}")
    return "\n".join(lines)


def _counts(rows: list[TrialRow]) -> str:
    """How many trials errored (with their ids) or never reported, out of all of them."""
    errored = [r.trial_id for r in rows if r.status == "ERROR"]
    silent = sum(1 for r in rows if r.status != "ERROR" and not _has_value(r))
    text = f"{len(errored)} of {len(rows)} trials errored" + (f" ({', '.join(errored)})" if errored else "")
    return text + (f"; {silent} reported no value" if silent else "")


def _summary_figure(rows: list[TrialRow], best: TrialRow, metric: str) -> Figure:
    names = _param_names(rows)
    cols = min(3, len(names))
    nrows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.3 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax, name in zip(axes, names):
        _panel(ax, rows, best, name, metric)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    handles = [
        Line2D([], [], ls="", marker="o", color="tab:blue", label="trial"),
        Line2D([], [], ls="", marker="x", color="tab:red", label="errored (no value: at the bottom)"),
        Line2D([], [], ls="", marker="*", markersize=14, color="gold", markeredgecolor="black",
               label=f"best ({best.trial_id})"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=3)
    fig.suptitle(f"{metric} per trial against each searched parameter")
    return fig


def _panel(ax, rows: list[TrialRow], best: TrialRow, name: str, metric: str) -> None:
    """One parameter: trials that drew it, placed by value; categories get evenly spaced slots."""
    drawn = [r for r in rows if name in r.params and (_has_value(r) or r.status == "ERROR")]
    raw = [r.params[name] for r in drawn]
    if any(isinstance(v, (str, bool)) for v in raw):
        categories = sorted({str(v) for v in raw})
        xs = [categories.index(str(v)) for v in raw]
        ax.set_xticks(range(len(categories)), categories)
        ax.set_xlim(-0.5, len(categories) - 0.5)
    else:
        xs = raw
        if xs and min(xs) > 0 and max(xs) / min(xs) > LOG_SPAN:
            ax.set_xscale("log")
            # matplotlib labels every minor tick (2x10^-2, 3x10^-2 ...) when one decade tick
            # is in view, and they overprint: label 1-2-5 steps on short spans, decades on long.
            short = math.log10(max(xs) / min(xs)) <= 2.5
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0) if short else (1.0,)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
    points = list(zip(drawn, xs))
    fine = [(x, r.value) for r, x in points if r.status != "ERROR"]
    ax.scatter([x for x, _ in fine], [v for _, v in fine], color="tab:blue", alpha=0.8)
    for r, x in points:
        if r.status == "ERROR" and _has_value(r):
            ax.scatter([x], [r.value], color="tab:red", marker="x", s=60)
        elif r.status == "ERROR":  # y in axes coordinates: the bottom edge, whatever the values
            ax.scatter([x], [0.04], color="tab:red", marker="x", s=60, transform=ax.get_xaxis_transform())
        if r is best:
            ax.scatter([x], [r.value], marker="*", s=260, color="gold", edgecolors="black", zorder=3)
    ax.margins(y=0.12)  # room below the data for errored trials pinned to the bottom edge
    ax.set_xlabel(name)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
