"""What each Ray Train worker runs: ``t2sda.train.train`` with Ray's report and resume.

Ray has already joined the workers into a process group (gloo on CPU, NCCL on GPU), so
``train`` sees ``torch.distributed`` initialised and wraps the student in DDP itself.
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pyarrow.fs
import ray
import ray.train
import ray.train.torch
import torch

from t2sda import checkpoint, remote
from t2sda.config import Config
from t2sda.train import train


def train_loop_per_worker(loop_config: dict) -> None:
    """``loop_config``: {"config": Config.to_dict(), "run_dir": absolute path for rank 0's logs,
    "sync_to": None, or a URI the logs are copied to after each evaluation, "stop_at": None or
    the step to end at (a shared warm-up), "init_from": None or a checkpoint (path or URI) to
    start from when the run has none of its own (a search trial after the shared warm-up)}.

    Every rank calls ``ray.train.report`` at every evaluation (it is a barrier); rank 0 attaches
    its checkpoint, which Ray copies into the run's storage and scores by val mIoU. After a
    worker failure, or when the same run is started again, Ray hands the latest one back here.
    """
    cfg = Config.from_dict(loop_config["config"])
    run_dir = Path(loop_config["run_dir"])
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    scratch = Path(tempfile.mkdtemp(prefix="t2sda-ckpt-"))  # Ray persists from here

    main = ray.train.get_context().get_world_rank() == 0
    _quiet_reports()

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        saved = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=saved)
        if main and loop_config.get("sync_to"):  # logs beside the checkpoints in the bucket
            pyarrow.fs.copy_files(str(run_dir), loop_config["sync_to"])
        if main:  # one progress line per evaluation on the driver's terminal
            _say(f"step {metrics['step']}  val/mIoU {metrics['val/mIoU']:.2f}  teacher "
                 f"{metrics['val/mIoU_teacher']:.2f}  {metrics['perf/images_per_s']:.0f} img/s")
        if checkpoint_dir:  # Ray has its copy now
            shutil.rmtree(checkpoint_dir, ignore_errors=True)

    resume_dir = None
    restored, start = ray.train.get_checkpoint(), "resuming"
    placement = _placement()
    if main:
        _say(placement)
    if restored is not None and main and loop_config.get("sync_to"):
        # The bucket holds the run's logs; this node may be a new one (the old one lost), whose
        # disk has none: metrics.jsonl continues from the bucket's, never from an empty file.
        remote.download(loop_config["sync_to"], run_dir, keep=remote.not_checkpoint)
    if restored is None and loop_config.get("init_from"):
        restored, start = ray.train.Checkpoint(loop_config["init_from"]), "starting after the shared warm-up"
    try:
        if restored is not None:
            resume_dir = Path(restored.to_directory(tempfile.mkdtemp(prefix="t2sda-resume-")))
            if main:
                _say(f"{start} from step {checkpoint.meta(resume_dir).get('step')} "
                     f"({restored.path})")
        train(cfg, device=device, run_dir=run_dir, report=report, resume=resume_dir,
              checkpoint_root=scratch, stop_at=loop_config.get("stop_at"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if resume_dir is not None:
            shutil.rmtree(resume_dir, ignore_errors=True)


def _placement() -> str:
    """Where the workers run: "2 workers on 2 nodes (1 + 1)". A collective: every rank calls it."""
    import torch.distributed as tdist

    node = ray.get_runtime_context().get_node_id()
    nodes = [node]
    if tdist.is_available() and tdist.is_initialized():
        nodes = [None] * tdist.get_world_size()
        tdist.all_gather_object(nodes, node)
    counts = Counter(nodes)
    return (f"{len(nodes)} worker(s) on {len(counts)} node(s) "
            f"({' + '.join(str(n) for n in counts.values())})")


def _quiet_reports() -> None:
    """Ray logs every report of every rank, all metrics included, at INFO: far too much for a
    terminal. Rank 0 prints one line per evaluation instead (``_say``)."""
    try:
        from ray.train.v2._internal.execution import context  # its logger is named by file

        context.logger.setLevel(logging.WARNING)
    except (ImportError, AttributeError):  # another Ray layout: keep its logs
        pass


def _say(message: str) -> None:
    """Print to the process's real stdout: Ray's patched ``print`` would echo a line twice."""
    print(f"t2sda: {message}", file=sys.__stdout__, flush=True)
