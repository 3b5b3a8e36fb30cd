import pytest
import torch

from t2sda.presets import get_preset

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
    ray.init(num_cpus=4, include_dashboard=True, object_store_memory=100 * 2**20,
             log_to_driver=False)
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    yield ray
    os.environ.pop("RAY_ADDRESS", None)
    ray.shutdown()
