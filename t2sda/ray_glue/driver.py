"""One T2S-DA run as a Ray Train ``TorchTrainer``: DDP over N workers, checkpoints, restarts.

The run directory is Ray's ``storage_path / name``: Ray keeps its checkpoints there (the best
``train.keep_checkpoints`` by val mIoU plus the latest) and rank 0 writes ``config.json``,
``metrics.jsonl`` and the TensorBoard events beside them. Fitting the same run directory
again resumes from its latest checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from pathlib import Path

import ray
import ray.train
from ray.exceptions import AuthenticationError
from ray.train.torch import TorchTrainer

from t2sda.config import Config, ConfigError
from t2sda.ray_glue import auth
from t2sda.ray_glue.worker import train_loop_per_worker
from t2sda.settings import fewest_workers

log = logging.getLogger("t2sda")


class TrainingFailed(RuntimeError):
    """A worker raised (after the allowed restarts); ``exit_code`` 1 for NaN, else 2."""

    def __init__(self, message: str, *, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def connect(*, dashboard: bool = True) -> bool:
    """Join the cluster in ``RAY_ADDRESS`` or the one ``ray start`` recorded on this machine,
    else start a local one (with the dashboard when asked: Ray Train's placement-group cleaner
    and Tune need its state API).

    Returns whether this process started the cluster. A cluster another program started with
    ``ray.init()`` is never joined (Ray's ``address="auto"`` would): its owner may stop it.
    """
    if ray.is_initialized():
        return False
    env = os.environ.get("RAY_ADDRESS")
    address = env or _ray_start_address()
    if address and address != "local" and not auth.listening(address):
        if env:
            raise ConfigError(f"RAY_ADDRESS={env!r}: no Ray cluster answers there (start it, or unset "
                              "RAY_ADDRESS to start a local one)")
        # A record `ray start` left behind when its cluster died without `ray stop`: joining
        # it would hang in ray.init's retries for minutes.
        log.warning("the `ray start` cluster recorded on this machine (%s) is gone (`ray stop` "
                    "clears the record); starting a local cluster", address)
        address = None
    if address and address != "local":  # "local": a fresh cluster, as in Ray
        try:
            auth.check_token(address)  # a refusal in one line now, not after 20 s of retries
            ray.init(address=address, log_to_driver=True)
        except (AuthenticationError, ConnectionError) as err:
            if auth.failure(err):
                raise ConfigError(auth.refused(address, auth.failure(err))) from None
            raise ConfigError(f"Ray cluster at {address!r} (RAY_ADDRESS or `ray start`): not "
                              f"reachable ({_first_line(err)})") from None
        log.info("connected to the Ray cluster at %s", address)
        return False
    # A cluster started here is this one machine, which no cloud reclaims: Ray Train's
    # preemption watcher (one more actor per run, started before the workers begin) has
    # nothing to watch. Workers inherit this environment; a user's own setting wins.
    os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
    port = None
    if dashboard and not os.environ.get(API_SERVER_ENV):
        # Ray Train's placement-group cleaner finds the state API by looking for "a" local Ray;
        # with two on this machine (two searches, a test cluster) it may watch the other one
        # and leak a stopped trial's workers. Naming the dashboard pins it to this one.
        port = _free_port()
        os.environ[API_SERVER_ENV] = f"http://127.0.0.1:{port}"
    # "local": never the cluster a `ray start` record names (ray.init would read it again).
    ray.init(address="local", include_dashboard=dashboard, **({"dashboard_port": port} if port else {}))
    return True



API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"  # where Ray's state API clients look first


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_start_address() -> str | None:
    """The address ``ray start --head`` wrote on this machine, if such a cluster is up."""
    try:
        from ray._private.utils import read_ray_address  # what ray.init() itself consults

        return read_ray_address() or None
    except Exception:  # another Ray layout: only RAY_ADDRESS joins a cluster
        return None


PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"  # Ray Train's switch for it

# Set to 1 to declare a cluster fixed-size when Ray cannot say whether it autoscales.
ASSUME_FIXED_ENV = "T2SDA_CLUSTER_FIXED"


def _max_resources() -> dict | None:
    """What an autoscaling cluster may grow to (None for a fixed cluster, e.g. a laptop).

    Fails closed: if Ray's (internal) answer cannot be read, an autoscaling cluster would look
    single-node and a node-local --storage would be accepted, so that is an error unless the
    user declares the cluster fixed-size.
    """
    try:
        from ray._private.state import state  # Ray Train's own pre-check reads the same

        return state.get_max_resources_from_cluster_config()
    except Exception as err:
        if os.environ.get(ASSUME_FIXED_ENV) == "1":
            return None
        raise ConfigError(f"cannot read the Ray cluster's autoscaling limits "
                          f"(ray._private.state.get_max_resources_from_cluster_config: "
                          f"{_first_line(err)}); if this cluster does not autoscale, set "
                          f"{ASSUME_FIXED_ENV}=1") from None


def capacity(present: dict | None = None, maximum: dict | None = None) -> dict:
    """CPU and GPU the cluster has now, or can grow to when it autoscales."""
    present = ray.cluster_resources() if present is None else present
    maximum = (_max_resources() if maximum is None else maximum) or {}
    return {k: max(present.get(k, 0), maximum.get(k, 0)) for k in ("CPU", "GPU")}


def autoscaling() -> bool:
    return bool(_max_resources())


def check_resources(*, workers: int | tuple[int, int], use_gpu: bool, cpus_per_worker: float,
                    concurrent: int = 1) -> None:
    """Fail now, with the missing resource named, rather than wait for workers never placed
    (an elastic run, ``workers`` = (min, max), needs room for its minimum)."""
    workers = fewest_workers(workers)
    need = {"CPU": workers * cpus_per_worker * concurrent}
    if use_gpu:
        need["GPU"] = workers * concurrent
    present, maximum = ray.cluster_resources(), _max_resources()
    limit = capacity(present, maximum)
    where = "can grow to" if maximum else "has"
    for name, amount in need.items():
        if amount > limit[name]:
            if name == "GPU" and limit[name] == 0:
                raise ConfigError(f"--gpu: the Ray cluster has no GPU (it {where} "
                                  f"{_fmt(present if not maximum else maximum)})")
            what = (f"{concurrent} trials x " if concurrent > 1 else "") + f"{workers} workers"
            per = f"{cpus_per_worker:g} CPU" if name == "CPU" else "1 GPU"
            raise ConfigError(f"{what} x {per} need {name}={amount:g}, but the Ray cluster "
                              f"{where} {name}={limit[name]:g}")


def _fmt(resources: dict) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in sorted(resources.items()) if k in ("CPU", "GPU"))


def has_ray_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a Ray Train run (its checkpoint snapshot or checkpoints)."""
    return run_dir.is_dir() and any(p.name.startswith("checkpoint") for p in run_dir.iterdir())


PLACEMENTS = {"pack": "PACK", "spread": "SPREAD"}  # --placement -> Ray's placement strategy
# Seconds between an elastic run's checks for room to grow (Ray's default 60).
RESIZE_ENV = "T2SDA_ELASTIC_RESIZE_S"
ELASTIC_PLACEMENT_RETRIES = 3


def scaling(workers: int | tuple[int, int], *, use_gpu: bool, cpus_per_worker: float,
            placement: str = "pack") -> ray.train.ScalingConfig:
    """Ray Train's ScalingConfig: ``workers`` N, or (MIN, MAX) for an elastic run; ``placement``
    ``pack`` (a trial's workers on as few nodes as fit: DDP traffic stays inside a node) or
    ``spread`` (one per node where there are nodes enough: a lost node costs a worker, not the
    whole group, when the run is elastic)."""
    if placement not in PLACEMENTS:
        raise ConfigError(f"--placement {placement!r}: expected one of {', '.join(PLACEMENTS)}")
    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    elastic = {}
    if isinstance(workers, tuple):
        raw = os.environ.get(RESIZE_ENV, "60")
        try:
            interval = float(raw)
        except ValueError:
            raise ConfigError(f"{RESIZE_ENV}={raw!r}: expected seconds") from None
        elastic = {"elastic_resize_monitor_interval_s": interval}
    return ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources,
                                   placement_strategy=PLACEMENTS[placement], **elastic)


def trainer(cfg: Config, *, run_dir: Path, workers: int | tuple[int, int], use_gpu: bool = False,
            cpus_per_worker: float = 1, max_failures: int = 3, callbacks: list | None = None,
            storage: str | None = None, placement_retries: int = 0, placement: str = "pack",
            stop_at: int | None = None, init_from: str | None = None) -> TorchTrainer:
    """The TorchTrainer for ``cfg`` in ``run_dir`` (absolute, on storage every node sees).

    With ``storage`` a URI (s3://bucket/experiment), Ray keeps the checkpoints there under
    ``run_dir.name``; rank 0 writes its logs to the local ``run_dir`` and copies them beside.
    ``placement_retries``: how many more times (60 s each) Ray Train's controller waits for
    the workers' resources before the run fails (inside a search, a finishing trial's
    resources may take a moment to come back). ``stop_at`` ends the run at that step;
    ``init_from`` is a checkpoint (path or URI) to start from while the run has none of its own.
    """
    remote = storage is not None and "://" in storage
    if isinstance(workers, tuple):
        # An elastic run restarted right after losing a node may ask for the workers it had
        # before Ray has noticed the node is gone; that placement times out (Ray's worker
        # group start timeout, 60 s by default) and the next try counts what is left.
        placement_retries = max(placement_retries, ELASTIC_PLACEMENT_RETRIES)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "run_dir": str(run_dir),
                           "sync_to": f"{storage}/{run_dir.name}" if remote else None,
                           "stop_at": stop_at, "init_from": init_from},
        scaling_config=scaling(workers, use_gpu=use_gpu, cpus_per_worker=cpus_per_worker,
                               placement=placement),
        run_config=ray.train.RunConfig(
            name=run_dir.name,
            storage_path=storage or str(run_dir.parent),
            # Worker failures restart the group from the latest checkpoint; the controller
            # (which waits for resources) gets a bounded number of retries: nothing waits forever.
            failure_config=ray.train.FailureConfig(max_failures=max_failures,
                                                   controller_failure_limit=placement_retries),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints,
                checkpoint_score_attribute="val/mIoU", checkpoint_score_order="max"),
            callbacks=callbacks,
        ),
    )


def fit(cfg: Config, *, run_dir: Path, **options) -> dict:
    """Run (or resume) training through Ray Train (``options``: those of :func:`trainer`);
    returns the last evaluation's metrics."""
    fit_result(cfg, run_dir=run_dir, **options)
    return last_metrics(run_dir)


def fit_result(cfg: Config, *, run_dir: Path, **options) -> ray.train.Result:
    """:func:`fit`, returning Ray's Result (its ``checkpoint`` is the latest one)."""
    run = trainer(cfg, run_dir=run_dir, **options)
    # In the main thread Ray Train installs a Ctrl-C handler that holds its controller actor;
    # left in place it keeps that actor (and its helpers) alive after the run, e.g. a search's
    # warm-up controller for the whole search. The previous handler comes back afterwards.
    main_thread = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT) if main_thread else None
    try:
        return run.fit()
    except ray.train.TrainingFailedError as err:
        raise _explain(err) from None
    finally:
        if main_thread and handler is not None:
            signal.signal(signal.SIGINT, handler)


def last_metrics(run_dir: Path) -> dict:
    """The last row of rank 0's metrics.jsonl ({} before the first evaluation)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1]) if lines else {}


def _explain(err: Exception) -> TrainingFailed:
    """One line from Ray's nested failure: the first worker's own error, or the controller's."""
    from t2sda.step import NonFiniteLossError

    failures = getattr(err, "worker_failures", None) or {}
    if failures:
        rank, cause = min(failures.items())
        cause = getattr(cause, "cause", None) or cause  # unwrap RayTaskError
        text = _first_line(cause)
        code = 1 if isinstance(cause, NonFiniteLossError) or "NonFiniteLossError" in str(cause) else 2
        return TrainingFailed(f"training failed on rank {rank}: {text}", exit_code=code)
    cause = getattr(err, "controller_failure", None) or err
    text = _first_line(cause)
    if "startup timed out" in str(cause):
        text = ("the workers could not be placed in time (not enough free CPU/GPU on the "
                "cluster?): " + text)
    return TrainingFailed(f"training failed: {text}")


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0][:300]}" if lines else type(err).__name__
