"""Read every file of a dataset split once: sizes, readability, per-image label-id histograms.

The same scan serves ``data check`` (full decode of every image) and dataset construction
(image headers and PNG checksums only, plus every label decoded). Training keeps the result
in a cache file keyed by the files' sizes and modification times, so only new or changed
files are read again; rare-class sampling takes its class statistics from it.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from t2sda.data import folders, labels

_VERSION = 1
_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def default_cache_dir() -> Path:
    """``$T2SDA_CACHE_DIR``, else ``$XDG_CACHE_HOME/t2sda``, else ``~/.cache/t2sda``."""
    if os.environ.get("T2SDA_CACHE_DIR"):
        return Path(os.environ["T2SDA_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "t2sda"


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def scan_file(root: Path, image: str, label: str | None, *, bits16: bool, full: bool) -> dict:
    """One image (and its label): {"size": [w, h], "hist": {id: pixels}, "error": str|None}."""
    record = {"stat": _stat(root / image) + (_stat(root / label) if label else []),
              "full": full, "size": None, "hist": {}, "error": None}
    path = root / image
    try:
        with Image.open(path) as im:
            record["size"] = list(im.size)
            im.load() if full else im.verify()  # verify: PNG chunk checksums, no decoding
        if label is None:
            return record
        path = root / label
        ids = folders.read_label(path, bits16=bits16, exact=True)
    except _ERRORS as err:
        record["error"] = f"{path}: unreadable ({str(err).strip() or type(err).__name__})"
        return record
    if list(ids.shape[::-1]) != record["size"]:
        record["error"] = (f"{path}: label is {ids.shape[1]}x{ids.shape[0]}, its image "
                           f"{root / image} is {record['size'][0]}x{record['size'][1]}")
    counts = np.bincount(ids.ravel())
    record["hist"] = {str(i): int(counts[i]) for i in np.flatnonzero(counts)}  # JSON keys
    return record


def scan(name: str, root: str | Path, files: list[tuple[str, str | None]], *, full: bool,
         workers: int = 0, cache_dir: str | Path | None = None) -> list[dict]:
    """Records of ``files`` (see ``scan_file``), in order; read in ``workers`` threads (Pillow
    decodes outside the GIL). With ``cache_dir`` unchanged files come from the cache."""
    root, bits16 = Path(root).resolve(), folders.layout(name).bits16
    cache = cached = None
    if cache_dir is not None:
        key = hashlib.sha1(f"{name}\0{root}".encode()).hexdigest()[:16]
        cache = Path(cache_dir) / f"scan-{name}-{key}.json"
        cached = _load(cache)
    records: list[dict | None] = [None] * len(files)
    todo = []
    for i, (image, label) in enumerate(files):
        old = cached.get(image) if cached else None
        try:
            fresh = _stat(root / image) + (_stat(root / label) if label else [])
        except OSError:
            fresh = None
        if old and old["stat"] == fresh and (old["full"] or not full):
            records[i] = old
        else:
            todo.append(i)
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        fresh = pool.map(lambda i: scan_file(root, *files[i], bits16=bits16, full=full), todo)
        for i, record in zip(todo, fresh):
            records[i] = record
    if cache is not None and todo:
        merged = dict(cached or {})
        merged.update({image: r for (image, _), r in zip(files, records)})
        _save(cache, merged)
    return records


def _load(path: Path) -> dict | None:
    try:
        raw = json.loads(path.read_text())
        return raw["files"] if raw.get("version") == _VERSION else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # no or unusable cache: scan again


def _save(path: Path, files: dict) -> None:
    """Atomic write: DDP ranks may scan at the same time; each replaces the file whole."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": _VERSION, "files": files}))
        tmp.replace(path)
    except OSError:
        pass  # an unwritable cache dir only costs a rescan next time


def class_pixels(records: list[dict], table: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, C + 1) int64 pixels per train id of each image; the last column counts ignored
    pixels (ids mapped to ignore, and unknown ids)."""
    out = np.zeros((len(records), num_classes + 1), np.int64)
    for n, record in enumerate(records):
        for label_id, pixels in record["hist"].items():
            train_id = table[int(label_id)] if int(label_id) < len(table) else labels.UNKNOWN
            out[n, train_id if 0 <= train_id < num_classes else num_classes] += pixels
    return out


def unknown_ids(record: dict, table: np.ndarray) -> list[int]:
    return sorted(int(i) for i in record["hist"]
                  if int(i) >= len(table) or table[int(i)] == labels.UNKNOWN)


def problems(records: list[dict], files: list[tuple[str, str | None]], root: str | Path,
             table: np.ndarray) -> list[str]:
    """One line per bad file: unreadable, size mismatch, label ids outside the table."""
    out = []
    for record, (_, label) in zip(records, files):
        if record["error"]:
            out.append(record["error"])
        bad = unknown_ids(record, table)
        if bad:
            shown = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
            out.append(f"{Path(root) / label}: label ids outside the table: {shown}")
    return out
