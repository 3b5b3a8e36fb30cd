"""Checkpoints: one directory per saved step, written atomically (temp file + rename)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

STATE_FILE = "state.pt"
META_FILE = "meta.json"  # {"step", "score"}: read without loading the state (pruning, logs)
_STEP_DIR = re.compile(r"^step_(\d+)$")
log = logging.getLogger("t2sda")


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


def step_dirs(root: str | Path, marker: str = STATE_FILE) -> list[tuple[int, Path]]:
    """Complete checkpoint directories under ``root`` (holding ``marker``), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / marker).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest(root: str | Path) -> Path | None:
    dirs = step_dirs(root)
    return dirs[-1][1] if dirs else None


def meta(path: str | Path) -> dict:
    """A checkpoint directory's {"step", "score"} ({} when it is missing or unreadable)."""
    try:
        return _read_meta(Path(path))
    except (OSError, ValueError):
        return {}


def _read_meta(path: Path) -> dict:
    data = json.loads((path / META_FILE).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{META_FILE} is not a JSON object")
    return data


def _score(path: Path) -> float | None:
    """The checkpoint's val score; None when its meta file cannot be read (score unknown)."""
    try:
        score = _read_meta(path).get("score")
    except (OSError, ValueError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0]
        log.warning("checkpoint %s: %s unreadable (%s); kept, since it may be the best one",
                    path, META_FILE, reason)
        return None
    return float(score) if isinstance(score, (int, float)) else float("-inf")  # unscored first


def prune(root: str | Path, *, keep: int) -> list[Path]:
    """Keep the ``keep`` best-scoring checkpoint directories plus the newest; delete the rest.

    Ties (and unscored checkpoints) are broken in favour of the newer step. A checkpoint whose
    meta file is unreadable has an unknown score: it is kept (with a warning), never pruned.
    A directory that cannot be deleted is a warning naming it (training goes on; the disk
    fills). Returns the directories deleted.
    """
    dirs = step_dirs(root)
    if not dirs:
        return []
    scores = {path: _score(path) for _, path in dirs}
    scored = [(step, path) for step, path in dirs if scores[path] is not None]
    best = sorted(scored, key=lambda item: (scores[item[1]], item[0]), reverse=True)[:keep]
    kept = {path for _, path in best} | {dirs[-1][1]} | {p for p, s in scores.items() if s is None}
    deleted = []
    for _, path in dirs:
        if path in kept:
            continue
        try:
            shutil.rmtree(path)
            deleted.append(path)
        except OSError as err:
            log.warning("checkpoint %s: could not be pruned (%s: %s)", path,
                        type(err).__name__, err.strerror or err)
    return deleted
