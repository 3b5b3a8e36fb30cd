"""A search's shared warm-up: the source-only steps before adaptation, trained once.

Until ``method.self_training_start`` every trial of a method-parameter search trains the same
source-only model, so the search trains those steps once (``<experiment>/warmup``) and each
trial resumes from that checkpoint: its step count and every schedule continue exactly as in
a run from scratch. This holds only for trials whose config differs from the warm-up's in keys
that act from the first adaptation step on (``AFTER_ADAPTATION``); any other trial trains
from scratch. No ray import here: the rules are unit-tested without a cluster.
"""

from __future__ import annotations

import json
from pathlib import Path

from t2sda.config import Config
from t2sda.settings import flatten
from t2sda.state import uses_pull

# Method keys read only once adaptation has started: before it, the pull's weight is 0 (its
# ramp starts at self_training_start), no pseudo label, mixed or MIC-masked image is made, and
# class weights (the score itself is updated all along) are only read by the pull.
AFTER_ADAPTATION = frozenset(f"method.{key}" for key in (
    "pseudo_threshold", "pseudo_weight", "pseudo_ignore_top", "pseudo_ignore_bottom", "mix",
    "pull_weight", "pull_warmup", "pull_temperature", "pull_source_pixels", "pull_target_pixels",
    "pull_target_threshold", "pull_keys", "pull_key_net", "proto_momentum", "negatives",
    "negative_sampling", "num_queries", "num_negatives", "query_aug", "weight_gamma",
    "weight_schedule", "weight_warmup", "mic_weight", "mic_mask_ratio", "mic_block", "mic_augment",
)) | {"adapt_seed"}  # the seed of adaptation alone (replicates of a search share the warm-up)
# The teacher tracks the student during the warm-up; with method.teacher_reset it is copied
# from the student when adaptation starts, and its momentum acts only after.
TEACHER_KEY = "method.ema_momentum"
RECORD = "warmup.json"  # in the experiment dir: the finished warm-up's checkpoint and config


def plan(base: Config, searched: set[str]) -> tuple[Config | None, str]:
    """The warm-up's config (``base``, with ``teacher_reset`` when the space searches the
    teacher's momentum) and a one-line reason; None when a warm-up cannot be shared."""
    m = base.method
    if not m.self_training or m.self_training_start <= 0:
        return None, "the preset has no source-only warm-up (method.self_training_start=0)"
    if m.self_training_start >= base.train.iters:
        return None, "the warm-up is the whole run (method.self_training_start >= train.iters)"
    before = sorted(searched - AFTER_ADAPTATION - {TEACHER_KEY})
    if before:
        return None, f"the space searches {', '.join(before)}, which acts during the warm-up"
    if TEACHER_KEY in searched and not m.teacher_reset:
        return (base.with_overrides({"method.teacher_reset": True}),
                "method.teacher_reset=true: the searched teacher momentum acts from adaptation on")
    return base, f"steps 0-{m.self_training_start} trained once"


def fits(warmup: Config, trial: Config) -> bool:
    """Whether a trial with config ``trial`` may start from the warm-up trained with ``warmup``:
    they differ only in keys read after adaptation starts, and hold the same modules."""
    a, b = flatten(warmup.to_dict()), flatten(trial.to_dict())
    differ = {k for k in a if a[k] != b[k]}
    allowed = AFTER_ADAPTATION | ({TEACHER_KEY} if warmup.method.teacher_reset else set())
    return differ <= allowed and uses_pull(warmup) == uses_pull(trial)


def load_record(exp_dir: Path, warmup: Config) -> str | None:
    """The checkpoint of a finished warm-up of this exact config in ``exp_dir``, else None."""
    path = exp_dir / RECORD
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("config") != warmup.to_dict():
        return None
    return record.get("checkpoint")


def save_record(exp_dir: Path, warmup: Config, checkpoint: str, metrics: dict) -> None:
    exp_dir.mkdir(parents=True, exist_ok=True)
    tmp = exp_dir / (RECORD + ".tmp")
    tmp.write_text(json.dumps({"checkpoint": checkpoint, "step": warmup.method.self_training_start,
                               "metrics": {k: metrics.get(k) for k in ("val/mIoU", "val/mIoU_teacher")},
                               "config": warmup.to_dict()}, indent=2) + "\n")
    tmp.replace(exp_dir / RECORD)
