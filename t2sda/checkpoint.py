"""Checkpoints: one directory per saved step, written atomically (temp file + rename)."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

STATE_FILE = "state.pt"
META_FILE = "meta.json"  # {"step", "score"}: read without loading the state (pruning, logs)
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not fit the run; one line, with the path."""


def save(directory: str | Path, payload: dict, *, score: float | None = None) -> Path:
    """Write ``payload`` to ``directory/state.pt`` so that a crash never leaves a torn file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Written first: a state.pt never exists without its meta file.
    meta = {"step": payload.get("step"), "score": score}
    (directory / META_FILE).write_text(json.dumps(meta) + "\n")
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".state-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / STATE_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return directory / STATE_FILE


def load(path: str | Path) -> dict:
    """Read a checkpoint file, or the ``state.pt`` inside a checkpoint directory."""
    path = Path(path)
    if path.is_dir():
        path = path / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several types for a corrupt file
        raise CheckpointError(f"checkpoint {path}: unreadable ({type(err).__name__})") from None
    if not isinstance(payload, dict) or "state" not in payload or "step" not in payload:
        raise CheckpointError(f"checkpoint {path}: not a t2sda checkpoint")
    return payload


def step_dirs(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoint directories under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest(root: str | Path) -> Path | None:
    dirs = step_dirs(root)
    return dirs[-1][1] if dirs else None


def meta(path: str | Path) -> dict:
    """A checkpoint directory's {"step", "score"} ({} when it has none)."""
    try:
        return json.loads((Path(path) / META_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _score(path: Path) -> float:
    score = meta(path).get("score")
    return float(score) if isinstance(score, (int, float)) else float("-inf")  # unscored first


def prune(root: str | Path, *, keep: int) -> None:
    """Keep the ``keep`` best-scoring checkpoint directories plus the newest; delete the rest.

    Ties (and unscored checkpoints) are broken in favour of the newer step.
    """
    dirs = step_dirs(root)
    if not dirs:
        return
    best = sorted(dirs, key=lambda item: (_score(item[1]), item[0]), reverse=True)[:keep]
    kept = {path for _, path in best} | {dirs[-1][1]}
    for _, path in dirs:
        if path not in kept:
            shutil.rmtree(path, ignore_errors=True)
