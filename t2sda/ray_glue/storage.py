"""Where a search keeps its results, checked before any trial starts.

Ray writes every trial's results, checkpoints and TensorBoard events under ``storage_path``.
On one machine any writable directory does. On a cluster every node writes there, so it must
be storage all nodes share: a bucket (``s3://``, ``gs://``, ...) or a network filesystem
mounted at the same path everywhere. A node-local path on a multi-node cluster seems to work
until a trial's checkpoints land on a disk nobody else sees, so it is refused here, up front,
with one line saying what to pass instead.
"""

from __future__ import annotations

import os
import uuid
from urllib.parse import urlsplit

from t2sda.config import ConfigError

# URI schemes Ray can write to through pyarrow.fs (its storage layer). Anything else with
# "://" is almost always a typo (s3a://, s4://, http://), and Ray would fail deep in a trial.
URI_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs")

# Filesystem types (the third field of /proc/mounts) that every node can mount at the same
# path. "fuse.*" covers bucket and cluster filesystems mounted through FUSE
# (fuse.mount-s3, fuse.gcsfuse, fuse.juicefs, fuse.sshfs, ...).
NETWORK_FSTYPES = frozenset(
    {"nfs", "nfs4", "lustre", "efs", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "gpfs", "beegfs"}
)

MOUNTS = "/proc/mounts"


def check_storage(storage: str, *, num_nodes: int, probe: bool = True) -> str:
    """Return ``storage`` normalised for Ray's ``storage_path``, or raise ConfigError.

    - a URI (``s3://bucket/prefix``): the scheme must be one Ray can write to; with ``probe``
      the bucket is reached through pyarrow.fs and a marker object is written and deleted
      (this uses the network and the node's credentials: instance profile or environment).
      Returned without a trailing slash.
    - a path (or ``file://`` URI): made absolute, created if missing, must be writable; with
      ``num_nodes > 1`` it must lie on a network filesystem (NFS, EFS, Lustre, FUSE, ...).

    ``num_nodes`` is how many nodes the search may span. An autoscaling cluster starts with
    its head alone, so a caller attached to an existing cluster should pass at least 2.
    """
    if not storage or not storage.strip():
        raise ConfigError("--storage is empty; pass a directory or a URI such as s3://BUCKET/t2sda")
    storage = storage.strip()
    if "://" in storage:
        scheme = urlsplit(storage).scheme.lower()
        if scheme == "file":
            storage = storage[len("file://"):]
        else:
            return _check_uri(storage, scheme, probe=probe)
    return _check_local(storage, num_nodes=num_nodes)


def _check_uri(uri: str, scheme: str, *, probe: bool) -> str:
    if scheme not in URI_SCHEMES:
        known = ", ".join(f"{s}://" for s in URI_SCHEMES)
        raise ConfigError(f"--storage {uri}: unknown scheme '{scheme}://'; use one of {known} or a path")
    if not urlsplit(uri).netloc:
        raise ConfigError(f"--storage {uri}: no bucket name; expected {scheme}://BUCKET/PREFIX")
    uri = uri.rstrip("/")
    if probe:
        _probe_uri(uri)
    return uri


def _probe_uri(uri: str) -> None:
    """Network check: the bucket exists and a small object can be written and deleted."""
    import pyarrow.fs

    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(uri)
        bucket = path.split("/", 1)[0]
        if fs.get_file_info(bucket).type == pyarrow.fs.FileType.NotFound:
            raise ConfigError(f"--storage {uri}: bucket '{bucket}' does not exist (or is not visible)")
        fs.create_dir(path, recursive=True)  # filesystems with real directories (HDFS) need it
        marker = f"{path}/.t2sda-write-check-{uuid.uuid4().hex}"
        with fs.open_output_stream(marker) as out:
            out.write(b"ok")
        fs.delete_file(marker)
    except ConfigError:
        raise
    except Exception as e:  # pyarrow raises OSError/ArrowInvalid with multi-line AWS/GCS text
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(
            f"--storage {uri}: cannot write there ({reason}); check the bucket name and the "
            "credentials (instance profile or environment)"
        ) from None


def _check_local(path: str, *, num_nodes: int) -> str:
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--storage {path}: exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        marker = os.path.join(path, f".t2sda-write-check-{uuid.uuid4().hex}")
        with open(marker, "wb") as f:
            f.write(b"ok")
        os.remove(marker)
    except OSError as e:
        raise ConfigError(f"--storage {path}: not a writable directory ({e.strerror or e})") from None
    if num_nodes > 1:
        fstype = mount_fstype(path)
        if not is_network_fs(fstype):
            raise ConfigError(
                f"--storage {path}: local path {path} (filesystem {fstype or 'unknown'}) is not shared "
                f"across the {num_nodes} nodes of this cluster; pass --storage s3://... or a shared "
                "mount (NFS, EFS, Lustre)"
            )
    return path


def is_network_fs(fstype: str | None) -> bool:
    return bool(fstype) and (fstype in NETWORK_FSTYPES or fstype.startswith("fuse."))


def mount_fstype(path: str, mounts: str | None = None) -> str | None:
    """Filesystem type of the mount holding ``path`` (longest matching mount point), or None
    where the mount table cannot be read (not Linux)."""
    try:
        with open(mounts or MOUNTS) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    path = os.path.realpath(path)
    best, best_type = "", None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        # /proc/mounts escapes blanks in mount points as octal (\040 = space).
        point = fields[1].encode().decode("unicode_escape")
        inside = point == "/" or path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, best_type = point, fields[2]
    return best_type
