"""One search trial (or one replicate of a confirmation): a Ray Train run inside a Tune trial."""

from __future__ import annotations

from pathlib import Path

from ray import tune
from ray._common.constants import HEAD_NODE_RESOURCE_NAME
from ray.tune.integration.ray_train import TuneReportCallback

from t2sda.config import Config
from t2sda.ray_glue import driver, shared_warmup

# What a trial's driver function asks of Tune (Tune does not count the Train workers). No CPU:
# it only waits on its TorchTrainer (a CPU share, however small, would leave a full CPU short
# for the last trial's worker); a token of memory, as Tune wants some resource; and a place on
# the head node. Ray Train attaches the run's controller to the node of this function, and the
# head lives as long as the cluster, while worker nodes (spot, preemptible) may go at any time:
# a lost worker node then costs a restart from the last checkpoint, never the trial.
TRIAL_RESOURCES = {"cpu": 0, "memory": 64 * 2**20, HEAD_NODE_RESOURCE_NAME: 0.001}


def run_trial(params: dict, *, base: dict, exp_path: str, storage: str,
              workers: int | tuple[int, int], use_gpu: bool, cpus_per_worker: float,
              max_failures: int, placement: str = "pack", warmup: dict | None = None) -> None:
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
               callbacks=[TuneReportCallback()], storage=storage, placement=placement,
               # Up to 10 more minutes for workers: another job on the cluster, or a stopped
               # trial whose placement group Ray has not yet released, may hold them.
               placement_retries=10)


def run_replicate(config: dict, **options) -> None:
    """A confirmation's run: Tune's grid hands it as ``config["run"]`` (label, seed, overrides)."""
    run_trial(config["run"]["overrides"], **options)
