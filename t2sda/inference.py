"""Load a trained model (student and/or teacher) from a run dir or a checkpoint file.

Every way of pointing at trained weights goes through :func:`load_trained`, so new sources
(e.g. released DAFormer/mmseg checkpoints) are added in one place.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch
from torch import nn

from t2sda import checkpoint, remote
from t2sda.checkpoint import CheckpointError
from t2sda.config import Config, ConfigError
from t2sda.data import digits, labels
from t2sda.models import build_model, convert

MODELS = ("student", "teacher", "both")
_STEP = re.compile(r"^step_(\d+)$")


@dataclasses.dataclass
class Trained:
    """Eval-mode segmentors by name ("student", "teacher") and where they came from."""

    models: dict[str, nn.Module]
    config: Config
    checkpoint: Path
    step: int
    class_names: tuple[str, ...]


def class_names(cfg: Config) -> tuple[str, ...]:
    """The classes a config's model predicts, without building (or scanning) its datasets."""
    names = digits.CLASS_NAMES if cfg.data.name == "digits" else labels.CLASS_NAMES
    return names[:cfg.data.num_classes] if cfg.data.num_classes else names


def checkpoint_dirs(run_dir: Path, *, marker: str = checkpoint.STATE_FILE) -> list[Path]:
    """A run's checkpoint directories, oldest first, in any of the three layouts.

    In-process runs keep ``checkpoints/step_N/``; Ray Train runs and a search's trial dirs keep
    Ray's ``checkpoint_<time>/`` (with the same ``state.pt`` + ``meta.json`` inside; ``marker``
    is the file that must be there: ``meta.json`` in a local copy of a run in a bucket).
    """
    found = [path for _, path in checkpoint.step_dirs(run_dir / "checkpoints", marker)]
    ray_dirs = [p for p in run_dir.glob("checkpoint_*") if (p / marker).is_file()]
    found += sorted(ray_dirs, key=lambda p: (checkpoint.meta(p).get("step") or -1, p.name))
    return found


def pick_checkpoint(run_dir: Path, which: str, *, marker: str = checkpoint.STATE_FILE) -> Path:
    """``best`` (highest val mIoU in meta.json; newest on ties), ``latest`` or ``step_N``."""
    if not run_dir.is_dir():
        raise CheckpointError(f"--run-dir {run_dir}: not found")
    dirs = checkpoint_dirs(run_dir, marker=marker)
    if not dirs:
        raise CheckpointError(f"--run-dir {run_dir}: unknown layout, no checkpoints/step_N/ or "
                              "Ray checkpoint_*/ directory with a state.pt")
    if which == "latest":
        return dirs[-1]
    if which == "best":
        def score(item):
            value = checkpoint.meta(item[1]).get("score")
            return (value if isinstance(value, (int, float)) else float("-inf"), item[0])
        return max(enumerate(dirs), key=score)[1]
    match = _STEP.match(which)
    if not match:
        raise ConfigError(f"--which {which!r}: expected best, latest or step_N")
    for path in dirs:
        if checkpoint.meta(path).get("step") == int(match.group(1)):
            return path
    steps = ", ".join(str(checkpoint.meta(p).get("step")) for p in dirs)
    raise CheckpointError(f"--which {which}: no such checkpoint in {run_dir} (steps: {steps})")


def _num_classes(state: dict) -> int | None:
    """Class count of a segmentor state dict: the output rows of its last classifier weight."""
    weights = [v for k, v in state.items() if k.endswith("weight") and "proj" not in k.split(".")[0]
               and v.ndim >= 2]
    return int(weights[-1].shape[0]) if weights else None


def load_trained(*, run_dir: str | Path | None = None, which: str = "best",
                 checkpoint_path: str | Path | None = None, config: Config | None = None,
                 model: str = "student", device: torch.device | str = "cpu") -> Trained:
    """Build the config's segmentor(s) and load trained weights into them (eval mode).

    Either ``run_dir`` (its ``config.json`` unless ``config`` is given, and the checkpoint
    ``which`` names) or ``checkpoint_path`` with ``config``. A ``run_dir`` in a bucket
    (``s3://...``) is read through a local copy of its logs and of the chosen checkpoint.
    """
    if model not in MODELS:
        raise ConfigError(f"--model {model!r}: expected one of {', '.join(MODELS)}")
    if run_dir is not None and remote.is_uri(run_dir):
        uri, run_dir = str(run_dir).rstrip("/"), remote.mirror_run(str(run_dir))
        path = remote.fetch_checkpoint(uri, run_dir, pick_checkpoint(run_dir, which, marker="meta.json"))
    elif run_dir is not None:
        run_dir = Path(run_dir)
        path = pick_checkpoint(run_dir, which)
    if run_dir is not None:
        if config is None:
            if not (run_dir / "config.json").is_file():
                raise ConfigError(f"--run-dir {run_dir}: no config.json (pass --config or --preset)")
            config = Config.load(run_dir / "config.json")
    elif checkpoint_path is not None:
        path = Path(checkpoint_path)
        if config is None:
            raise ConfigError("--checkpoint needs --config FILE or --preset NAME")
    else:
        raise ConfigError("pass --run-dir DIR, or --checkpoint PATH with --config/--preset")
    names = class_names(config)
    payload = _released_payload(path, config, len(names)) or checkpoint.load(path)
    models = {}
    for name in ("student", "teacher") if model == "both" else (model,):
        models[name] = _build_loaded(config, payload, name, path, len(names), torch.device(device))
    return Trained(models=models, config=config, checkpoint=path, step=int(payload["step"]),
                   class_names=names)


def _build_loaded(cfg: Config, payload: dict, name: str, path: Path, num_classes: int,
                  device: torch.device) -> nn.Module:
    state = payload["state"].get(name) if isinstance(payload["state"], dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: has no {name} weights")
    prefix = "segmentor."
    seg_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not seg_state:
        raise CheckpointError(f"checkpoint {path}: {name} weights are not a t2sda network")
    found = _num_classes(seg_state)
    if found is not None and found != num_classes:
        raise CheckpointError(f"checkpoint {path}: checkpoint has {found} classes, config {num_classes}")
    segmentor = build_model(cfg.model.name, num_classes=num_classes, hrda=cfg.model.hrda_options())
    try:
        segmentor.load_state_dict(seg_state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint {path}: not a {cfg.model.name} checkpoint ({first})") from None
    return segmentor.to(device).eval()


def _released_payload(path: Path, cfg: Config, num_classes: int) -> dict | None:
    """A released DAFormer-family (mmseg) checkpoint file as a t2sda payload, else None.

    Its ``model.*`` / ``ema_model.*`` networks (or the bare ``backbone.*`` + ``decode_head.*``
    of a non-UDA one) become student / teacher, renamed by t2sda.models.convert and checked
    key by key and shape by shape against the config's model (built on the meta device).
    """
    if not path.is_file() or path.name == checkpoint.STATE_FILE:
        return None
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a t2sda checkpoint holds more than tensors: checkpoint.load reads it
        return None
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict) or not convert.is_mmseg_segmentor(state):
        return None
    roles = ("student", "teacher") if any(k.startswith("ema_model.") for k in state) else ("student",)
    if convert.is_hrda(state) and not cfg.model.hrda:
        raise CheckpointError(f"checkpoint {path}: an HRDA / MIC release needs model.hrda=true "
                              "(e.g. --preset gta2cs_hrda or gta2cs_mic)")
    if cfg.model.hrda and not convert.is_hrda(state):
        raise CheckpointError(f"checkpoint {path}: a single-scale DAFormer release, but the config "
                              "has model.hrda=true (no scale attention to load)")
    try:
        converted = {role: convert.convert_segmentor(state, role) for role in roles}
        with torch.device("meta"):  # names and shapes only, no weights in memory
            own = build_model(cfg.model.name, num_classes=num_classes,
                              hrda=cfg.model.hrda_options()).state_dict()
        for seg_state, source in converted.values():
            convert.check_state(own, seg_state, source)
    except convert.ConversionError as err:
        raise CheckpointError(f"checkpoint {path} (DAFormer-family names): {err}") from None
    models = {role: {f"segmentor.{key}": seg_state[key] for key in own}
              for role, (seg_state, _) in converted.items()}
    meta = raw.get("meta") if isinstance(raw.get("meta"), dict) else {}
    return {"step": int(meta.get("iter") or 0), "state": models}
