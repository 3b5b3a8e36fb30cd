"""A search's settings, stored in its experiment directory (``settings.json``) and reused on
``tune.py --resume`` (t2sda/settings.py has the rules).

Tune restores the searcher and the scheduler it saved, so only the base config may change
on resume (``--change-on-resume``, e.g. more ``train.iters``); the other settings never do.
"""

from __future__ import annotations

import json
from pathlib import Path

from t2sda import settings
from t2sda.config import Config, ConfigError
from t2sda.presets import search_preset

FILE = "settings.json"
# Flag -> default for a new search; on --resume an absent flag (None) keeps the stored value.
FLAGS = {"preset": "digits", "space": None, "scheduler": "asha", "grace_period": None,
         "reduction_factor": None, "sampler": "tpe", "seed": 0, "num_samples": None,
         "metric": "target_miou", "confirm": 1, "confirm_seeds": 3, "confirm_seed_kind": "auto",
         "confirm_set": []}
# What a resumed search may change: the confirmation runs after the search, from its results.
CHANGEABLE = frozenset(k for k in FLAGS if k.startswith("confirm"))


def resolve(args, exp_dir: Path | None) -> dict:
    """The settings to run with: the command's for a new search; on --resume the stored ones,
    the command's explicit flags checked against them. Sets them on ``args`` too and returns
    {"config": the base config dict, flag: value ...}."""
    stored_file = exp_dir / FILE if exp_dir is not None else None
    if args.change_on_resume and not args.resume:
        raise ConfigError("--change-on-resume needs --resume")
    if args.resume and stored_file is not None and stored_file.exists():
        old = json.loads(stored_file.read_text())
        old = {**{k: v for k, v in FLAGS.items() if k in CHANGEABLE}, **old}  # older searches
        given = {k: getattr(args, k) for k in FLAGS if getattr(args, k) is not None}
        new = {**old, **given}
        base = search_preset(args.preset) if args.preset else Config.from_dict(old["config"])
        new["config"] = base.with_overrides(args.set).to_dict()
        fixed = {k: v for k, v in old.items() if k != "config" and k not in CHANGEABLE}
        settings.reconcile(fixed, {k: v for k, v in new.items() if k in fixed}, change=False,
                           where=exp_dir, what="the search's settings (Tune restores them)")
        keep = {k: v for k, v in old.items() if k not in CHANGEABLE}
        chosen = settings.reconcile(keep, {k: v for k, v in new.items() if k not in CHANGEABLE},
                                    change=args.change_on_resume, where=exp_dir, what="the base config")
        chosen = {**chosen, **{k: new[k] for k in CHANGEABLE}}
    else:
        chosen = {k: default if getattr(args, k) is None else getattr(args, k)
                  for k, default in FLAGS.items()}
        chosen["config"] = search_preset(chosen["preset"]).with_overrides(args.set).to_dict()
    for key in FLAGS:
        setattr(args, key, chosen[key])
    return chosen


def save(exp_dir: Path, chosen: dict) -> None:
    """Write ``settings.json`` (atomically) into the experiment directory."""
    exp_dir.mkdir(parents=True, exist_ok=True)
    tmp = exp_dir / (FILE + ".tmp")
    tmp.write_text(json.dumps(chosen, indent=2) + "\n")
    tmp.replace(exp_dir / FILE)
