import atexit
import os
import shutil
import tempfile

import pytest
import torch

from t2sda.presets import get_preset

# Scans and rendered digits scenes go to a cache shared by this run's processes (xdist
# workers, Ray workers and CLI subprocesses inherit it), never to the user's ~/.cache.
# The process that makes it (the xdist controller, which outlives its workers) removes it.
if not os.environ.get("T2SDA_CACHE_DIR"):
    os.environ["T2SDA_CACHE_DIR"] = tempfile.mkdtemp(prefix="t2sda-test-cache-")
    atexit.register(shutil.rmtree, os.environ["T2SDA_CACHE_DIR"], ignore_errors=True)

# Two cores shared with everything else: one intra-op thread keeps tests predictable.
torch.set_num_threads(1)

TINY = [
    "data.image_size=32", "data.train_scenes=48", "data.val_scenes=16", "data.batch_size=4",
    "data.source_val_images=8",
    "train.iters=6", "train.eval_every=3", "train.checkpoint_every=3", "train.log_every=2",
    "method.self_training_start=2", "method.pull_warmup=0", "method.weight_warmup=2",
    "method.pseudo_threshold=0.1", "method.num_queries=16", "method.num_negatives=16",
    "optim.warmup_iters=1",
]


def free_port() -> int:
    """A TCP port free right now on localhost, for a test's own gloo process group."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_worker(rank: int, world: int, port: int, fn, out: str, args: tuple) -> None:
    import os
    import time
    from pathlib import Path

    import torch.distributed as tdist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    done = [Path(f"{out}.rank{r}-done") for r in range(world)]
    try:
        result = fn(rank, *args)
        if rank == 0:
            torch.save(result, out)
        tdist.barrier()
    finally:
        # Rank 0 hosts the group's TCP store: if it exits while another rank is still tearing
        # down, that rank's gloo may abort ("terminate called without an active exception",
        # SIGABRT; seen once in CI). So the other ranks finish first and rank 0 waits for them.
        if rank != 0:
            tdist.destroy_process_group()
            done[rank].touch()
        else:
            deadline = time.monotonic() + 60
            while not all(d.exists() for d in done[1:]) and time.monotonic() < deadline:
                time.sleep(0.05)
            tdist.destroy_process_group()


def spawn_gloo(fn, out: str, *args, world: int = 2):
    """Run ``fn(rank, *args)`` (a module-level function) on ``world`` spawned processes joined
    in a gloo group; returns rank 0's result (saved through the file ``out``)."""
    import torch.multiprocessing as mp

    mp.spawn(_gloo_worker, args=(world, free_port(), fn, out, args), nprocs=world, join=True)
    return torch.load(out)


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (scripts/test.sh: ``-n 2 --dist loadgroup``) every test that uses Ray
    runs on one worker, so the session starts one Ray; the other worker takes the rest."""
    for item in items:
        if item.get_closest_marker("ray") or "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("ray"))


@pytest.fixture
def tiny_cfg():
    """The digits preset shrunk to a few seconds: every piece of the method still runs."""
    return get_preset("digits").with_overrides(TINY)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session (starting one costs ~8 s on two cores).

    4 logical CPUs so a 2-worker run fits beside a Tune driver. The dashboard is on: Ray
    Train's placement-group cleaner needs its state API. Subprocesses (the CLI under test)
    join this cluster through RAY_ADDRESS.
    """
    import os

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Ray's state API clients (Train's placement-group cleaner) look for "a" local Ray: with a
    # second cluster on this machine (tests/test_multinode.py) they must find this one.
    port = free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=4, include_dashboard=True, dashboard_port=port, object_store_memory=100 * 2**20,
             log_to_driver=False)
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    yield ray
    os.environ.pop("RAY_ADDRESS", None)
    os.environ.pop("RAY_API_SERVER_ADDRESS", None)
    ray.shutdown()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A digits run dir holding one untrained small_cnn checkpoint (step 7), for the commands
    that use a trained model (predict, export)."""
    from t2sda import checkpoint
    from t2sda.state import build_state

    root = tmp_path_factory.mktemp("run")
    cfg = get_preset("digits")
    cfg.save(root / "config.json")
    state = build_state(cfg, num_classes=11, device=torch.device("cpu"))
    checkpoint.save(root / "checkpoints" / "step_7", {"state": state.state_dict(), "step": 7}, score=1.0)
    return root


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 (tests/multinode.py), its endpoint and keys exported the
    way a MinIO user would export them, for this process and its subprocesses."""
    from tests.multinode import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3"))
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    yield server
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()
