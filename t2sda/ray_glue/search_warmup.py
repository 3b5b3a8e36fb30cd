"""A search's shared warm-up on the cluster: trained once (or found done) before the trials.

The rules (which configs may share it) are in t2sda/ray_glue/shared_warmup.py, without Ray;
this runs it through Ray Train and keeps its record (``warmup.json``) with the experiment.
"""

from __future__ import annotations

import logging
from pathlib import Path

from t2sda.config import Config
from t2sda.ray_glue import driver, exp_state, shared_warmup

log = logging.getLogger("t2sda")


def run(args, base: Config, drawn: list, exp: exp_state.Experiment, *, sub: str = "",
        concurrent: int = 1, local: bool = False) -> tuple[Config, dict | None]:
    """Train the source-only warm-up once (or find it done) when the space allows; returns the
    trials' base config (with ``teacher_reset`` if the space needs it) and the warm-up.
    ``sub``: a part of the experiment with a warm-up of its own (``confirm``).

    A record whose checkpoint is gone (a bucket emptied, a prefix changed, a directory
    removed) is stale: the warm-up is trained again rather than every trial failing on it.

    The warm-up runs alone, so on a ``local`` CPU-only cluster (one node, started by this
    search) its workers take the CPUs that ``concurrent`` trials will share: Ray gives a worker
    as many threads as CPUs (unless train.threads is set), which changes results by float
    rounding only (step 600 of digits: 33.77 against 33.84 mIoU on one thread). GPU workers
    keep one GPU each (more workers would change the global batch), and on a cluster of several
    nodes a wider worker might fit no node, so there it takes one trial's."""
    searched = {name for trial in drawn for name in trial.distributions}
    cfg, why = shared_warmup.plan(base, searched)
    if cfg is None:
        log.info("shared warm-up: off, %s", why)
        return base, None
    start = cfg.method.self_training_start
    log_root = exp.local / sub if sub else exp.local
    storage = (f"{exp.uri}/{sub}" if sub else exp.uri) if exp.uri else None
    found = shared_warmup.load_record(log_root, cfg)
    if found is not None and not exp_state.checkpoint_exists(found):
        log.warning("shared warm-up: %s names %s, which is not there any more; training the "
                    "warm-up again", log_root / shared_warmup.RECORD, found)
        found = None
    if found is None:
        log.info("shared warm-up: training steps 0-%d once for every trial (%s; "
                 "--no-shared-warmup turns this off)", start, why)
        cpus = args.cpus_per_worker * (concurrent if local and not args.gpu else 1)
        result = driver.fit_result(cfg, run_dir=log_root / "warmup", workers=args.workers_per_trial,
                                   use_gpu=args.gpu, cpus_per_worker=cpus, placement=args.placement,
                                   max_failures=args.max_failures, storage=storage, stop_at=start)
        if result.checkpoint is None:
            raise driver.TrainingFailed(f"shared warm-up in {log_root / 'warmup'}: no checkpoint "
                                        "was saved; rerun with --no-shared-warmup")
        name = Path(result.checkpoint.path).name
        found = f"{storage}/warmup/{name}" if storage else result.checkpoint.path
        shared_warmup.save_record(log_root, cfg, found, driver.last_metrics(log_root / "warmup"))
        exp.push(f"{sub}/{shared_warmup.RECORD}" if sub else shared_warmup.RECORD)
    else:
        log.info("shared warm-up: reusing %s (step %d)", found, start)
    return cfg, {"config": cfg.to_dict(), "checkpoint": found}
