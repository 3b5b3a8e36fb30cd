"""Runs and experiments in a bucket, against a real S3 protocol server (moto, on 127.0.0.1)
reached through AWS_ENDPOINT_URL: the storage probe, the experiment's own files kept in the
bucket (the local copy replaced by the bucket's), stale warm-up records, and `evaluate` on a
run that lives in the bucket. No Ray: tests/test_multinode.py runs the cluster."""

import json
import uuid

import pytest

from t2sda import remote
from t2sda.__main__ import main
from t2sda.checkpoint import CheckpointError
from t2sda.config import ConfigError
from t2sda.ray_glue import exp_state
from t2sda.ray_glue.storage import check_storage


@pytest.fixture
def bucket(s3_server):
    return s3_server.make_bucket(f"t2sda-{uuid.uuid4().hex[:12]}")


def test_storage_probe_reaches_the_endpoint(bucket):
    assert check_storage(f"s3://{bucket}/t2sda/", num_nodes=3) == f"s3://{bucket}/t2sda"
    with pytest.raises(ConfigError, match="bucket 'no-such-bucket-t2sda' does not exist"):
        check_storage("s3://no-such-bucket-t2sda/t2sda", num_nodes=3)


def test_upload_download_and_listing(bucket, tmp_path):
    src = tmp_path / "src"
    (src / "checkpoint_1").mkdir(parents=True)
    (src / "metrics.jsonl").write_text('{"step": 3}\n')
    (src / "checkpoint_1" / "state.pt").write_bytes(b"x" * 3_000_000)  # more than one chunk
    (src / "checkpoint_1" / "meta.json").write_text("{}")
    uri = f"s3://{bucket}/run"
    remote.upload(src, uri)
    assert remote.files(uri) == {"metrics.jsonl": 12, "checkpoint_1/state.pt": 3_000_000,
                                 "checkpoint_1/meta.json": 2}
    got = remote.download(uri, tmp_path / "logs", keep=remote.not_checkpoint)
    assert got == ["metrics.jsonl"] and (tmp_path / "logs" / "metrics.jsonl").read_text() == '{"step": 3}\n'
    assert remote.exists(f"{uri}/checkpoint_1") and not remote.exists(f"{uri}/checkpoint_2")
    assert remote.files(f"s3://{bucket}/nothing-here") == {}


def test_experiment_state_lives_in_the_bucket(bucket, tmp_path):
    storage = f"s3://{bucket}/exp"
    exp = exp_state.Experiment(storage, "search", cache=tmp_path / "cache")
    assert exp.local == tmp_path / "cache" / "s3" / bucket / "exp" / "search"
    with pytest.raises(ConfigError, match="no experiment to resume"):
        exp.open(resume=True, can_resume=lambda: False)
    # A copy left by an earlier search of the same name (another bucket's, say) is not read.
    exp.local.mkdir(parents=True)
    (exp.local / "warmup.json").write_text('{"checkpoint": "s3://old-bucket/gone"}')
    exp.open(resume=False, can_resume=lambda: False)
    assert not (exp.local / "warmup.json").exists()
    (exp.local / "settings.json").write_text('{"space": "pull_loss"}')
    (exp.local / "confirm").mkdir()
    (exp.local / "confirm" / "warmup.json").write_text("{}")
    exp.push("settings.json", "confirm/warmup.json", "changes.jsonl")  # absent files are skipped
    assert remote.files(f"{storage}/search") == {"settings.json": 22, "confirm/warmup.json": 2}

    # Another machine (another cache) resumes: the state comes from the bucket.
    other = exp_state.Experiment(storage, "search", cache=tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="exists; pass --resume"):
        other.open(resume=False, can_resume=lambda: True)
    other.open(resume=True, can_resume=lambda: True)
    assert json.loads((other.local / "settings.json").read_text()) == {"space": "pull_loss"}
    assert (other.local / "confirm" / "warmup.json").exists()
    # A different prefix is a different experiment, with its own copy.
    assert exp_state.Experiment(f"s3://{bucket}/exp2", "search").local != exp.local


def test_stale_checkpoint_in_a_bucket_is_seen(bucket, tmp_path):
    uri = f"s3://{bucket}/exp/warmup/checkpoint_2026"
    assert not exp_state.checkpoint_exists(uri)
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "state.pt").write_bytes(b"1")
    remote.upload(tmp_path / "ck", uri)
    assert exp_state.checkpoint_exists(uri)
    assert not exp_state.checkpoint_exists(str(tmp_path / "gone"))


def test_evaluate_a_run_in_the_bucket(bucket, run_dir, tmp_path, capsys):
    """The same scores from the bucket as from the run dir it was copied from; eval.json is
    written beside the run in the bucket."""
    uri = f"s3://{bucket}/runs/digits"
    remote.upload(run_dir, uri)
    assert main(["evaluate", "--run-dir", str(run_dir), "--out", str(tmp_path / "local")]) == 0
    assert main(["evaluate", "--run-dir", uri]) == 0
    local = json.loads((tmp_path / "local" / "eval.json").read_text())
    from_bucket = json.loads(remote_read(uri + "/eval/eval.json"))
    assert from_bucket["mIoU"] == pytest.approx(local["mIoU"]) and from_bucket["step"] == 7
    assert main(["evaluate", "--run-dir", f"s3://{bucket}/runs/nothing"]) == 2
    assert "nothing there" in capsys.readouterr().err


def remote_read(uri: str) -> str:
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def test_unreachable_endpoint_is_one_line(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(CheckpointError, match="cannot list"):
        remote.files("s3://any-bucket/x")
