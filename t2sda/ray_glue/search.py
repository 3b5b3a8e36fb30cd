"""``tune.py``: a Ray Tune + Optuna search over T2S-DA; every trial is a Ray Train run.

One trial = a small driver function (0.01 CPU) that builds a ``TorchTrainer`` named after
the trial id under the experiment directory and fits it; ``TuneReportCallback`` forwards each
evaluation to Tune. Optuna (TPE, seeded, define-by-run spaces from ``tune_spaces/``) proposes
configs behind a concurrency limit; ASHA stops weak trials on the reported training step.
The search metric is a best-so-far value, so stopped and finished trials compare fairly: the
target validation mIoU (``--metric target_miou``, uses target labels) or a label-free validator
(``--metric snd`` etc., t2sda/validators.py); the end of a search scores every validator as a
selector against target mIoU (selection.json).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import optuna
import ray
from ray import tune
from ray.tune.schedulers import FIFOScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

import tune_spaces
from t2sda import validators
from t2sda.config import Config, ConfigError
from t2sda.presets import PRESETS, get_preset, search_preset
from t2sda.ray_glue import confirm, driver, exp_state, search_warmup, tune_settings
from t2sda.ray_glue.rungs import milestones
from t2sda.ray_glue.storage import check_storage
from t2sda.ray_glue.summary import summarize
from t2sda.ray_glue.trial import TRIAL_RESOURCES, run_trial
from t2sda.settings import flatten, most_workers, parse_workers

log = logging.getLogger("t2sda")
SEARCH_METRIC = {"val/mIoU": "val/best_mIoU"}  # the space's metric -> its best-so-far report


class UsageError(Exception):
    """Bad command-line input: one line, exit 2."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python tune.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--space", help="search space: " + ", ".join(tune_spaces.available()))
    p.add_argument("--list-spaces", action="store_true", help="describe every space and exit")
    p.add_argument("--preset", help=f"base config: {', '.join(PRESETS)} (default digits)")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override base config keys (the space's parameters are sampled on top); "
                        "the base is the preset with its search overrides, e.g. digits trials "
                        "train 900 steps: --set train.iters=1200 for its full run")
    p.add_argument("--num-samples", type=int, help="trials (default: the space's budget)")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: what the "
                   "cluster fits: GPUs, or CPUs, // (workers-per-trial x per-worker need))")
    p.add_argument("--workers-per-trial", default="1", metavar="N|MIN-MAX",
                   help="Ray Train workers per trial; MIN-MAX: elastic, each trial starts with what "
                   "fits and grows or shrinks with the cluster (default 1)")
    p.add_argument("--placement", choices=tuple(driver.PLACEMENTS), default="pack",
                   help="a trial's workers on as few nodes as fit (pack, default) or one per "
                   "node (spread)")
    p.add_argument("--cpus-per-worker", type=float, default=1, help="CPUs per Train worker")
    p.add_argument("--gpu", action="store_true", help="one GPU per Train worker (NCCL)")
    p.add_argument("--storage", default="runs/tune", help="experiments root: a path, or a URI "
                   "(s3://...) on a multi-node cluster (default: runs/tune)")
    p.add_argument("--name", help="experiment name (default: <space>-<preset>)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted experiment "
                   "under its stored settings (settings.json); a conflicting flag is refused")
    p.add_argument("--change-on-resume", action="store_true", help="with --resume: allow a "
                   "different base config (--set / --preset), listed and recorded in changes.jsonl")
    p.add_argument("--scheduler", choices=("asha", "none"),
                   help="early stopping (default asha)")
    p.add_argument("--grace-period", type=int, help="ASHA: steps before a trial may be stopped "
                   "(default: the space's)")
    p.add_argument("--reduction-factor", type=int, help="ASHA (default: the space's)")
    p.add_argument("--sampler", choices=("tpe", "random"),
                   help="Optuna sampler (default tpe; random: the baseline of "
                   "scripts/bench_search.py)")
    p.add_argument("--seed", type=int, help="Optuna sampler seed (default 0)")
    p.add_argument("--metric",
                   help="what ranks trials (and ASHA stops them by): target_miou (uses target "
                        "labels; default) or a label-free validator: "
                        + ", ".join(validators.LABEL_FREE))
    p.add_argument("--max-failures", type=int, default=1,
                   help="worker-group restarts per trial from its latest checkpoint")
    p.add_argument("--confirm", type=int, metavar="K", help="after the search, train the top K "
                   "configs and the preset's own point again with the same seeds and say whether "
                   "each beats the default beyond seed noise (default 1; 0: off)")
    p.add_argument("--confirm-seeds", type=int, metavar="N", help="seeds per confirmed config, "
                   "the search's own run counting as one where it trained alike (default 3)")
    p.add_argument("--confirm-seed-kind", choices=("auto", "adaptation", "full"),
                   help="adaptation: replicates share the warm-up and differ in adapt_seed; full: "
                   "in seed (init, warm-up, data); auto: adaptation with a shared warm-up")
    p.add_argument("--confirm-set", nargs="+", action="extend", metavar="KEY=VALUE",
                   help="confirm at another setting than the trials', e.g. train.iters=1200")
    p.add_argument("--no-shared-warmup", dest="shared_warmup", action="store_false",
                   help="train every trial's source-only warm-up itself (default: train it once "
                   "and start every trial that fits from it)")
    return p


def _check_args(args) -> None:
    if args.list_spaces:
        return
    if not args.space:
        raise UsageError("--space is required (available: " + ", ".join(tune_spaces.available()) + ")")
    try:
        args.workers_per_trial = parse_workers(args.workers_per_trial, "--workers-per-trial")
    except ConfigError as err:
        raise UsageError(str(err)) from None
    for flag in ("num_samples", "max_concurrent", "grace_period"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag.replace('_', '-')} {value}: must be >= 1")
    if args.cpus_per_worker <= 0:
        raise UsageError(f"--cpus-per-worker {args.cpus_per_worker:g}: must be > 0")
    if args.max_failures < 0:
        raise UsageError(f"--max-failures {args.max_failures}: must be >= 0")
    if args.metric is not None and args.metric not in validators.DIRECTIONS:
        raise UsageError(f"--metric {args.metric}: unknown (choose from "
                         f"{', '.join(validators.DIRECTIONS)})")
    if args.reduction_factor is not None and args.reduction_factor < 2:
        raise UsageError(f"--reduction-factor {args.reduction_factor}: must be >= 2")
    if args.confirm is not None and args.confirm < 0:
        raise UsageError(f"--confirm {args.confirm}: must be >= 0 (0: no confirmation)")
    if args.confirm_seeds is not None and args.confirm_seeds < 2:
        raise UsageError(f"--confirm-seeds {args.confirm_seeds}: a verdict needs at least 2 "
                         "seeds per config (a spread to compare against)")


def _defaults(space, base: Config, drawn: list) -> dict:
    """The base config's own value of every searched key that lies inside the space (``drawn``:
    sampled trials showing its ranges): tried first, so the search always holds the default
    as a reference point."""
    flat = flatten(base.to_dict())
    point = {}
    for trial in drawn:
        for name, dist in trial.distributions.items():
            value = flat[name]
            try:
                inside = dist._contains(dist.to_internal_repr(value))
            except (ValueError, TypeError):
                inside = False
            if inside:
                point.setdefault(name, value)
    outside = sorted({n for t in drawn for n in t.distributions} - set(point))
    if outside:
        log.warning("default point: %s outside the space, so not tried as given (sampled like "
                    "the other trials)", ", ".join(f"{n}={flat[n]!r}" for n in outside))
    return point


def _concurrency(args, num_samples: int) -> int:
    if args.max_concurrent:
        return args.max_concurrent
    have = driver.capacity()  # an autoscaling GPU cluster may start with no GPU node up
    unit = "GPU" if args.gpu else "CPU"
    # Room for each trial's largest worker group: an elastic trial may grow to its maximum.
    per_trial = most_workers(args.workers_per_trial) * (1 if args.gpu else args.cpus_per_worker)
    return max(1, min(num_samples, int(have.get(unit, 0) // per_trial)))


def _alive_nodes() -> int:
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def run(args) -> int:
    _check_args(args)
    if args.list_spaces:
        print(_list_spaces(args))
        return 0
    preset = search_preset(args.preset or "digits")  # bad input: before all else
    preset.with_overrides(args.set).with_overrides(args.confirm_set or [])  # as confirm applies it
    tune_spaces.load(args.space)
    name = args.name or f"{args.space}-{args.preset or 'digits'}"
    exp = exp_state.Experiment(args.storage, name)
    remote = exp.uri is not None
    if not remote:  # refuse before starting Ray: quick, and nothing written
        _check_experiment(exp.local, resume=args.resume)
    else:  # the bucket is reachable and writable, and holds what --resume needs (or nothing)
        check_storage(args.storage, num_nodes=2)
        exp.open(resume=args.resume, can_resume=lambda: tune.Tuner.can_restore(exp.uri))
    chosen = tune_settings.resolve(args, exp.local)  # settings.json: in the experiment (a copy)
    base = Config.from_dict(chosen["config"])
    space = tune_spaces.load(args.space, adaptation_steps=_adaptation_steps(base))
    metric, mode = _search_metric(args.metric, space, base)
    num_samples = args.num_samples or space.num_samples

    owned = not ray.is_initialized()  # else a caller's Ray, which it keeps (e.g. tests)
    started = driver.connect(dashboard=True)  # the state API cleans up stopped trials
    # An autoscaling cluster may grow past its present nodes: treat it as multi-node.
    nodes = 1 if started else max(_alive_nodes(), 2 if driver.autoscaling() else 1)
    storage = check_storage(args.storage, num_nodes=nodes, probe=not remote)
    exp_path = f"{storage}/{name}"
    concurrent = _concurrency(args, num_samples)
    driver.check_resources(workers=args.workers_per_trial, use_gpu=args.gpu,
                           cpus_per_worker=args.cpus_per_worker, concurrent=concurrent)

    # Rank 0 of each trial writes its logs to a local path (a bucket gets them copied).
    log_root = exp.local
    tune_settings.save(exp.local, chosen)
    exp.push("settings.json", "changes.jsonl")
    drawn = tune_spaces.draw(space, 100, seed=1)  # the space's parameters and ranges
    warmup = None
    if args.shared_warmup:
        base, warmup = search_warmup.run(args, base, drawn, exp, concurrent=concurrent, local=started)
    options = dict(workers=args.workers_per_trial, use_gpu=args.gpu, warmup=warmup,
                   cpus_per_worker=args.cpus_per_worker, max_failures=args.max_failures,
                   placement=args.placement)
    reference = _defaults(space, base, drawn)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base.to_dict(), exp_path=str(log_root),
                             storage=exp_path if remote else None, **options),
        TRIAL_RESOURCES)
    grace, rf = _grace(args, space, base), args.reduction_factor or space.reduction_factor
    if args.resume and tune.Tuner.can_restore(exp_path):
        log.info("resuming experiment %s", exp_path)
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=False)
        searcher = None
    else:
        searcher = OptunaSearch(space=space.define, metric=metric, mode=mode,
                                sampler=_sampler(args.sampler, args.seed, num_samples),
                                points_to_evaluate=[reference])
        # max_t one past the end: a trial that reaches train.iters ends by itself, so its
        # TorchTrainer shuts down cleanly (a STOP at the last report kills it mid-shutdown and
        # its workers' resources may linger until Ray notices).
        # The preset's own point always runs to the end: it is the reference of the verdict.
        scheduler = (confirm.ReferenceASHA(reference=reference, time_attr="step",
                                           max_t=base.train.iters + 1, grace_period=grace,
                                           reduction_factor=rf)
                     if args.scheduler == "asha" else FIFOScheduler())
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric=metric, mode=mode,  # the same pair as the searcher's (RAY.md)
                search_alg=ConcurrencyLimiter(searcher, max_concurrent=concurrent),
                scheduler=scheduler, num_samples=num_samples, max_concurrent_trials=concurrent,
                trial_dirname_creator=lambda trial: f"trial-{trial.trial_id}"),
            run_config=tune.RunConfig(name=name, storage_path=storage, verbose=1,
                                      progress_reporter=_reporter(metric, drawn)),
        )
    full = get_preset(args.preset).train.iters
    workers = args.workers_per_trial
    log.info("search %s on %s: %d trials of %d steps%s, %d at a time, %s worker(s) each (%s); "
             "TensorBoard: tensorboard --logdir %s", space.name, args.preset, num_samples,
             base.train.iters, f" (the preset's full run: {full})" if full != base.train.iters
             else "", concurrent, "-".join(map(str, workers)) if isinstance(workers, tuple)
             else workers, args.placement, exp_path)
    # Tune's classic table takes our columns; its newer one would print every reported metric.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    grid = tuner.fit()
    rungs = (milestones(grace, rf, base.train.iters + 1)
             if args.scheduler == "asha" else None)
    code, rows = summarize(grid, space, metric, mode, base, log_root, exp_path, searcher,
                           num_samples, full_iters=full, rungs=rungs)
    if code == 0 and args.confirm:
        confirm.after_search(args, rows, reference=reference, base=base, metric=metric, mode=mode,
                             exp_path=exp_path, log_root=log_root, remote=remote,
                             concurrent=concurrent, options=options, owned=owned,
                             warmup_for=lambda cfg: search_warmup.run(
                                 args, cfg, drawn, exp, sub="confirm", concurrent=concurrent,
                                 local=started))
    return code


def _list_spaces(args) -> str:
    """Every space as a search of ``--preset`` (with ``--set``) would run it: the ranges that
    depend on the trial's length cut to it, and ASHA's first rung where it would be."""
    preset = args.preset or "digits"
    base = search_preset(preset).with_overrides(args.set)
    steps = _adaptation_steps(base)
    head = (f"as searched on --preset {preset}: trials of {base.train.iters} steps"
            + (f", {steps} of them adapting" if steps else ""))
    spaces = []
    for name in tune_spaces.available():
        space = tune_spaces.load(name, adaptation_steps=steps)
        rung = _grace(args, space, base)
        spaces.append(tune_spaces.describe(space, first_rung=rung))
    return head + "\n\n" + "\n\n".join(spaces)


def _search_metric(name: str, space, base: Config) -> tuple[str, str]:
    """(reported best-so-far key, mode) that ranks trials: the space's own metric for
    ``target_miou`` (target labels), else the validator's ``select/best_<name>``."""
    if name != "target_miou":
        if not base.train.validators:
            raise UsageError(f"--metric {name}: needs train.validators=true")
        return validators.best_key(name), validators.DIRECTIONS[name]
    metric = SEARCH_METRIC.get(space.metric)
    if metric is None:
        raise UsageError(f"space {space.name}: metric {space.metric!r} is not reported "
                         f"(supported: {', '.join(SEARCH_METRIC)})")
    return metric, space.mode


def _adaptation_steps(base: Config) -> int | None:
    """Steps of self-training the preset runs (None for source-only training)."""
    if not base.method.self_training:
        return None
    return max(base.train.iters - base.method.self_training_start, 1)


def _grace(args, space, base: Config) -> int:
    """ASHA's first rung. Not before the first evaluation after adaptation starts: until then
    every trial of a method-parameter search trains the same source-only model, and ASHA
    would stop trials on ties."""
    if args.grace_period:
        grace = args.grace_period
    else:
        adapting = base.method.self_training_start + base.train.eval_every
        grace = max(space.grace_period, adapting if base.method.self_training else 0)
    return max(1, min(grace, base.train.iters))


def startup_trials(num_samples: int) -> int:
    """Random trials before TPE models the results: Optuna's default is 10, which in a search
    of 12 or fewer trials (the spaces' budgets) leaves TPE almost nothing to decide, so a
    third of the budget, at least 2 (the preset's own point is the first) and at most 10."""
    return max(2, min(10, num_samples // 3))


def _sampler(name: str, seed: int, num_samples: int) -> optuna.samplers.BaseSampler:
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials(num_samples))


def _reporter(metric: str, drawn: list) -> tune.CLIReporter:
    """Tune's progress table with the columns that matter (not 50 per-class IoUs)."""
    # Only parameters every trial draws: Tune's "current best" line looks each column up in
    # the best trial's config and fails on a conditional one that trial did not draw
    # (e.g. weight_warmup under a constant schedule). results.csv lists them all.
    names = sorted(set.intersection(*(set(t.params) for t in drawn))) if drawn else []
    return tune.CLIReporter(
        metric_columns={"step": "step", "val/mIoU": "mIoU",
                        metric: "best mIoU" if metric == "val/best_mIoU" else metric.split("/", 1)[1]},
        parameter_columns={n: n.rsplit(".", 1)[-1] for n in names},
        sort_by_metric=True, max_report_frequency=30)  # metric/mode come from TuneConfig


def _check_experiment(exp_dir: Path, *, resume: bool) -> None:
    # Interrupted during its shared warm-up, a search has no Tune state yet: it starts afresh
    # and the warm-up run resumes from its own latest checkpoint.
    if resume and not tune.Tuner.can_restore(str(exp_dir)) and not (exp_dir / "warmup").is_dir():
        raise UsageError(f"--resume: no experiment to resume at {exp_dir}")
    if not resume and exp_dir.exists() and any(exp_dir.iterdir()):
        raise UsageError(f"experiment {exp_dir} exists; pass --resume to continue it, or "
                         "choose another --name")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("T2SDA_LOG", "INFO"), format="%(message)s",
                        stream=sys.stdout)
    args = _parser().parse_args(argv)
    try:
        return run(args)
    except (ConfigError, UsageError) as err:
        print(f"tune.py: error: {err}", file=sys.stderr)
        return 2
    except driver.TrainingFailed as err:
        print(f"tune.py: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("tune.py: interrupted; continue with --resume", file=sys.stderr)
        return 130
