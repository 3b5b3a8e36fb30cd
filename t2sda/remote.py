"""Runs and experiments kept in a bucket (``s3://``, ``gs://`` ...), read and written through
pyarrow.fs, the layer Ray itself writes checkpoints with.

An S3-compatible store other than AWS (MinIO, Ceph, a test server) is named the way the AWS
SDKs name it: ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) in the environment, with
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``; every node needs the same variables.
pyarrow is imported only when a URI is used, so the core runs without it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from t2sda.checkpoint import CheckpointError


def is_uri(location: str | os.PathLike | None) -> bool:
    """A bucket URI (not a path, nor a ``file://`` URI, which is a path)."""
    text = str(location or "")
    return "://" in text and not text.startswith("file://")


def _fs(uri: str):
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(uri)
    except Exception as err:  # ArrowInvalid for unknown schemes, OSError for no credentials
        raise CheckpointError(f"{uri}: cannot open ({_first_line(err)})") from None


def files(uri: str) -> dict[str, int]:
    """Every file under ``uri``: its path relative to ``uri`` -> size ({} when nothing is there)."""
    import pyarrow.fs

    fs, root = _fs(uri)
    root = root.rstrip("/")
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True, allow_not_found=True))
    except Exception as err:
        raise CheckpointError(f"{uri}: cannot list ({_first_line(err)})") from None
    return {info.path[len(root) + 1:]: info.size for info in infos
            if info.type == pyarrow.fs.FileType.File}


def exists(uri: str) -> bool:
    """Whether ``uri`` is a file or a non-empty directory."""
    import pyarrow.fs

    fs, path = _fs(uri)
    info = fs.get_file_info(path.rstrip("/"))
    if info.type == pyarrow.fs.FileType.File:
        return True
    return bool(files(uri)) if info.type == pyarrow.fs.FileType.Directory else False


def download(uri: str, local: str | Path, *, keep: Callable[[str], bool] = lambda rel: True) -> list[str]:
    """Copy the files under ``uri`` for which ``keep(relative path)`` holds into ``local``
    (each written to a temporary name, then renamed); returns the relative paths copied."""
    fs, root = _fs(uri)
    local, root, copied = Path(local), root.rstrip("/"), []
    for rel in sorted(files(uri)):
        if not keep(rel):
            continue
        target = local / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".part")
        with fs.open_input_stream(f"{root}/{rel}") as src, open(tmp, "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
        tmp.replace(target)
        copied.append(rel)
    return copied


def upload(local: str | Path, uri: str, *, names: list[str] | None = None) -> None:
    """Copy the files of ``local`` (only ``names`` when given, relative paths) to ``uri``."""
    local = Path(local)
    fs, root = _fs(uri)
    root = root.rstrip("/")
    chosen = names if names is not None else [str(p.relative_to(local)) for p in sorted(local.rglob("*"))
                                              if p.is_file()]
    for rel in chosen:
        path = local / rel
        if not path.is_file():
            continue
        with open(path, "rb") as src, fs.open_output_stream(f"{root}/{rel}") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)


def delete(uri: str) -> None:
    """Remove the object ``uri`` (nothing when it is not there)."""
    fs, path = _fs(uri)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def not_checkpoint(rel: str) -> bool:
    """A run's logs (config, metrics, TensorBoard), not Ray's checkpoint directories or markers."""
    top = rel.split("/", 1)[0]
    return not top.startswith("checkpoint") and not top.startswith(".")


def mirror_run(uri: str, root: str | Path | None = None) -> Path:
    """A local copy of a run kept in a bucket: its logs and every checkpoint's ``meta.json``
    (enough to choose one), at :func:`local_path`. :func:`fetch_checkpoint` then brings the
    chosen checkpoint's weights."""
    if not files(uri):
        raise CheckpointError(f"--run-dir {uri}: nothing there (check the bucket, the prefix and "
                              "AWS_ENDPOINT_URL for an S3-compatible store)")
    local = local_path(uri, root)
    download(uri, local, keep=lambda rel: not_checkpoint(rel) or rel.endswith("/meta.json"))
    return local


def fetch_checkpoint(uri: str, local_run: Path, checkpoint_dir: Path) -> Path:
    """Download the weights of one checkpoint of :func:`mirror_run`'s copy (if not already there)."""
    rel = checkpoint_dir.relative_to(local_run).as_posix()
    download(f"{uri.rstrip('/')}/{rel}", checkpoint_dir,
             keep=lambda name: not (checkpoint_dir / name).is_file())
    return checkpoint_dir


def local_path(uri: str, root: str | Path | None = None) -> Path:
    """Where a copy of ``uri`` lives on this machine: ``root/<scheme>/<bucket>/<path>``, one
    directory per bucket and path, so two buckets (or prefixes) never share a copy. ``root``
    defaults to ``$T2SDA_CACHE_DIR/runs`` (else ~/.cache/t2sda/runs)."""
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if root is None:
        root = Path(os.environ.get("T2SDA_CACHE_DIR") or Path.home() / ".cache" / "t2sda") / "runs"
    return Path(root) / parts.scheme / parts.netloc / parts.path.strip("/")


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else type(err).__name__
