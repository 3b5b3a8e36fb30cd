"""A search's own files live with its experiment, also when that is in a bucket.

Tune keeps its state (trials, searcher, scheduler) in the experiment directory under
``--storage``; the search adds ``settings.json`` (what to resume with), ``warmup.json`` (the
shared warm-up's checkpoint), ``changes.jsonl`` and, at the end, its results. With a local
``--storage`` they are all in ``<storage>/<name>``. With a bucket, the bucket is the source of
truth: the driver works in a local copy (``runs/tune-logs/<scheme>/<bucket>/<prefix>/<name>``,
one per bucket and prefix, so a search of the same name elsewhere never sees it), which is
replaced by the bucket's files when the search starts and written back to the bucket as each
file changes. A driver on another machine can therefore resume the search, and a copy left
from an older bucket or prefix is never read.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from t2sda import remote
from t2sda.checkpoint import CheckpointError
from t2sda.config import ConfigError

log = logging.getLogger("t2sda")
# The files a search needs to resume, relative to the experiment directory.
STATE = ("settings.json", "warmup.json", "changes.jsonl", "confirm/warmup.json")
CACHE = Path("runs/tune-logs")


class Experiment:
    """``uri``: the experiment in a bucket (None for local storage); ``local``: where the driver
    reads and writes the search's files (the experiment itself for local storage)."""

    def __init__(self, storage: str, name: str, cache: Path | None = None):
        if remote.is_uri(storage):
            self.uri: str | None = f"{storage.rstrip('/')}/{name}"
            self.local = remote.local_path(self.uri, (cache or CACHE).resolve())
        else:
            self.uri = None
            self.local = Path(storage.removeprefix("file://")).resolve() / name

    def __str__(self) -> str:
        return self.uri or str(self.local)

    def open(self, *, resume: bool, can_resume) -> None:
        """Check the bucket: a new search needs an empty place, ``--resume`` a search there
        (``can_resume()``: Tune's state or an interrupted warm-up is present). Then the local
        copy is made anew from the bucket's state files. Local storage: nothing to do."""
        if self.uri is None:
            return
        try:
            present = remote.files(self.uri)
        except CheckpointError as err:
            raise ConfigError(f"--storage: {err}") from None
        if not resume and present:
            raise ConfigError(f"experiment {self.uri} exists; pass --resume to continue it, or "
                              "choose another --name")
        if resume and not (can_resume() or any(p.startswith("warmup/") for p in present)):
            raise ConfigError(f"--resume: no experiment to resume at {self.uri}")
        if self.local.exists():
            shutil.rmtree(self.local)  # whatever an earlier search left here: the bucket decides
        self.local.mkdir(parents=True)
        copied = remote.download(self.uri, self.local, keep=lambda rel: rel in STATE)
        if copied:
            log.info("experiment %s: %s from the bucket into %s", self.uri, ", ".join(copied), self.local)

    def push(self, *names: str) -> None:
        """Write these files (relative to the experiment) back to the bucket, if there is one."""
        if self.uri is not None:
            remote.upload(self.local, self.uri, names=list(names))


def checkpoint_exists(location: str) -> bool:
    """Whether a checkpoint directory (a path or a URI) is still there."""
    if remote.is_uri(location):
        try:
            return remote.exists(location)
        except CheckpointError:
            return False
    return Path(location).is_dir()
