import pytest
import torch

from t2sda.presets import get_preset

# Two cores shared with everything else: one intra-op thread keeps tests predictable.
torch.set_num_threads(1)

TINY = [
    "data.image_size=32", "data.train_scenes=48", "data.val_scenes=16", "data.batch_size=4",
    "train.iters=6", "train.eval_every=3", "train.checkpoint_every=3", "train.log_every=2",
    "method.self_training_start=2", "method.pull_warmup=0", "method.weight_warmup=2",
    "method.pseudo_threshold=0.1", "method.num_queries=16", "method.num_negatives=16",
    "optim.warmup_iters=1",
]


@pytest.fixture
def tiny_cfg():
    """The digits preset shrunk to a few seconds: every piece of the method still runs."""
    return get_preset("digits").with_overrides(TINY)
