"""One search trial (or one replicate of a confirmation): a Ray Train run inside a Tune trial."""

from __future__ import annotations

from pathlib import Path

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from t2sda.config import Config
from t2sda.ray_glue import driver, shared_warmup


def run_trial(params: dict, *, base: dict, exp_path: str, storage: str, workers: int,
              use_gpu: bool, cpus_per_worker: float, max_failures: int,
              warmup: dict | None = None) -> None:
    """One trial: the base config plus the sampled parameters, trained by Ray Train; from the
    shared warm-up's checkpoint (``warmup``: its config and checkpoint) when the trial fits it.

    A bad sampled value or a failed run raises: Tune records the trial as errored and the
    search goes on.
    """
    cfg = Config.from_dict(base).with_overrides(params)
    trial_id = tune.get_context().get_trial_id()
    run_dir = Path(exp_path) / f"train-{trial_id}"
    init_from = None
    if warmup is not None and shared_warmup.fits(Config.from_dict(warmup["config"]), cfg):
        init_from = warmup["checkpoint"]
    driver.fit(cfg, run_dir=run_dir, workers=workers, use_gpu=use_gpu, init_from=init_from,
               cpus_per_worker=cpus_per_worker, max_failures=max_failures,
               callbacks=[TuneReportCallback()], storage=storage,
               # Up to 10 more minutes for workers: another job on the cluster, or a stopped
               # trial whose placement group Ray has not yet released, may hold them.
               placement_retries=10)


def run_replicate(config: dict, **options) -> None:
    """A confirmation's run: Tune's grid hands it as ``config["run"]`` (label, seed, overrides)."""
    run_trial(config["run"]["overrides"], **options)
