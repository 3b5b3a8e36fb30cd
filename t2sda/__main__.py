"""Command line: ``python -m t2sda train --preset digits [--set key=value ...]``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from t2sda import dist, settings
from t2sda.checkpoint import CheckpointError, latest
from t2sda.cli import evaluate as evaluate_cli
from t2sda.cli import export as export_cli
from t2sda.cli import predict as predict_cli
from t2sda.config import Config, ConfigError
from t2sda.data import check as check_data
from t2sda.presets import PRESETS, get_preset

log = logging.getLogger("t2sda")


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m t2sda", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run one T2S-DA training (no search)")
    source = train.add_mutually_exclusive_group()
    source.add_argument("--preset", help=f"one of: {', '.join(PRESETS)} (default digits)")
    source.add_argument("--config", help="a config.json (e.g. a run's, or tune's best_config.json)")
    train.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                       help="override config keys, e.g. --set method.pull_weight=0 seed=1")
    train.add_argument("--run-dir", help="where config, metrics, TensorBoard events and "
                       "checkpoints go (default: runs/<preset>-<time>)")
    train.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                       help="continue from CHECKPOINT, or from the run dir's latest without one; "
                       "the run's config.json is reused (a different --preset/--config/--set "
                       "is refused)")
    train.add_argument("--change-on-resume", action="store_true", help="with --resume: allow "
                       "a config that differs from the run's (listed, and recorded in "
                       "changes.jsonl)")
    train.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if "
                       "available, else cpu)")
    ray_args = train.add_argument_group("Ray Train (DDP over workers; global batch = "
                                        "data.batch_size x workers, see optim.lr_scaling)")
    ray_args.add_argument("--workers", default="0", metavar="N|MIN-MAX", help="Ray Train workers; "
                          "0 (default) trains in this process; MIN-MAX: elastic, the run continues "
                          "on fewer workers when a node is lost and grows back when one returns. "
                          "Joins RAY_ADDRESS / a `ray start` cluster, else starts a local one. "
                          "Re-running on the same --run-dir resumes")
    ray_args.add_argument("--placement", choices=("pack", "spread"), default="pack",
                          help="workers on as few nodes as fit (pack, default) or one per node "
                          "(spread)")
    ray_args.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL)")
    ray_args.add_argument("--cpus-per-worker", type=float, default=1, metavar="K",
                          help="CPUs reserved per worker (default 1; more for data loaders)")
    ray_args.add_argument("--max-failures", type=int, default=3, metavar="F",
                          help="worker-group restarts from the latest checkpoint (default 3)")
    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command",
                                                                        required=True)
    check_data.add_arguments(data.add_parser(
        "check", help="validate a dataset folder: layout, pairs, sizes, label ids, histogram"))
    evaluate_cli.add_arguments(sub.add_parser("evaluate", help="score a trained model on labelled data"))
    predict_cli.add_arguments(sub.add_parser("predict", help="segment images with a trained model"))
    export_cli.add_arguments(sub.add_parser("export", help="write a trained model as ONNX or TorchScript"))
    return parser


def _resolve_run(args, cfg_name: str) -> tuple[Path, Path | None]:
    run_dir = Path(args.run_dir or f"runs/{cfg_name}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    existing = latest(run_dir / "checkpoints")
    if args.resume == "latest":
        if existing is None:
            raise UsageError(f"--resume: run dir {run_dir} has no checkpoint to resume from")
        resume = existing
    elif args.resume is not None:
        resume = Path(args.resume)
    else:
        resume = None
        if existing is not None or (run_dir / "metrics.jsonl").exists():
            raise UsageError(f"run dir {run_dir} already holds a run; pass --resume to continue "
                             "it or choose another --run-dir")
    _check_writable(run_dir)
    return run_dir, resume


def _requested(args, default: Config) -> Config:
    """--config or --preset (else ``default``) with --set applied on top."""
    cfg = Config.load(args.config) if args.config else get_preset(args.preset) if args.preset \
        else default
    return cfg.with_overrides(args.set)


def _config(args, run_dir: Path, resuming: bool) -> Config:
    """What the run trains. A resumed run continues under its config.json: --set applies on
    top of it, and a change needs --change-on-resume (t2sda/settings.py)."""
    stored = run_dir / "config.json"
    if not (resuming and stored.exists()):
        if args.change_on_resume:
            raise UsageError("--change-on-resume needs a run to resume (--resume, or --workers "
                             "on a run dir that holds a Ray Train run)")
        return _requested(args, get_preset("digits"))
    old = Config.load(stored)
    new = _requested(args, old)
    return Config.from_dict(settings.reconcile(old.to_dict(), new.to_dict(),
                                               change=args.change_on_resume, where=run_dir,
                                               what="the config"))


def _prepare(args) -> tuple[Path, Path | None, Config]:
    name = Path(args.config).stem if args.config else args.preset or "digits"
    run_dir, resume = _resolve_run(args, name)
    return run_dir, resume, _config(args, run_dir, resume is not None)


def _train(args) -> int:
    import torch

    from t2sda.perf import CompileError, compile_error
    from t2sda.step import NonFiniteLossError
    from t2sda.train import train

    _requested(args, get_preset("digits"))  # bad --preset/--config/--set: an error on every rank
    try:
        args.workers = settings.parse_workers(args.workers, "--workers", minimum=0)
    except ConfigError as err:
        raise UsageError(f"{err} (0 trains in this process)") from None
    if args.workers != 0:
        return _train_ray(args)
    if args.gpu:
        raise UsageError("--gpu needs --workers N (in this process, use --device cuda)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device!r}: not a torch device (cpu, cuda, cuda:0 ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine")
    if dist.init_from_env(device.type) and device.type == "cuda":  # under torchrun
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_main():  # one voice on the terminal under torchrun
        log.setLevel(logging.WARNING)
    # Rank 0 alone judges and names the run dir (the others would see its fresh files, and a
    # default name from the clock could differ); every rank then uses its answer.
    run_dir, resume, cfg = dist.broadcast_object(_prepare(args) if dist.is_main() else None)
    log.info("run dir %s (tensorboard --logdir %s)", run_dir, run_dir)
    finished = False
    try:
        metrics = train(cfg, device=device, run_dir=run_dir, resume=resume, report=_print_report)
        finished = True
    except (NonFiniteLossError, CompileError) as err:
        print(f"t2sda: error: {err}", file=sys.stderr)
        return 1
    except RuntimeError as err:  # e.g. a compiled backward failing to build at the first step
        if not type(err).__module__.startswith(("torch._dynamo", "torch._inductor")):
            raise
        print(f"t2sda: error: {compile_error(err, 'model', cfg.train.compile)}", file=sys.stderr)
        return 1
    finally:
        dist.shutdown(wait=finished)
    log.info("done: val/mIoU %.2f (teacher %.2f) at step %d; %s", metrics["val/mIoU"],
             metrics["val/mIoU_teacher"], metrics["step"], run_dir)
    return 0


def _train_ray(args) -> int:
    from t2sda.ray_glue import driver  # Ray is imported only on this path

    if args.device:
        raise UsageError("--device is for in-process runs; with --workers use --gpu")
    if args.resume not in (None, "latest"):
        raise UsageError("--resume CHECKPOINT is for in-process runs; with --workers, running "
                         "again on the same --run-dir resumes from its latest checkpoint")
    if args.cpus_per_worker <= 0:
        raise UsageError(f"--cpus-per-worker {args.cpus_per_worker:g}: must be > 0")
    if args.max_failures < 0:
        raise UsageError(f"--max-failures {args.max_failures}: must be >= 0")
    name = Path(args.config).stem if args.config else args.preset or "digits"
    run_dir = Path(args.run_dir or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    if (run_dir / "metrics.jsonl").exists() and not driver.has_ray_run(run_dir):
        raise UsageError(f"run dir {run_dir} holds an in-process run; continue it without "
                         "--workers (--resume) or choose another --run-dir")
    _check_writable(run_dir)  # before any worker starts
    cfg = _config(args, run_dir, driver.has_ray_run(run_dir))
    if driver.has_ray_run(run_dir):
        log.info("run dir %s holds a Ray Train run: resuming from its latest checkpoint", run_dir)
    driver.connect()
    driver.check_resources(workers=args.workers, use_gpu=args.gpu,
                           cpus_per_worker=args.cpus_per_worker)
    log.info("run dir %s (tensorboard --logdir %s)", run_dir, run_dir)
    try:
        metrics = driver.fit(cfg, run_dir=run_dir, workers=args.workers, use_gpu=args.gpu,
                             cpus_per_worker=args.cpus_per_worker, max_failures=args.max_failures,
                             placement=args.placement, callbacks=None)
    except driver.TrainingFailed as err:
        print(f"t2sda: error: {err}", file=sys.stderr)
        return err.exit_code
    if metrics:
        log.info("done: val/mIoU %.2f (teacher %.2f) at step %d on %d workers; %s",
                 metrics["val/mIoU"], metrics["val/mIoU_teacher"], metrics["step"],
                 metrics.get("dist/world_size", 1), run_dir)
    return 0


def _check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise UsageError(f"run dir {run_dir}: not writable ({err.strerror})") from None


def _print_report(metrics: dict, checkpoint_dir: str | None) -> None:
    if metrics:
        log.info("step %6d  val/mIoU %6.2f  teacher %6.2f%s", metrics["step"], metrics["val/mIoU"],
                 metrics["val/mIoU_teacher"], f"  checkpoint {checkpoint_dir}" if checkpoint_dir
                 else "")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("T2SDA_LOG", "INFO"), format="%(message)s",
                        stream=sys.stdout)
    args = _parser().parse_args(argv)
    try:
        if args.command == "data":
            return check_data.main(args)
        if args.command == "evaluate":
            return evaluate_cli.main(args)
        if args.command == "predict":
            return predict_cli.main(args)
        if args.command == "export":
            return export_cli.main(args)
        return _train(args)  # the parser admits only train, data, evaluate, predict and export
    except (ConfigError, CheckpointError, UsageError) as err:
        print(f"t2sda: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("t2sda: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
