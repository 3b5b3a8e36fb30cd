"""Token authentication (issue 24): a local cluster started with ``RAY_AUTH_MODE=token`` refuses a
client without its token, or with a wrong one, in one line; with the token a tiny search runs.

The cluster is this module's own (``ray start --head --block`` in its own process group, with its
own ports, temp dir and HOME): the session's Ray (fixture ``ray_cluster``) is never joined or
stopped, and no ``~/.ray/auth_token`` is read or written. Teardown stops exactly the processes it
started: ``ray stop`` would stop every Ray on the machine, the session's included.
"""

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from t2sda.ray_glue import auth
from tests.conftest import TINY, free_port

ROOT = Path(__file__).resolve().parents[1]
# Whatever says which cluster to join or with which token: a client gets only what a test gives.
RAY_ENV = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
           "RAY_AUTH_TOKEN_PATH")


class TokenCluster:
    """A one-node Ray with token authentication on, its token a fresh random one."""

    def __init__(self, root: Path):
        self.token = secrets.token_hex(32)  # as `ray get-auth-token --generate` makes one
        self.home = root / "home"
        self.home.mkdir()
        # Ray's socket paths live under the temp dir and must stay short (AF_UNIX: 107 bytes).
        self.temp_dir = Path(tempfile.mkdtemp(prefix="t2sda-auth-"))
        self.port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        base = {k: v for k, v in os.environ.items() if k not in RAY_ENV}
        base["HOME"] = str(self.home)  # no ~/.ray/auth_token of the user's
        # A job's `python` is this venv's, as the image's is on a real cluster.
        base["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{base.get('PATH', '')}"
        # A client of this cluster; Ray's state API clients (Train's placement-group cleaner)
        # must find this cluster's dashboard, not the session's Ray.
        self.client_env = {**base, "RAY_ADDRESS": self.address, "RAY_API_SERVER_ADDRESS": self.dashboard}
        with open(root / "ray-head.log", "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                 f"--port={self.port}", f"--dashboard-port={self.dashboard_port}",
                 f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
                 "--dashboard-host=127.0.0.1", f"--temp-dir={self.temp_dir}", "--num-cpus=3",
                 "--object-store-memory=100000000", "--include-dashboard=true", "--disable-usage-stats"],
                env={**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token},
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.log = root / "ray-head.log"

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"ray start exited: {self.log.read_text()[-2000:]}"
            try:
                if self.alive_nodes(self.token):
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"the token cluster was not up within {timeout:g} s")

    def alive_nodes(self, token: str | None) -> int:
        """Alive nodes from the dashboard's state API, asked with ``token`` (None: no header)."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        request = urllib.request.Request(f"{self.dashboard}/api/v0/nodes?limit=10", headers=headers)
        with urllib.request.urlopen(request, timeout=5) as r:
            rows = json.load(r)["data"]["result"]["result"]
        return sum(1 for n in rows if n.get("state") == "ALIVE")

    def stop(self) -> list[int]:
        """SIGTERM to `ray start` (it stops its node, often within 2 s), SIGKILL after 5 s to
        whatever of its process group or descendants is left; returns the pids still running
        after that (none if all is well)."""
        started = _descendants(self.proc.pid)
        self.proc.terminate()  # `ray start` alone: a signal to its whole group makes it hang
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        for pid in started:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while any(_running(p) for p in started) and time.monotonic() < deadline:
            time.sleep(0.2)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return [p for p in started if _running(p)]


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    table = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout
    for row in table.splitlines():
        child, parent = map(int, row.split())
        children.setdefault(parent, []).append(child)
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _running(pid: int) -> bool:
    """Alive and not a zombie (Linux /proc)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.fixture(scope="module")
def token_cluster(tmp_path_factory):
    cluster = TokenCluster(tmp_path_factory.mktemp("token-cluster"))
    try:
        cluster.wait_ready()
        yield cluster
    finally:
        left = cluster.stop()
    assert not left, f"processes of the token cluster still running: {left}"
    # Nothing wrote a token into HOME (Ray makes ~/.ray/auth_token for a cluster of its own).
    assert not (cluster.home / ".ray" / "auth_token").exists()


def _tune(cluster: TokenCluster, storage: Path, **env: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "tune.py", "--space", "pull_loss", "--name", "auth", "--num-samples", "1",
            "--max-concurrent", "1", "--scheduler", "none", "--confirm", "0", "--no-shared-warmup",
            "--storage", str(storage), "--set", *TINY, "train.threads=1"]
    return subprocess.run(args, cwd=ROOT, env={**cluster.client_env, **env}, capture_output=True,
                          text=True, timeout=600)  # a hang guard only


@pytest.mark.ray
@pytest.mark.slow
def test_dashboard_api_needs_the_token(token_cluster):
    with pytest.raises(urllib.error.HTTPError) as missing:
        token_cluster.alive_nodes(None)
    assert missing.value.code == 401
    with pytest.raises(urllib.error.HTTPError) as wrong:
        token_cluster.alive_nodes("0" * 64)
    assert wrong.value.code == 403
    assert token_cluster.alive_nodes(token_cluster.token) == 1


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("env, why", [
    ({"RAY_AUTH_MODE": "token"}, "no token was found here"),
    ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}, "rejected this client's token"),
    ({"RAY_AUTH_TOKEN": "TOKEN"}, "RAY_AUTH_MODE is unset here, so no token was sent"),
], ids=["no-token", "wrong-token", "mode-unset"])
def test_a_client_without_the_token_is_refused_in_one_line(token_cluster, tmp_path, env, why):
    env = {k: token_cluster.token if v == "TOKEN" else v for k, v in env.items()}
    proc = _tune(token_cluster, tmp_path, **env)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    error = proc.stderr.strip()
    assert error.count("\n") == 0, error  # no traceback, no Ray log lines
    assert error.startswith(f"tune.py: error: Ray cluster at '{token_cluster.address}'")
    assert why in error and "set RAY_AUTH_TOKEN" in error and "RAY_AUTH_MODE=token" in error
    assert not (tmp_path / "auth" / "best_config.json").exists()


@pytest.mark.ray
@pytest.mark.slow
def test_a_client_with_the_token_runs_a_search(token_cluster, tmp_path):
    proc = _tune(token_cluster, tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token_cluster.token)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"connected to the Ray cluster at {token_cluster.address}" in proc.stdout
    best = json.loads((tmp_path / "auth" / "best_config.json").read_text())
    assert best


@pytest.mark.ray
@pytest.mark.slow
def test_cluster_helper_submits_with_the_token_and_refuses_a_wrong_one(token_cluster, tmp_path):
    """scripts/cluster.sh submit against the cluster's dashboard (as through its SSH tunnel)."""
    token_file = tmp_path / ".ray/t2sda-auth/auth_token"  # where `scripts/cluster.sh token` puts it
    token_file.parent.mkdir(parents=True)
    token_file.write_text(token_cluster.token)
    env = {**token_cluster.client_env, "HOME": str(tmp_path),
           "T2SDA_DASHBOARD_PORT": str(token_cluster.dashboard_port)}
    submit = ["bash", "scripts/cluster.sh", "--config", "cluster/local.yaml", "submit", "--list-spaces"]
    wrong = subprocess.run(submit, cwd=ROOT, env={**env, "RAY_AUTH_TOKEN": "0" * 64}, capture_output=True,
                           text=True, timeout=120)
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1, wrong.stdout + wrong.stderr
    assert "cluster.sh: error: the cluster refused the Ray token (HTTP 403)" in wrong.stderr
    job = subprocess.run(submit, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "pull_loss" in job.stdout and "succeeded" in job.stdout + job.stderr


@pytest.mark.parametrize("message, env, why", [
    ("RAY_AUTH_TOKEN_PATH is set but file cannot be opened or is empty: /nope",
     {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": "/nope"}, "RAY_AUTH_TOKEN_PATH=/nope cannot be read"),
    ("Token authentication is enabled but no authentication token was found", {"RAY_AUTH_MODE": "token"},
     "RAY_AUTH_MODE=token but no token was found here"),
    ("RPC error: InvalidAuthToken: Authentication token is missing or incorrect", {},
     "RAY_AUTH_MODE is unset here, so no token was sent"),
    ("RPC error: InvalidAuthToken: Authentication token is missing or incorrect", {"RAY_AUTH_MODE": "token"},
     "rejected this client's token"),
])
def test_the_refusal_says_what_to_set(monkeypatch, message, env, why):
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # As ray.init raises it after its retries: Ray's refusal two causes down, in a traceback's text.
    err = ConnectionError("Failed to connect to Ray cluster at 10.0.0.5:6379")
    err.__cause__ = RuntimeError(f"Failed to connect to GCS. Last connection error: Traceback ...\n"
                                 f"ray.exceptions.AuthenticationError: {message}")
    found = auth.failure(err)
    assert found is err.__cause__
    line = auth.refused("10.0.0.5:6379", found)
    assert line.startswith("Ray cluster at '10.0.0.5:6379'") and why in line and "\n" not in line
    assert "set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH)" in line and "RAY_AUTH_MODE=token" in line
    assert auth.failure(ConnectionError("Failed to connect to Ray cluster at 10.0.0.5:6379")) is None
