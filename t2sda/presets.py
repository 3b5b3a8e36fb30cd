"""Named starting configurations: functions returning a Config (no inheritance)."""

from __future__ import annotations

from collections.abc import Callable

from t2sda.config import (
    Config,
    ConfigError,
    DataConfig,
    MethodConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
)


def digits() -> Config:
    """The embedded default: DigitScenes -> DigitScenes-M at strength 0.5, a small CNN trained
    from scratch on CPU in a few minutes (source-only warm-up, then adaptation)."""
    return Config(
        seed=0,
        data=DataConfig(name="digits", strength=0.5, batch_size=32),
        model=ModelConfig(name="small_cnn", proj_dim=64),
        method=MethodConfig(
            self_training_start=600,
            ema_momentum=0.99,
            pseudo_threshold=0.968,
            fda_beta=0.05,
            pull_weight=0.1,
            pull_warmup=100,
            pull_temperature=0.2,
            num_queries=128,
            num_negatives=128,
            weight_warmup=300,
        ),
        optim=OptimConfig(lr=1e-3, head_lr_mult=1.0, weight_decay=0.01, warmup_iters=50),
        train=TrainConfig(iters=1200, eval_every=200, checkpoint_every=200, log_every=20),
    )


def digits_hard() -> Config:
    """The full MNIST-M-style gap (strength 1.0), where plain self-training can collapse."""
    cfg = digits()
    return cfg.with_overrides({"data.strength": 1.0})


PRESETS: dict[str, Callable[[], Config]] = {
    "digits": digits,
    "digits_hard": digits_hard,
}


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return PRESETS[name]()
