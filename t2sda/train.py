"""The training entry: one straight loop around ``train_step`` with evaluation and checkpoints.

Runs as-is in one process (``python -m t2sda train``) and under DDP: when a process group is
initialised (torchrun, Ray Train) the student is wrapped in DistributedDataParallel here.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

from t2sda import checkpoint, dist
from t2sda.config import Config, ConfigError
from t2sda.data.loaders import batch_stream, build_datasets, eval_loader
from t2sda.method.translate import translate
from t2sda.monitor import Monitor, with_best
from t2sda.scoring import evaluate, iou_from_confusion, predict
from t2sda.state import TrainState, build_state, uses_pull
from t2sda.step import NonFiniteLossError, train_step
from t2sda.tb import NullLogger, TBLogger, colorize

# report(metrics, checkpoint_dir): every rank calls it at the same steps; only rank 0 passes a
# checkpoint directory. Ray Train plugs in here.
Report = Callable[[dict, "str | None"], None]


def _wrap_ddp(device: torch.device, cfg: Config):
    # A group of one (Ray Train with one worker) gains nothing from DDP but its hooks.
    if dist.world_size() == 1:
        return None
    if cfg.train.sync_bn and device.type != "cuda":
        raise ConfigError(f"train.sync_bn=true: SyncBatchNorm needs CUDA workers (DDP on "
                          f"{device.type}/gloo refuses it); set train.sync_bn=false")
    ids = [device.index] if device.type == "cuda" else None
    # The projection head sits idle during the source-only warm-up and the pull's ramp:
    # DDP must be told that some parameters may get no gradient in a step.
    unused = uses_pull(cfg)

    def wrap(net: torch.nn.Module) -> torch.nn.Module:
        # The teacher was copied before this: it keeps plain BatchNorm (same buffers, so the
        # EMA and checkpoints are unchanged) and its statistics are averaged over ranks.
        if cfg.train.sync_bn:
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=ids,
                                                        find_unused_parameters=unused)
        dist.record_broadcast_buffers(ddp)  # for dist/buffer_diff
        return ddp

    return wrap


def _step_seed(seed: int, rank: int, step: int) -> int:
    """Augmentation / sampling randomness is a function of (seed, rank, step), so a resumed run
    draws exactly what the uninterrupted one drew, and ranks draw differently."""
    return (seed * 1_000_003 + rank * 7_919 + step) % (2**63)


ADAPT_SEED_STRIDE = 100_003  # adapt_seed k moves the seeds of adaptation by k strides


def adaptation_start(cfg: Config) -> int:
    """The first step that ``adapt_seed`` acts on: the end of the source-only warm-up."""
    return cfg.method.self_training_start if cfg.method.self_training else 0


def _seed_at(cfg: Config, seed: int, step: int) -> int:
    """``seed`` as used at ``step``: moved by ``adapt_seed`` from the adaptation's start on,
    so replicates with another adapt_seed share every step before it (the shared warm-up)."""
    if cfg.adapt_seed and step >= adaptation_start(cfg):
        return seed + ADAPT_SEED_STRIDE * cfg.adapt_seed
    return seed


def _truncate_metrics(path: Path, after_step: int) -> None:
    """Drop evaluations past ``after_step`` (a resumed run will redo them), atomically."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= after_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


def _replica_drift(state: TrainState) -> dict:
    """How far ranks have drifted apart in what DDP keeps identical (0 when it does, as it must).

    ``dist/buffer_diff`` covers the teacher's buffers (averaged over ranks at each update) and the
    student's as DDP last broadcast them; ``dist/student_bn_spread`` is the student's BatchNorm
    running stats now, which every rank has since updated from its own shard (non-zero by design:
    each rank evaluates its part of the val set with its own).
    """
    student = dist.unwrap(state.student)
    params = [p.detach().double().sum() for p in student.parameters()]
    params += [p.detach().double().sum() for p in state.teacher.model.parameters()]
    broadcast = getattr(state.student, "broadcast_buffers_seen", None)
    if broadcast is None:  # no training forward since the wrap: the buffers are as broadcast
        broadcast = dist.float_buffers(student)
    return {"dist/param_diff": dist.max_rank_difference(torch.stack(params)),
            "dist/buffer_diff": dist.max_rank_difference(
                torch.cat([dist.float_buffers(state.teacher.model), broadcast])),
            "dist/student_bn_spread": dist.max_rank_difference(dist.float_buffers(student)),
            "dist/class_weight_diff": dist.max_rank_difference(state.weighter.weights().double())}


class NonFiniteMetricError(NonFiniteLossError):
    """A validation mIoU is NaN or inf: the run stops as for a NaN loss (one line, exit 1)."""


def _check_finite_miou(metrics: dict, step: int) -> None:
    # Per-class IoU may be NaN (a class absent from truth and prediction); a mean may not.
    bad = {k: v for k, v in metrics.items()
           if "mIoU" in k and k != "val/best_mIoU" and not math.isfinite(v)}
    if bad:
        shown = ", ".join(f"{k}={v}" for k, v in sorted(bad.items()))
        raise NonFiniteMetricError(f"step {step}: validation mIoU is not finite ({shown})")


def _validate(state: TrainState, data, cfg: Config, device: torch.device,
              observe=None) -> dict:
    """val/ metrics; ``observe`` sees the target split's logits (the monitor's validators)."""
    student, teacher = dist.unwrap(state.student), state.teacher
    student.eval()
    metrics = {}
    # The target's val set gives val/...; further sets (domain generalization) val_<name>/...
    for prefix, dataset in (("val", data.val), *((f"val_{k}", v) for k, v in data.extra_val.items())):
        loader = eval_loader(dataset, batch_size=cfg.data.eval_batch_size or cfg.data.batch_size,
                             rank=dist.rank(), world_size=dist.world_size())
        confs = evaluate({"student": student, "teacher": teacher}, loader, num_classes=data.num_classes,
                         device=device, crop=cfg.data.eval_crop, stride=cfg.data.eval_stride,
                         observe=observe if prefix == "val" else None)
        for name, conf in confs.items():
            iou, miou = iou_from_confusion(conf)
            suffix = "" if name == "student" else "_teacher"
            metrics[f"{prefix}/mIoU{suffix}"] = 100 * miou.item()
            for subset, ids in data.class_subsets.items():  # e.g. SYNTHIA's mIoU16 / mIoU13
                metrics[f"{prefix}/{subset}{suffix}"] = 100 * iou[list(ids)].nanmean().item()
            for class_name, value in zip(data.class_names, iou.tolist(), strict=True):
                metrics[f"{prefix}/IoU{suffix}/{class_name}"] = 100 * value
    student.train()
    return metrics


@torch.no_grad()
def _log_images(logger, state: TrainState, data, cfg: Config, device, step: int) -> None:
    """A fixed panel (first 4 source and validation images), so frames compare across steps."""
    src = torch.stack([data.source[i][0] for i in range(4)]).to(device)
    tgt, tgt_label = (torch.stack(x).to(device) for x in zip(*(data.val[i] for i in range(4))))
    m, c = cfg.method, data.num_classes
    student = dist.unwrap(state.student)
    student.eval()
    logger.images("images/1_source", src, step)
    logger.images("images/2_source_target_like",
                  translate(src, tgt.roll(1, 0), mode=m.translate, fda_beta=m.fda_beta,
                            color_space=m.color_space, style=state.style), step)
    logger.images("images/3_target", tgt, step)
    logger.images("images/4_pseudo_label", colorize(predict(state.teacher, tgt, num_classes=c), c),
                  step)
    logger.images("images/5_prediction", colorize(predict(student, tgt, num_classes=c), c), step)
    logger.images("images/6_ground_truth", colorize(tgt_label, c), step)
    student.train()


def train(cfg: Config, *, device: torch.device | str, run_dir: str | Path,
          report: Report | None = None, resume: str | Path | None = None,
          checkpoint_root: str | Path | None = None, stop_at: int | None = None) -> dict:
    """Train ``cfg`` in ``run_dir``; resume from a checkpoint file or directory if given.

    Checkpoints go to ``checkpoint_root`` (default ``run_dir/checkpoints``); under Ray Train it
    is a scratch directory that Ray persists and prunes. ``stop_at`` ends the run early at that
    step, evaluated and checkpointed, with every schedule still that of ``train.iters`` steps
    (a search's shared warm-up: its trials resume from there). Returns the last evaluation's
    metrics.
    """
    device, run_dir = torch.device(device), Path(run_dir)
    rank, world, main = dist.rank(), dist.world_size(), dist.is_main()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    payload = checkpoint.load(resume) if resume is not None else None  # fail before any write
    data = build_datasets(cfg.data, seed=cfg.seed)
    state = build_state(cfg, num_classes=data.num_classes, device=device, wrap=_wrap_ddp(device, cfg))
    if payload is not None:
        try:
            state.load_state_dict(payload["state"])
        except (KeyError, RuntimeError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise checkpoint.CheckpointError(
                f"checkpoint {resume}: does not fit this config ({first})") from None
    start = state.step
    logger = NullLogger()
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.json")
        _truncate_metrics(run_dir / "metrics.jsonl", start)
        logger = TBLogger(run_dir, purge_step=start if start else None)

    def streams_at(step: int) -> list:
        """Source and target batch streams positioned at ``step``."""
        return [batch_stream(dataset, batch_size=cfg.data.batch_size,
                             seed=_seed_at(cfg, cfg.seed * 2 + i, step), rank=rank, world_size=world,
                             start_step=step, num_workers=cfg.data.num_workers,
                             pin_memory=device.type == "cuda")
                for i, dataset in enumerate((data.source, data.target))]

    monitor = Monitor(data, cfg, device) if cfg.train.diagnostics or cfg.train.validators else None
    state.student.train()
    try:
        # A resumed run that is already complete returns the metrics its checkpoint holds.
        return _loop(state, streams_at, data, cfg, device, run_dir, logger, report, monitor,
                     metrics=dict(payload["metrics"]) if payload is not None else {},
                     ckpt_root=Path(checkpoint_root or run_dir / "checkpoints"),
                     stop=min(cfg.train.iters, cfg.train.iters if stop_at is None else stop_at))
    finally:
        logger.close()


def _loop(state, streams_at, data, cfg, device, run_dir, logger, report, monitor, *, metrics: dict,
          ckpt_root: Path, stop: int) -> dict:
    """Steps until ``stop`` (<= ``cfg.train.iters``); returns the last evaluation's metrics.
    ``streams_at(step)``: the batch streams from ``step`` on (new ones where adapt_seed
    changes their seed)."""
    streams = streams_at(state.step)
    reseed_at = adaptation_start(cfg) if cfg.adapt_seed and state.step < adaptation_start(cfg) else None
    rank, world, main, b = dist.rank(), dist.world_size(), dist.is_main(), cfg.data.batch_size
    metrics_path = run_dir / "metrics.jsonl"
    # Throughput counts only data + step time: evaluation and checkpoints stay out of it.
    window, window_time, window_steps = defaultdict(float), 0.0, 0
    total_time, total_steps = 0.0, 0  # since this (re)start, for the reported perf/ metrics
    while state.step < stop:
        tic = time.perf_counter()
        if state.step == reseed_at:
            streams = streams_at(state.step)
        (src_img, src_label), (tgt_img, _) = (next(s) for s in streams)
        src_img, src_label, tgt_img = (x.to(device, non_blocking=True)
                                       for x in (src_img, src_label, tgt_img))
        if state.step == cfg.train.fail_at_step and not (run_dir / ".failed_once").exists():
            if main:
                (run_dir / ".failed_once").touch()
            raise RuntimeError(f"injected failure at step {state.step} (train.fail_at_step)")
        torch.manual_seed(_step_seed(_seed_at(cfg, cfg.seed, state.step), rank, state.step))
        logs = train_step(state, src_img, src_label, tgt_img, cfg)
        step = state.step  # steps done
        elapsed = time.perf_counter() - tic
        window_time, total_time, total_steps = window_time + elapsed, total_time + elapsed, total_steps + 1
        for key, value in logs.items():
            window[key] += value
        window_steps += 1

        if step % cfg.train.log_every == 0 or step == stop:
            means = {k: v / window_steps for k, v in window.items()}
            weights = {k: v for k, v in means.items() if k.startswith("class_weight/")}
            logger.scalars({k: v for k, v in means.items() if k not in weights}, step, "train/")
            logger.scalars({f"train/class_weight/{data.class_names[int(k.split('/')[1])]}": v
                            for k, v in weights.items()}, step)
            logger.scalar("perf/images_per_s", 2 * b * world * window_steps / window_time, step)
            window, window_time, window_steps = defaultdict(float), 0.0, 0

        save_now = step % cfg.train.checkpoint_every == 0 or step == stop
        # Every checkpoint carries a fresh score: the best ones are kept by val mIoU.
        evaluate_now = step % cfg.train.eval_every == 0 or save_now
        if evaluate_now:
            # Best-so-far carried through checkpoints: what a search compares, so a trial
            # stopped early and one run to the end are judged alike.
            best, previous = metrics.get("val/best_mIoU", -math.inf), metrics
            metrics = {"step": step, **_validate(state, data, cfg, device,
                                                 monitor.observe if monitor is not None else None),
                       "dist/world_size": world,  # an elastic run's changes as it resizes
                       "perf/steps_per_s": total_steps / total_time,
                       "perf/images_per_s": 2 * b * world * total_steps / total_time}
            metrics["val/best_mIoU"] = max(best, metrics["val/mIoU"])
            per_class, embeddings = {}, {}
            if monitor is not None:  # feat/ diagnostics and select/ validators
                extra, per_class, embeddings = monitor(state)
                metrics.update(extra)
                warmup = cfg.method.self_training_start if cfg.method.self_training else -1
                metrics.update(with_best(metrics, previous, since=warmup))
            if world > 1:
                metrics.update(_replica_drift(state))
            _check_finite_miou(metrics, step)
            if main:
                # perf/ is logged every log_every steps above; here it would be logged twice.
                logger.scalars({k: v for k, v in metrics.items()
                                if k != "step" and not k.startswith("perf/")}, step)
                logger.scalars(per_class, step)  # per class: TensorBoard only
                for feature, (pixels, meta) in embeddings.items():
                    logger.embedding(f"feat/{feature}", pixels, meta, ["domain", "class"], step)
                if cfg.train.images_every == 0:
                    _log_images(logger, state, data, cfg, device, step)
                # Classes absent from both truth and prediction have no IoU: null, not NaN.
                row = {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}
                with metrics_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                logger.flush()
        if main and cfg.train.images_every and step % cfg.train.images_every == 0:
            _log_images(logger, state, data, cfg, device, step)
        ckpt_dir = None
        if save_now and main:
            ckpt_dir = ckpt_root / f"step_{step:07d}"
            checkpoint.save(ckpt_dir, {"state": state.state_dict(), "step": step,
                                       "config": cfg.to_dict(), "metrics": metrics},
                            score=metrics["val/mIoU"])
            checkpoint.prune(ckpt_root, keep=cfg.train.keep_checkpoints)
        if report is not None and evaluate_now:
            report(dict(metrics), str(ckpt_dir) if ckpt_dir else None)
    return metrics


if __name__ == "__main__":  # python -m t2sda.train ... == python -m t2sda train ...
    # Run the CLI as a program (runpy), so this library module never imports its CLI.
    import runpy
    import sys

    sys.argv[1:1] = ["train"]
    runpy.run_module("t2sda", run_name="__main__", alter_sys=True)
