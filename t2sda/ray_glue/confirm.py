"""``tune.py --confirm K``: after the search, the top K configs and the preset's own point are
trained again with the same seeds (paired), in parallel as one Tune grid under
``<experiment>/confirm``, and compared against the default (verdict.py, stats.py).

Replicate k of a config sets ``adapt_seed=k`` (seed kind ``adaptation``: every replicate
starts from the search's shared warm-up and differs only in what follows) or ``seed=base+k``
(kind ``full``: initialisation, warm-up and data all change). Replicate 0 is the search's own
run of the config when that run was trained the same way (to the end, no ``--confirm-set``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

import t2sda.remote
from t2sda.config import Config
from t2sda.ray_glue import verdict
from t2sda.ray_glue.report import TrialRow
from t2sda.ray_glue.trial import TRIAL_RESOURCES, run_replicate

log = logging.getLogger("t2sda")


def is_reference(params: dict, reference: dict) -> bool:
    """Whether sampled ``params`` are the preset's own point (floats compared to 1e-12)."""
    if not reference:
        return False
    for key, value in reference.items():
        mine = params.get(key)
        if isinstance(value, float) and isinstance(mine, (int, float)):
            if not math.isclose(mine, value, rel_tol=1e-12, abs_tol=1e-12):
                return False
        elif mine != value:
            return False
    return True


class ReferenceASHA(ASHAScheduler):
    """ASHA that never stops the preset's own point: it is the reference every verdict is
    drawn against, so it runs to the end whatever order trials reach a rung in. Its values
    are still recorded at the rungs and set the cut-offs for the others."""

    def __init__(self, *, reference: dict, **kwargs):
        super().__init__(**kwargs)
        self._reference = dict(reference)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP and is_reference(trial.config, self._reference):
            self._num_stopped -= 1
            return TrialScheduler.CONTINUE
        return action


def candidates(rows: list[TrialRow], reference: dict, *, top: int, mode: str):
    """(labels, label -> row, default ranked first?): the default first, then the top ``top``
    other trials by the search metric; errored and silent trials never count."""
    ranked = sorted((r for r in rows if r.status != "ERROR" and r.value is not None
                     and math.isfinite(r.value)), key=lambda r: r.value, reverse=mode == "max")
    ref = next((r for r in ranked if is_reference(r.params, reference)), None)
    if ref is None:
        ref = next((r for r in rows if is_reference(r.params, reference)), None)
    others = [r for r in ranked if r is not ref][:top]
    chosen = {verdict.DEFAULT: ref, **{f"#{i}": r for i, r in enumerate(others, 1)}}
    first = bool(ranked) and ranked[0] is ref
    return list(chosen), chosen, first


def seed_overrides(kind: str, base: Config, k: int) -> dict:
    return {"adapt_seed": k} if kind == "adaptation" else {"seed": base.seed + k}


def reusable(row: TrialRow | None, base: Config, changed: list[str]) -> bool:
    """The search's own run counts as replicate 0 when trained as a replicate would be."""
    return (row is not None and not changed and row.status == "TERMINATED"
            and row.steps >= base.train.iters and row.value is not None)


def after_search(args, rows: list[TrialRow], *, reference: dict, base: Config, metric: str,
                 mode: str, exp_path: str, log_root: Path, remote: bool, concurrent: int,
                 options: dict, warmup_for: Callable, owned: bool = False) -> dict | None:
    """tune.py's confirmation stage: run it, print the table and, last, the verdict line.
    ``owned``: this process started or joined Ray itself, so it may disconnect first."""
    kind = args.confirm_seed_kind
    if kind == "auto":
        kind = "adaptation" if options.get("warmup") is not None else "full"
    result = run(rows, reference=reference, top=args.confirm, seeds=args.confirm_seeds, kind=kind,
                 confirm_set=list(args.confirm_set or []), base=base, metric=metric, mode=mode,
                 exp_path=exp_path, log_root=log_root, remote=remote, concurrent=concurrent,
                 trial_options=options, resume=args.resume, warmup_for=warmup_for)
    if result is None:
        return None
    if owned:  # its workers' last log lines arrive late: the verdict must come after them
        ray.shutdown()
    if remote:  # the verdict beside the trials in the bucket
        t2sda.remote.upload(log_root, exp_path, names=["confirm.json", "confirm.png", "best_config.json"])
    print(verdict.format_table(result))
    print(f"confirmation: {log_root}/confirm.json, confirm.png; TensorBoard: "
          f"tensorboard --logdir {log_root}/confirm/tensorboard")
    print(result["verdict"])
    return result


def run(rows: list[TrialRow], *, reference: dict, top: int, seeds: int, kind: str,
        confirm_set: list[str], base: Config, metric: str, mode: str, exp_path: str,
        log_root: Path, remote: bool, concurrent: int, warmup_for: Callable, trial_options: dict,
        resume: bool) -> dict | None:
    """Train the replicates (or resume them), compare, write the files; returns the verdict
    dict, or None when there is no default to compare against."""
    labels, chosen, first = candidates(rows, reference, top=top, mode=mode)
    if chosen[verdict.DEFAULT] is None:
        print("confirmation: skipped, the search has no run of the preset's own point")
        return None
    # Confirming at another setting: its own shared warm-up where the search shared one.
    cbase, warmup = base, trial_options.get("warmup")
    if confirm_set:
        cbase, warmup = (warmup_for(base.with_overrides(confirm_set)) if warmup is not None
                         else (base.with_overrides(confirm_set), None))
    replicates, runs = [], []
    for label in labels:
        row = chosen[label]
        for k in range(seeds):
            seed = seed_overrides(kind, base, k)
            [value] = seed.values()
            if k == 0 and reusable(row, base, confirm_set):
                replicates.append({"config": label, "seed": value, "value": row.value,
                                   "target_miou": row.scores.get("target_miou"),
                                   "run_dir": row.run_dir, "from": "search"})
                continue
            runs.append({"label": label, "seed": value, "trial_id": row.trial_id,
                         "overrides": {**row.params, **seed}})
    where = f"{exp_path}/confirm"
    log.info("confirmation: %d configs x %d %s seeds, %d runs to train (%d from the search), "
             "%d at a time, in %s", len(labels), seeds, kind, len(runs), len(replicates),
             concurrent, where)
    if runs:
        replicates += _train(runs, cbase, metric, mode, where=where, log_root=log_root / "confirm",
                             remote=remote, concurrent=concurrent, options={**trial_options,
                                                                            "warmup": warmup},
                             resume=resume)
    info = {label: {"trial_id": chosen[label].trial_id, "params": chosen[label].params,
                    "search_value": chosen[label].value} for label in labels}
    values = sorted({r["seed"] for r in replicates})
    result = verdict.confirm(replicates, labels, metric=metric, mode=mode, kind=kind, seeds=values,
                             candidates=info, default_ranked_first=first)
    result["confirm_set"] = confirm_set
    verdict.write(result, log_root)
    verdict.tensorboard(result, log_root / "confirm" / "tensorboard")
    return result


def _train(runs: list[dict], base: Config, metric: str, mode: str, *, where: str, log_root: Path,
           remote: bool, concurrent: int, options: dict, resume: bool) -> list[dict]:
    trainable = tune.with_resources(
        tune.with_parameters(run_replicate, base=base.to_dict(), exp_path=str(log_root),
                             storage=where if remote else None, **options),
        TRIAL_RESOURCES)  # as the search's trials: the workers hold the CPUs
    if resume and tune.Tuner.can_restore(where):
        tuner = tune.Tuner.restore(where, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space={"run": tune.grid_search(runs)},
            tune_config=tune.TuneConfig(metric=metric, mode=mode, max_concurrent_trials=concurrent,
                                        trial_dirname_creator=lambda t: f"trial-{t.trial_id}"),
            run_config=tune.RunConfig(name="confirm", storage_path=where.rsplit("/", 1)[0], verbose=1,
                                      progress_reporter=tune.CLIReporter(
                                          metric_columns={"step": "step", metric: "value"},
                                          parameter_columns={"run/label": "config", "run/seed": "seed"},
                                          max_report_frequency=30)))
    out = []
    for result in tuner.fit():
        run = (result.config or {}).get("run", {})
        metrics = result.metrics or {}
        value = metrics.get(metric)
        trial_id = Path(result.path).name.removeprefix("trial-")
        out.append({"config": run.get("label"), "seed": run.get("seed"),
                    "value": value if result.error is None else None,
                    "target_miou": metrics.get("val/best_mIoU") if result.error is None else None,
                    "run_dir": f"{where if remote else log_root}/train-{trial_id}", "from": "confirm",
                    **({"error": str(result.error).strip().splitlines()[-1][:300]} if result.error else {})})
    return out
