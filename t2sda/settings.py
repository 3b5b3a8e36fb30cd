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


def parse_workers(text: str, flag: str, *, minimum: int = 1) -> int | tuple[int, int]:
    """``N`` or ``MIN-MAX`` (an elastic run: Ray Train starts with what fits between the two
    and resizes as nodes come and go); a ConfigError naming ``flag`` otherwise."""
    text = str(text).strip()
    try:
        numbers = [int(text)]  # a single number, negative ones included (refused below)
    except ValueError:
        try:
            numbers = [int(p) for p in text.split("-")]
        except ValueError:
            numbers = []
    if len(numbers) not in (1, 2):
        raise ConfigError(f"{flag} {text!r}: expected a number N or a range MIN-MAX, e.g. 2-4")
    if len(numbers) == 1:
        if numbers[0] < minimum:
            raise ConfigError(f"{flag} {text}: must be >= {minimum}")
        return numbers[0]
    low, high = numbers
    if low < 1 or high < low:
        raise ConfigError(f"{flag} {text}: a range needs 1 <= MIN <= MAX")
    return low if low == high else (low, high)


def most_workers(workers: int | tuple[int, int]) -> int:
    return workers[1] if isinstance(workers, tuple) else workers


def fewest_workers(workers: int | tuple[int, int]) -> int:
    return workers[0] if isinstance(workers, tuple) else workers
