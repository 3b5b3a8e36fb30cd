"""Cluster configs: valid for Ray's own launcher, images on the project's Ray, nothing exposed.

All offline: Ray's prepare_config + validate_config need no cloud credentials, and nothing
here starts Ray.
"""

import os
import re
import stat
import subprocess
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
RAY_UP_CONFIGS = ["cluster/gpu.yaml", "cluster/local.yaml"]
KUBERAY = "cluster/kuberay.yaml"
# Every file that names a Ray image, the helper and the cluster docs included.
IMAGE_FILES = [*RAY_UP_CONFIGS, KUBERAY, "cluster/Dockerfile"]
CLUSTER_FILES = [*IMAGE_FILES, "scripts/cluster.sh"]
DOCS = ["README.md", "docs/cluster.md"]  # the instructions: Ray pins and image tags


def _load(path: str):
    return yaml.safe_load((ROOT / path).read_text())


def _kuberay_cluster() -> dict:
    docs = list(yaml.safe_load_all((ROOT / KUBERAY).read_text()))
    (cluster,) = [d for d in docs if d["kind"] == "RayCluster"]
    return cluster


@pytest.mark.parametrize("path", RAY_UP_CONFIGS)
def test_ray_up_config_passes_rays_validation(path):
    validate_config(prepare_config(_load(path)))


def test_validation_rejects_a_typo_at_the_top_level():
    config = _load("cluster/gpu.yaml")
    config["idle_timout_minutes"] = 10
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))


def test_gpu_config_shape():
    config = _load("cluster/gpu.yaml")
    node_types = config["available_node_types"]
    head = node_types[config["head_node_type"]]
    workers = {name: t for name, t in node_types.items() if name != config["head_node_type"]}
    # Explicit integer resources everywhere: offline validation cannot ask AWS for them.
    for node_type in node_types.values():
        assert {"CPU", "GPU"} <= set(node_type["resources"])
        assert all(isinstance(v, int) for v in node_type["resources"].values())
    assert head["resources"]["GPU"] == 0 and head["resources"]["CPU"] > 0
    (gpu,) = workers.values()
    assert gpu["resources"]["GPU"] >= 1
    assert gpu["min_workers"] == 0 < gpu["max_workers"] <= config["max_workers"]
    assert 0 < config["idle_timeout_minutes"] <= 30
    # Workers need the bucket too; by profile name, never by an ARN with an account id.
    assert set(gpu["node_config"]["IamInstanceProfile"]) == {"Name"}
    # The checkout is synced and installed on every node (Ray images carry no torch), beside
    # the cluster's Ray token (test_ray_up_configs_run_ray_with_token_authentication).
    assert config["file_mounts"] == {"/home/ray/t2sda": ".", TOKEN_MOUNT: TOKEN_DIR}
    assert any("pip install" in c and "-e /home/ray/t2sda" in c for c in config["setup_commands"])


def _image_tags(text: str) -> list[str]:
    return re.findall(r"(?:rayproject/ray|/t2sda):([\w.\-]+)", text)


@pytest.mark.parametrize("path", IMAGE_FILES)
def test_image_tags_follow_the_installed_ray(path):
    tags = _image_tags((ROOT / path).read_text())
    assert tags, f"{path} names no Ray image"
    for tag in tags:
        assert tag.startswith(f"{ray.__version__}-py") and tag.endswith("-gpu"), (path, tag)


def test_image_tags_agree_everywhere():
    texts = [(ROOT / p).read_text() for p in [*CLUSTER_FILES, *DOCS]]
    tags = {tag for text in texts for tag in _image_tags(text)}
    assert tags == {next(iter(tags))} and next(iter(tags)).startswith(ray.__version__ + "-")


def test_ray_pins_in_instructions_follow_the_installed_ray():
    pins = re.findall(r"ray\[[\w,]+\]==([\w.]+)", "".join((ROOT / p).read_text() for p in DOCS))
    assert pins and set(pins) == {ray.__version__}


def test_kuberay_manifest_requests_gpus_on_the_projects_ray():
    cluster = _kuberay_cluster()
    spec = cluster["spec"]
    assert cluster["apiVersion"] == "ray.io/v1"
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    (group,) = spec["workerGroupSpecs"]
    assert group["minReplicas"] == 0 < group["maxReplicas"]
    (container,) = group["template"]["spec"]["containers"]
    for kind in ("requests", "limits"):
        assert int(container["resources"][kind]["nvidia.com/gpu"]) >= 1
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]


def test_kuberay_shares_one_read_write_many_volume():
    docs = list(yaml.safe_load_all((ROOT / KUBERAY).read_text()))
    (claim,) = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    spec = _kuberay_cluster()["spec"]
    pods = [spec["headGroupSpec"]["template"]["spec"], spec["workerGroupSpecs"][0]["template"]["spec"]]
    for pod in pods:
        volumes = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
        claims = [v["persistentVolumeClaim"]["claimName"] for v in volumes]
        assert claims == [claim["metadata"]["name"]]


def test_nothing_is_opened_to_the_world():
    for path in CLUSTER_FILES:
        text = (ROOT / path).read_text()
        assert "0.0.0.0/0" not in text and "::/0" not in text, path
    # No extra inbound rules: the launcher's default group admits SSH and intra-cluster only.
    provider = _load("cluster/gpu.yaml")["provider"]
    for rule in provider.get("security_group", {}).get("IpPermissions", []):
        assert rule["FromPort"] == rule["ToPort"] == 22
    # Kubernetes: the head service stays inside the cluster (port-forward to reach it).
    assert _kuberay_cluster()["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"
    # TensorBoard on the head listens on loopback only: the SSH tunnel is the way in.
    script = (ROOT / "scripts/cluster.sh").read_text()
    assert "tensorboard --logdir" in script and "--host 127.0.0.1" in script


# Token authentication: `ray up` copies the token directory you keep outside the repo (the one
# `scripts/cluster.sh token` fills) to every node; Ray reads the file through RAY_AUTH_TOKEN_PATH.
TOKEN_MOUNT, TOKEN_DIR = "/home/ray/t2sda-auth", "~/.ray/t2sda-auth"
TOKEN_SECRET = {"name": "t2sda-ray-token", "key": "auth_token"}  # KubeRay: a Secret, made by hand


def _env(entries: list[dict]) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in entries}


@pytest.mark.parametrize("path", RAY_UP_CONFIGS)
def test_ray_up_configs_run_ray_with_token_authentication(path):
    config = _load(path)
    # In the container's environment: every Ray process and command there (ray start on head and
    # workers, jobs, `ray exec`) runs in token mode and reads the token file.
    run_options = config["docker"]["run_options"]
    assert "-e RAY_AUTH_MODE=token" in run_options
    assert f"-e RAY_AUTH_TOKEN_PATH={TOKEN_MOUNT}/auth_token" in run_options
    assert config["file_mounts"][TOKEN_MOUNT] == TOKEN_DIR  # from the home dir, not the checkout
    commands = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert "RAY_AUTH" not in commands  # nothing turns it off (or names a token) per command
    # The ports stay bound or firewalled as before; the token is on top, not instead.
    assert "ray start --head --port=6379" in commands
    # The helper makes the token where the configs look for it.
    script = (ROOT / "scripts/cluster.sh").read_text()
    assert f'token_dir="$HOME/{TOKEN_DIR.removeprefix("~/")}"' in script


def test_kuberay_runs_ray_with_token_authentication():
    docs = list(yaml.safe_load_all((ROOT / KUBERAY).read_text()))
    assert all(d["kind"] != "Secret" for d in docs)  # made by `kubectl create secret`, not here
    spec = _kuberay_cluster()["spec"]
    envs = {"autoscaler": spec["autoscalerOptions"]["env"],
            "head": spec["headGroupSpec"]["template"]["spec"]["containers"][0]["env"],
            "worker": spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"]}
    for where, entries in envs.items():
        env = _env(entries)
        assert env["RAY_AUTH_MODE"] == "token", where
        assert env["RAY_AUTH_TOKEN"] == {"secretKeyRef": TOKEN_SECRET}, where
    # The header says how to make that Secret, from the token file outside the repo.
    text = (ROOT / KUBERAY).read_text()
    assert (f"kubectl create secret generic {TOKEN_SECRET['name']} "
            f"--from-file={TOKEN_SECRET['key']}=$HOME/.ray/t2sda-auth/auth_token") in text


SECRET_PATTERNS = {
    # A Ray token (`ray get-auth-token --generate`, `scripts/cluster.sh token`: 64 hex digits),
    # or any value given to RAY_AUTH_TOKEN other than a shell variable.
    "Ray token": r"(?<![0-9a-fA-F])[0-9a-fA-F]{32,}(?![0-9a-fA-F])",
    "RAY_AUTH_TOKEN value": r"RAY_AUTH_TOKEN(?:\s*=|:\s)\s*['\"]?[^\s$'\"{]",
    "AWS access key id": r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    "AWS secret key": r"(?i)aws_secret_access_key\s*[:=]",
    "account id": r"(?<![\d.])\d{12}(?![\d.])",
    "private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    "ARN with an account": r"arn:aws:[a-z0-9-]+:[a-z0-9-]*:\d{12}:",
}


@pytest.mark.parametrize("path", sorted({*CLUSTER_FILES, *(str(p.relative_to(ROOT))
                                                          for p in (ROOT / "cluster").iterdir())}))
def test_no_credentials_or_account_ids(path):
    text = (ROOT / path).read_text()
    for what, pattern in SECRET_PATTERNS.items():
        assert not re.search(pattern, text), f"{path}: looks like an {what}"


def test_secret_patterns_catch_what_they_should():
    leaky = "IamInstanceProfile: {Arn: arn:aws:iam::123456789012:instance-profile/x}  AKIAABCDEFGHIJKLMNOP"
    assert {w for w, p in SECRET_PATTERNS.items() if re.search(p, leaky)} >= {
        "AWS access key id", "account id", "ARN with an account"
    }
    for leak in ["- -e RAY_AUTH_TOKEN=hunter2", "  value: 0123456789abcdef0123456789abcdef0123",
                 "export RAY_AUTH_TOKEN='s3cret'", "RAY_AUTH_TOKEN: s3cret"]:
        assert any(re.search(p, leak) for p in SECRET_PATTERNS.values()), leak
    for fine in ["- -e RAY_AUTH_TOKEN_PATH=/home/ray/t2sda-auth/auth_token", 'RAY_AUTH_TOKEN="$(cat f)"',
                 "- name: RAY_AUTH_TOKEN", 'token="${RAY_AUTH_TOKEN:-}"']:
        assert not any(re.search(p, fine) for p in SECRET_PATTERNS.values()), fine


def test_ray_up_configs_keep_data_and_code_on_every_node():
    for path in RAY_UP_CONFIGS:
        config = _load(path)
        run_options = " ".join(config["docker"]["run_options"])
        assert "T2SDA_DATA=" in run_options, path
        # .gitignore keeps the local .venv and run dirs out of the sync.
        assert ".gitignore" in config["rsync_filter"], path
    local = _load("cluster/local.yaml")
    assert local["provider"]["type"] == "local" and local["provider"]["worker_ips"]


def test_helper_script_parses_and_fails_in_one_line():
    script = ROOT / "scripts/cluster.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    usage = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True)
    assert usage.returncode == 0
    for command in ("token", "up", "sync-data", "submit", "dashboard", "tensorboard", "fetch", "down"):
        assert f"  {command}" in usage.stdout
    for args, message in [
        (["bogus"], "unknown command 'bogus'"),
        (["--config", "cluster/kuberay.yaml", "up"], "is a KubeRay manifest: kubectl apply -f"),
        (["--config", "nope.yaml", "up"], "no cluster config nope.yaml"),
    ]:
        run = subprocess.run(["bash", str(script), *args], capture_output=True, text=True)
        assert run.returncode == 2, args
        assert run.stderr.strip().count("\n") == 0 and message in run.stderr, (args, run.stderr)


def test_helper_makes_a_private_token_once_and_up_needs_it(tmp_path):
    script, env = ROOT / "scripts/cluster.sh", {**os.environ, "HOME": str(tmp_path)}
    token_file = tmp_path / ".ray/t2sda-auth/auth_token"
    up = subprocess.run(["bash", str(script), "up"], capture_output=True, text=True, env=env)
    assert up.returncode == 2 and up.stderr.count("\n") == 1
    assert f"no Ray token at {token_file}: scripts/cluster.sh token makes one" in up.stderr
    made = subprocess.run(["bash", str(script), "token"], capture_output=True, text=True, env=env)
    assert made.returncode == 0 and str(token_file) in made.stdout
    token = token_file.read_text()
    assert re.fullmatch(r"[0-9a-f]{64}", token)  # 256 bits, no newline
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(token_file.parent.stat().st_mode) == 0o700
    again = subprocess.run(["bash", str(script), "token"], capture_output=True, text=True, env=env)
    assert again.returncode == 0 and "kept" in again.stdout and token_file.read_text() == token
