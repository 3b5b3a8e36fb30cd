"""The end of a search (``tune.py``): one row per trial from Tune's results, the files of
report.py and selection.py, importances, and what to run next. Imports Ray (Tune's state)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from ray import tune
from ray.tune.search.optuna import OptunaSearch

from t2sda import remote, validators
from t2sda.config import Config, ConfigError
from t2sda.ray_glue import report, selection
from t2sda.ray_glue.rungs import write_rungs

log = logging.getLogger("t2sda")


def summarize(grid, space, metric: str, mode: str, base: Config, out_dir: Path, exp_path: str,
              searcher, num_samples: int, full_iters: int | None = None,
              rungs: list[int] | None = None) -> tuple[int, list[report.TrialRow]]:
    """The end of a search: results.csv, best_config.json, selection, importances, ASHA's
    rungs against the end (``rungs``: its milestones, None without ASHA), hints. Returns the
    exit code (0 when some trial reported a value) and the trials' rows. ``full_iters``: the
    preset's own length, named in the hints when the trials trained a shorter run."""
    rows, histories = [], {}
    # Tune's saved status per trial: after a Ctrl-C the live grid calls unfinished trials
    # terminated, the saved experiment state knows they were still running.
    status = {t.trial_id: t.status for t in tune.ExperimentAnalysis(exp_path).trials}
    for result in grid:
        trial_id = Path(result.path).name.removeprefix("trial-")
        params = {k: v for k, v in (result.config or {}).items()}
        config = _trial_config(base, params, trial_id)
        value = (result.metrics or {}).get(metric)
        histories[trial_id] = _history(result, metric)
        rows.append(report.TrialRow(
            trial_id=trial_id,
            status="ERROR" if result.error else _saved_status(status, trial_id),
            params=params,
            value=value if isinstance(value, (int, float)) and math.isfinite(value) else None,
            steps=int((result.metrics or {}).get("step") or 0),
            config=config,
            error=_first_line(result.error) if result.error else None,
            scores=_scores(result.metrics or {}),
            run_dir=f"{exp_path}/train-{trial_id}",
            # Checkpoints in a bucket are not listed here; evaluate reads local dirs.
            checkpoint=None if "://" in exp_path else report.best_checkpoint(
                Path(exp_path) / f"train-{trial_id}"),
        ))
    out_dir.mkdir(parents=True, exist_ok=True)
    print(report.write_results(rows, out_dir, metric=metric, mode=mode))
    print(selection.write_selection(rows, out_dir))
    study = _study(searcher, exp_path)
    if study is not None:
        print(report.format_importances(report.importances(study, out_dir)))
    if rungs:
        print(write_rungs(histories, out_dir, iters=base.train.iters, rungs=rungs, mode=mode))
    if "://" in exp_path:  # results beside the trials in the bucket: the files written here,
        # not the trials' local logs (the bucket's own copies are the complete ones)
        remote.upload(out_dir, exp_path, names=sorted(p.name for p in out_dir.iterdir() if p.is_file()))
    print(f"results: {out_dir}/results.csv, best_config.json, summary.png, selection.json\n"
          f"train the best: python -m t2sda train --config {out_dir}/best_config.json\n"
          f"TensorBoard:    tensorboard --logdir {exp_path}")
    if full_iters and full_iters > base.train.iters:
        print(f"the trials trained {base.train.iters} steps, the preset {full_iters}: its full "
              f"run is the command above plus --set train.iters={full_iters}")
    unfinished = len(rows) < num_samples or any(r.status not in ("TERMINATED", "ERROR") for r in rows)
    if unfinished:
        print(f"the search stopped before its {num_samples} trials ended; continue it with the "
              "same command plus --resume")
    return 0 if any(r.value is not None and r.status != "ERROR" for r in rows) else 1, rows


def _history(result, metric: str) -> list[tuple[int, float]]:
    """(step, value) of every report of the trial, as Tune (and ASHA) saw them."""
    frame = result.metrics_dataframe
    if frame is None or "step" not in frame or metric not in frame:
        return []
    out = []
    for step, value in zip(frame["step"], frame[metric]):
        try:
            step, value = float(step), float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(step) and math.isfinite(value):
            out.append((int(step), value))
    return out


def _scores(metrics: dict) -> dict[str, float]:
    """A trial's last report -> best-so-far target mIoU and validators, by validator name."""
    out = {}
    for name in validators.DIRECTIONS:
        value = metrics.get(validators.best_key(name))
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[name] = float(value)
    return out


def _trial_config(base: Config, params: dict, trial_id: str) -> dict | None:
    """The trial's full config, or None (with a warning naming the trial and the key) when its
    parameters do not make a valid one: such a trial cannot go to best_config.json."""
    try:
        return base.with_overrides(params).to_dict()
    except ConfigError as err:
        log.warning("trial %s: its parameters make no valid config (%s); it cannot be "
                    "written to best_config.json", trial_id, err)
        return None


def _saved_status(saved: dict[str, str], trial_id: str) -> str:
    """The trial's status in the saved experiment state; UNKNOWN (an unfinished trial, so the
    --resume hint shows) when it is not there, never TERMINATED by default."""
    if trial_id in saved:
        return saved[trial_id]
    log.warning("trial %s: not in the saved experiment state; counted as unfinished", trial_id)
    return "UNKNOWN"


def _study(searcher, exp_path: str):
    """The Optuna study: the live searcher's, or (after --resume) the one Tune saved."""
    if searcher is None:
        searcher = OptunaSearch()
        try:
            if "://" in exp_path:  # Tune's restore reads a local directory: copy its state here
                import tempfile

                local = tempfile.mkdtemp(prefix="t2sda-searcher-")
                remote.download(exp_path, local, keep=lambda rel: rel.startswith("searcher-state"))
                exp_path = local
            searcher.restore_from_dir(exp_path)
        except Exception as err:  # no searcher state saved: importances are optional
            log.warning("no Optuna state to read importances from (%s)", _first_line(err))
            return None
    return getattr(searcher, "_ot_study", None)


def _first_line(err) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[-1] if text else ''}"[:300]
