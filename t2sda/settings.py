"""A resumed run (or search) keeps the settings it was started with.

The run dir's ``config.json`` (and a search's ``settings.json``) hold what the first command
said. On resume a command that repeats them, or says nothing, continues under them; one that
differs is refused with one line naming the keys, unless ``--change-on-resume`` asks for the
change: then the differences are printed in one line and appended to ``changes.jsonl``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from t2sda.config import ConfigError

log = logging.getLogger("t2sda")
CHANGES = "changes.jsonl"


def flatten(raw: dict, prefix: str = "") -> dict:
    """Nested dict -> {"a.b": value}."""
    flat = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def differences(stored: dict, requested: dict) -> dict[str, list]:
    """{dotted key: [stored value, requested value]} for every key whose values differ."""
    old, new = flatten(stored), flatten(requested)
    return {k: [old.get(k), new.get(k)] for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k)}


def describe(changes: dict[str, list]) -> str:
    return ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())


def reconcile(stored: dict, requested: dict, *, change: bool, where: Path, what: str) -> dict:
    """The settings to resume ``where`` with: ``stored``, or ``requested`` when they differ and
    ``change`` allows it (the change recorded in ``where/changes.jsonl``).

    Raises a one-line ConfigError naming the differing keys when they differ without ``change``.
    """
    changes = differences(stored, requested)
    if not changes:
        return stored
    if not change:
        raise ConfigError(f"--resume: {what} differs from the one {where} was started with "
                          f"({describe(changes)}); drop the flag(s) to continue as started, or "
                          "pass --change-on-resume to change it")
    log.warning("--change-on-resume: %s changed (%s); recorded in %s", what, describe(changes),
                where / CHANGES)
    with (where / CHANGES).open("a") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "what": what,
                            "changes": changes}) + "\n")
    return requested
