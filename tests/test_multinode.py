"""A search on a real multi-node Ray cluster (a head and two worker nodes, each its own raylet,
tests/multinode.py) with its storage in a real S3 endpoint (moto on 127.0.0.1): trials whose
2 DDP workers sit on different nodes, everything in the bucket, the driver killed and the search
resumed from another directory (another machine's view: no local copy), a worker node killed
mid-trial, and `evaluate` on a trial read from the bucket."""

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.multinode import LocalCluster
from tests.test_tune import TINY_SEARCH

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.xdist_group("multinode")]
HANG_GUARD = 900  # seconds; not a speed check, only stops a hung cluster


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory):
    # Ray notices a lost node after its health checks fail: 3 s here instead of ~30 s.
    fast = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
            "RAY_health_check_failure_threshold": "3"}
    c = LocalCluster(tmp_path_factory.mktemp("cluster"), env={**s3_server.env, **fast})
    try:
        c.add_node("node1", num_cpus=2)
        c.add_node("node2", num_cpus=2)
        yield c
    finally:
        c.stop()


def _trial_runs(s3, bucket: str, prefix: str) -> dict[str, list[int]]:
    """train-<id> -> the steps of its metrics.jsonl in the bucket."""
    out = {}
    for key in s3.keys(bucket, prefix):
        parts = key[len(prefix):].split("/")
        if len(parts) == 2 and parts[0].startswith("train-") and parts[1] == "metrics.jsonl":
            text = s3.read(bucket, key).decode()
            out[parts[0]] = [json.loads(line)["step"] for line in text.splitlines() if line.strip()]
    return out


def _lines(path: Path) -> list[str]:
    return path.read_text(errors="replace").splitlines()


def _after_resume(tmp_path: Path, start: int) -> list[str]:
    """Lines of the resumed driver's log after ``start`` that follow a restart's resume line."""
    lines = _lines(tmp_path / "driver2.log")[start:]
    marks = [i for i, line in enumerate(lines) if "resuming from step " in line]
    return lines[marks[0] + 1:] if marks else []


def _wait_for(predicate, proc, what: str):
    deadline = time.monotonic() + HANG_GUARD
    while not (found := predicate()):
        assert proc.poll() is None, f"the search ended before {what}"
        assert time.monotonic() < deadline, f"hung waiting for {what}"
        time.sleep(0.5)
    return found


def test_search_on_two_nodes_in_a_bucket_survives_driver_and_node_loss(cluster, s3_server, tmp_path):
    bucket = s3_server.make_bucket(f"t2sda-{uuid.uuid4().hex[:10]}")
    prefix = "exp/mn/"
    args = [sys.executable, str(ROOT / "tune.py"), "--space", "pull_loss", "--num-samples", "2",
            "--max-concurrent", "1", "--workers-per-trial", "2", "--placement", "spread",
            "--scheduler", "none", "--confirm", "0", "--storage", f"s3://{bucket}/exp", "--name", "mn",
            "--set", *TINY_SEARCH, "train.iters=12", "train.eval_every=3", "train.checkpoint_every=3"]
    env = cluster.env()
    first_dir, second_dir = tmp_path / "driver1", tmp_path / "driver2"  # two machines' views
    first_dir.mkdir(), second_dir.mkdir()

    # 1. The driver is killed (SIGKILL) once a trial has a checkpoint in the bucket.
    log1 = open(tmp_path / "driver1.log", "w")
    proc = subprocess.Popen(args, cwd=first_dir, env=env, stdout=log1, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: any(steps for steps in _trial_runs(s3_server, bucket, prefix).values()),
                  proc, "a trial's first report")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        log1.close()
    assert {"settings.json", "warmup.json"} <= {k[len(prefix):] for k in s3_server.keys(bucket, prefix)}

    # 2. Resumed from elsewhere; a worker node is killed while the second trial trains.
    log2 = open(tmp_path / "driver2.log", "w")
    proc = subprocess.Popen([*args, "--resume"], cwd=second_dir, env=env, stdout=log2,
                            stderr=subprocess.STDOUT)
    try:
        def one_done_one_started():
            runs = _trial_runs(s3_server, bucket, prefix)
            done = [r for r, steps in runs.items() if steps and steps[-1] == 12]
            going = [r for r, steps in runs.items() if steps and steps[-1] < 12]
            return (done[0], going[0]) if done and going else None

        finished, running = _wait_for(one_done_one_started, proc, "the second trial's first report")
        finished_before = s3_server.read(bucket, f"{prefix}{finished}/metrics.jsonl")
        step_at_kill = _trial_runs(s3_server, bucket, prefix)[running][-1]
        log_at_kill = len(_lines(tmp_path / "driver2.log"))
        killed_at = time.monotonic()
        cluster.kill_node("node2")
        # Recovery: from the kill to the restarted workers' first report.
        _wait_for(lambda: any("t2sda: step" in line for line in _after_resume(tmp_path, log_at_kill)),
                  proc, "a report after the node was lost")
        recovery_s = time.monotonic() - killed_at
        proc.wait(HANG_GUARD)
    finally:
        proc.kill()
        log2.close()
        if "node2" not in cluster.nodes:
            cluster.add_node("node2", num_cpus=2)  # the next test's cluster is whole again
    out = (tmp_path / "driver1.log").read_text() + (tmp_path / "driver2.log").read_text()
    assert proc.returncode == 0, out[-4000:]

    # Placement: each trial's two workers on two nodes (rank 0's line), while both were up.
    assert "t2sda: 2 worker(s) on 2 node(s) (1 + 1)" in out
    assert "no Optuna state" not in out  # the searcher's state read back from the bucket
    # The lost node cost at most one checkpoint interval (3 steps) of the running trial.
    lines = _lines(tmp_path / "driver2.log")
    resumed = [int(line.split("resuming from step ")[1].split()[0])
               for line in lines[log_at_kill:] if "resuming from step " in line]
    before = lines[:log_at_kill]  # the running trial's reports: after its start line
    start = max(i for i, line in enumerate(before) if "starting after the shared warm-up" in line)
    reported = [int(line.split("t2sda: step ")[1].split()[0])
                for line in before[start:] if "t2sda: step " in line]
    # Each report in the bucket came with its checkpoint (eval_every = checkpoint_every), so the
    # restart begins at or after the last one seen there: the workers, at most one checkpoint
    # interval ahead of their last checkpoint when the node went, lost at most 3 steps.
    assert resumed and resumed[0] >= step_at_kill
    print(f"\nnode lost: the bucket's last report was step {step_at_kill} (driver log: "
          f"{max(reported, default=None)}); resumed from step {resumed[0]}; first report of the restarted "
          f"workers {recovery_s:.1f} s after the loss")

    # Everything is in the bucket: each trial's logs continue without a gap or a repeat, the
    # finished trial untouched; results, TensorBoard events and checkpoints beside them.
    runs = _trial_runs(s3_server, bucket, prefix)
    assert sorted(runs.values()) == [[3, 6, 9, 12], [3, 6, 9, 12]]
    assert s3_server.read(bucket, f"{prefix}{finished}/metrics.jsonl") == finished_before
    keys = [k[len(prefix):] for k in s3_server.keys(bucket, prefix)]
    for name in ("results.csv", "best_config.json", "summary.png", "settings.json", "warmup.json"):
        assert name in keys
    for run in runs:
        assert any(k.startswith(f"{run}/events.out.tfevents") for k in keys)
        assert any(k.startswith(f"{run}/checkpoint_") and k.endswith("/state.pt") for k in keys)
    rows = list(csv.DictReader(io.StringIO(s3_server.read(bucket, f"{prefix}results.csv").decode())))
    assert [r["status"] for r in rows] == ["TERMINATED", "TERMINATED"]
    assert all(r["run_dir"].startswith(f"s3://{bucket}/exp/mn/train-") for r in rows)

    # 3. A trial in the bucket scored by `evaluate`, from a directory that never saw it.
    evaluated = subprocess.run([sys.executable, "-m", "t2sda", "evaluate", "--run-dir", rows[0]["run_dir"]],
                               cwd=second_dir, env={**env, "T2SDA_CACHE_DIR": str(tmp_path / "cache")},
                               capture_output=True, text=True, timeout=HANG_GUARD)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    key = rows[0]["run_dir"].split(f"{bucket}/", 1)[1] + "/eval/eval.json"
    report = json.loads(s3_server.read(bucket, key))
    assert 0 <= report["mIoU"] <= 100 and report["step"] in (3, 6, 9, 12)


def test_local_cluster_env_names_its_own_state_api(cluster):
    """The cluster's processes find its dashboard, not the session's Ray (see LocalCluster)."""
    env = cluster.env()
    assert env["RAY_API_SERVER_ADDRESS"].endswith(str(cluster.dashboard_port))
    assert os.environ.get("RAY_ADDRESS") != env["RAY_ADDRESS"]


def test_elastic_run_shrinks_when_a_node_is_lost_and_grows_back(cluster, tmp_path):
    """`train --workers 1-2`: one worker per node (2 CPUs each, 2 per node), a node killed ->
    the run continues on one worker from its last checkpoint, the node back -> two again;
    metrics record the world size at each evaluation."""
    run_dir = tmp_path / "elastic"
    metrics = run_dir / "metrics.jsonl"
    args = [sys.executable, "-m", "t2sda", "train", "--workers", "1-2", "--placement", "spread",
            "--cpus-per-worker", "2", "--max-failures", "3", "--run-dir", str(run_dir),
            # long enough never to end by itself: stopped once it has grown back
            "--set", *TINY_SEARCH, "train.iters=5000", "train.eval_every=10", "train.checkpoint_every=10"]
    log = open(tmp_path / "train.log", "w")
    # Checks for room to grow every 2 s; a placement that cannot happen times out after 10 s.
    env = cluster.env(T2SDA_ELASTIC_RESIZE_S="2", RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="10")
    proc = subprocess.Popen(args, cwd=tmp_path, env=env,
                            stdout=log, stderr=subprocess.STDOUT)

    def sizes() -> list[tuple[int, int]]:
        rows = [json.loads(line) for line in _lines(metrics) if line.strip()] if metrics.exists() else []
        return [(row["step"], row["dist/world_size"]) for row in rows]

    try:
        _wait_for(lambda: [s for s in sizes() if s[1] == 2], proc, "a report on two workers")
        lost_at = time.monotonic()
        cluster.kill_node("node2")
        _wait_for(lambda: sizes() and sizes()[-1][1] == 1, proc, "a report on one worker")
        shrunk_s, back_at = time.monotonic() - lost_at, time.monotonic()
        cluster.add_node("node2", num_cpus=2)
        _wait_for(lambda: sizes() and sizes()[-1][1] == 2, proc, "a report on two workers again")
        grown_s = time.monotonic() - back_at
    finally:
        proc.kill()
        proc.wait()
        log.close()
        if "node2" not in cluster.nodes:
            cluster.add_node("node2", num_cpus=2)
    steps, worlds = zip(*sizes())
    assert list(steps) == list(range(10, 10 * len(steps) + 1, 10))  # continuous: each restart
    changes = [w for i, w in enumerate(worlds) if i == 0 or worlds[i - 1] != w]  # resumed the log
    # It may start on one worker while the other node's CPUs are still being freed, and grow.
    assert set(worlds) == {1, 2} and changes[-3:] == [2, 1, 2], worlds
    print(f"\nelastic: node lost -> first report on 1 worker {shrunk_s:.1f} s; node back -> first "
          f"report on 2 workers {grown_s:.1f} s (incl. the node's start); world sizes {worlds}")
