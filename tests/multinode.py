"""A real multi-node Ray cluster and a real S3 endpoint on this machine, for tests.

- :class:`S3Server`: moto's S3 server (``moto_server``) on 127.0.0.1, reached the way a MinIO or
  Ceph user reaches theirs: ``AWS_ENDPOINT_URL`` plus access keys in the environment.
- :class:`LocalCluster`: a head and worker nodes started with ``ray start --block``, each its
  own raylet with its own resources and process group, so a node can be killed whole
  (raylet and its workers) as a lost machine would be. The pytest process never joins it:
  commands under test reach it through ``RAY_ADDRESS`` in :meth:`LocalCluster.env`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(check, what: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {proc.returncode}")
        time.sleep(0.3)
    raise TimeoutError(f"{what}: not ready within {timeout:g} s")


def _kill_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(grace)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:  # whatever the group still holds (workers outliving their raylet)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


class S3Server:
    """moto's S3-compatible server on 127.0.0.1 with credentials for it in :attr:`env`."""

    def __init__(self, log_dir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_EC2_METADATA_DISABLED": "true"}
        self._log = open(log_dir / "moto.log", "wb")
        self.proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        _wait(self._up, "moto S3 server", proc=self.proc)

    def _up(self) -> bool:
        try:
            urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1).close()
            return True
        except OSError:
            return False

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def read(self, bucket: str, key: str) -> bytes:
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()

    def stop(self) -> None:
        _kill_group(self.proc)
        self._log.close()


class LocalCluster:
    """``ray start`` head (no CPU: it only coordinates) and worker nodes on this machine."""

    def __init__(self, log_dir: Path, env: dict[str, str] | None = None):
        self.log_dir = log_dir
        self.port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.base_env = {**os.environ, **(env or {})}
        self.base_env.pop("RAY_ADDRESS", None)  # never the test session's own Ray
        # Ray's state API clients (Train's placement-group cleaner among them) look for "a"
        # local Ray; with the session's own Ray on this machine too, name this one.
        self.base_env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{self.dashboard_port}"
        self.base_env.setdefault("RAY_AUTH_MODE", "disabled")
        self.nodes: dict[str, subprocess.Popen] = {}
        # Its own temp dir (short: Ray's socket paths must fit 107 bytes): `ray start` records
        # the cluster in <temp dir>/ray_current_cluster, and a plain ray.init() on this machine
        # would join the one recorded in the default /tmp/ray, even after it is gone.
        self.temp_dir = tempfile.mkdtemp(prefix="t2sda-ray-", dir="/tmp")
        self.head = self._start("head", ["--head", f"--port={self.port}", "--num-cpus=0",
                                         "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                                         f"--dashboard-port={self.dashboard_port}"])
        _wait(lambda: self._alive() >= 1, "Ray head", proc=self.head)

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.log_dir / f"ray-{name}.log", "ab")
        proc = subprocess.Popen([str(BIN / "ray"), "start", "--block", "--disable-usage-stats",
                                 "--object-store-memory=80000000", f"--temp-dir={self.temp_dir}", *args],
                                env=self.base_env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        log.close()
        self.nodes[name] = proc
        return proc

    def add_node(self, name: str, num_cpus: int = 2) -> None:
        before = self._alive()
        proc = self._start(name, [f"--address={self.address}", f"--num-cpus={num_cpus}",
                                  f"--resources={json.dumps({name: 1})}"])
        _wait(lambda: self._alive() > before, f"Ray node {name}", proc=proc)

    def kill_node(self, name: str) -> None:
        """The node's raylet and every process it started, killed at once (SIGKILL)."""
        proc = self.nodes.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def _alive(self) -> int:
        try:
            return len(self.nodes_info())
        except OSError:
            return 0

    def nodes_info(self) -> list[dict]:
        """Alive nodes from the dashboard's state API: [{"node_id", "resources_total", ...}]."""
        url = f"http://127.0.0.1:{self.dashboard_port}/api/v0/nodes?limit=100"
        with urllib.request.urlopen(url, timeout=5) as r:
            rows = json.load(r)["data"]["result"]["result"]
        return [n for n in rows if n.get("state") == "ALIVE"]

    def actors(self, class_name: str) -> list[dict]:
        url = (f"http://127.0.0.1:{self.dashboard_port}/api/v0/actors?limit=1000&detail=1"
               f"&filter_keys=class_name&filter_predicates=%3D&filter_values={class_name}")
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.load(r)["data"]["result"]["result"]

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a command that should run on this cluster."""
        return {**self.base_env, "RAY_ADDRESS": self.address, **extra}

    def stop(self) -> None:
        for name in [n for n in self.nodes if n != "head"]:
            _kill_group(self.nodes.pop(name))
        _kill_group(self.nodes.pop("head"))
        shutil.rmtree(self.temp_dir, ignore_errors=True)
