"""check_storage: where a search may keep its results, decided before any trial starts.

Offline: URIs are checked for their scheme here; the network probe runs against pyarrow's
in-memory filesystem in place of a bucket.
"""

import os

import pyarrow.fs
import pytest

from t2sda.config import ConfigError
from t2sda.ray_glue import storage
from t2sda.ray_glue.storage import check_storage, mount_fstype


def _mounts(tmp_path, *entries):
    """A fake /proc/mounts: (mount point, fstype) pairs."""
    path = tmp_path / "mounts"
    path.write_text("".join(f"dev{i} {point} {fstype} rw 0 0\n" for i, (point, fstype) in enumerate(entries)))
    return str(path)


def _error(**kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        check_storage(**kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_local_path_is_created_and_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    got = check_storage("results/search", num_nodes=1)
    assert got == str(tmp_path / "results" / "search")
    assert os.path.isdir(got) and os.listdir(got) == []  # the write check leaves nothing behind


def test_file_uri_is_a_local_path(tmp_path):
    assert check_storage(f"file://{tmp_path}/r", num_nodes=1) == f"{tmp_path}/r"


def test_unwritable_local_path_is_refused(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert "not a writable directory" in _error(storage=str(blocker / "sub"), num_nodes=1)
    assert "is not a directory" in _error(storage=str(blocker), num_nodes=1)


def test_read_only_directory_is_refused(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    if os.geteuid() == 0:  # root (CI) writes anywhere: its write fails as a user's would
        def deny(path, *args, **kwargs):
            raise PermissionError(13, "Permission denied", path)

        monkeypatch.setattr(storage, "open", deny, raising=False)
    assert "not a writable directory (Permission denied)" in _error(storage=str(ro), num_nodes=1)
    assert list(ro.iterdir()) == []  # no probe left behind


def test_empty_storage_is_refused():
    assert "--storage is empty" in _error(storage="  ", num_nodes=1)


def test_multi_node_local_path_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "MOUNTS", _mounts(tmp_path, ("/", "ext4")))
    message = _error(storage=str(tmp_path / "r"), num_nodes=3)
    assert f"local path {tmp_path / 'r'}" in message
    assert "is not shared across the 3 nodes of this cluster" in message
    assert "--storage s3://" in message
    # One node: the same path is fine.
    assert check_storage(str(tmp_path / "r"), num_nodes=1) == str(tmp_path / "r")


@pytest.mark.parametrize("fstype", ["nfs4", "lustre", "fuse.mount-s3"])
def test_multi_node_path_on_a_network_filesystem_is_accepted(tmp_path, monkeypatch, fstype):
    monkeypatch.setattr(storage, "MOUNTS", _mounts(tmp_path, ("/", "ext4"), (str(tmp_path), fstype)))
    assert check_storage(str(tmp_path / "r"), num_nodes=4) == str(tmp_path / "r")


def test_multi_node_without_a_mount_table_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "MOUNTS", str(tmp_path / "missing"))
    assert "(filesystem unknown) is not shared" in _error(storage=str(tmp_path), num_nodes=2)


def test_mount_fstype_takes_the_longest_mount_point(tmp_path):
    mounts = _mounts(
        tmp_path, ("/", "ext4"), ("/mnt/shared", "nfs4"), ("/mnt/shared2", "xfs"),
        (r"/mnt/my\040disk", "cifs"),
    )
    assert mount_fstype("/mnt/shared/a/b", mounts) == "nfs4"
    assert mount_fstype("/mnt/shared", mounts) == "nfs4"
    assert mount_fstype("/mnt/shared2/a", mounts) == "xfs"
    assert mount_fstype("/mnt/sharedX", mounts) == "ext4"
    assert mount_fstype("/mnt/my disk/x", mounts) == "cifs"


def test_uri_without_probe_is_normalised():
    assert check_storage("s3://bucket/t2sda/", num_nodes=8, probe=False) == "s3://bucket/t2sda"
    assert check_storage("gs://bucket", num_nodes=8, probe=False) == "gs://bucket"


@pytest.mark.parametrize("uri", ["s4://bucket/x", "http://host/x", "s3a://bucket/x"])
def test_unknown_scheme_is_refused(uri):
    scheme = uri.split("://")[0]
    message = _error(storage=uri, num_nodes=2, probe=False)
    assert f"unknown scheme '{scheme}://'" in message and "s3://" in message


def test_uri_without_bucket_is_refused():
    assert "no bucket name" in _error(storage="s3:///t2sda", num_nodes=2, probe=False)


class _FakeFileSystem:
    """Stands in for pyarrow.fs.FileSystem: from_uri answers with an in-memory filesystem."""

    fs = None
    error = None

    @classmethod
    def from_uri(cls, uri):
        if cls.error:
            raise cls.error
        return cls.fs, uri.split("://", 1)[1]


@pytest.fixture
def fake_bucket(monkeypatch):
    _FakeFileSystem.fs = pyarrow.fs._MockFileSystem()
    _FakeFileSystem.error = None
    monkeypatch.setattr(pyarrow.fs, "FileSystem", _FakeFileSystem)
    return _FakeFileSystem


def test_probe_accepts_a_writable_bucket_and_cleans_up(fake_bucket):
    fake_bucket.fs.create_dir("bucket")
    assert check_storage("s3://bucket/t2sda", num_nodes=4) == "s3://bucket/t2sda"
    left = fake_bucket.fs.get_file_info(pyarrow.fs.FileSelector("bucket", recursive=True))
    assert [i.path for i in left if i.type == pyarrow.fs.FileType.File] == []


def test_probe_refuses_a_missing_bucket(fake_bucket):
    assert "bucket 'nobucket' does not exist" in _error(storage="s3://nobucket/t2sda", num_nodes=4)


def test_probe_turns_access_errors_into_one_line(fake_bucket):
    fake_bucket.error = OSError("AWS Error ACCESS_DENIED during HeadBucket operation\nmore detail")
    message = _error(storage="s3://bucket/t2sda", num_nodes=4)
    assert "cannot write there (AWS Error ACCESS_DENIED during HeadBucket operation)" in message
    assert "instance profile" in message
