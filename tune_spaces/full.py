"""Everything at once: pull loss, weighting, teacher, lr, pseudo labels, translation, sampling, MIC."""

from __future__ import annotations

from tune_spaces import _knobs

DESCRIPTION = ("all of the method: pull loss, weighting, teacher EMA, lr, pseudo labels, translation, "
               "sampling, MIC on/off and its mask ratio")
NUM_SAMPLES = 12
GRACE_PERIOD = 400


def define(trial, adaptation_steps: int | None = None) -> None:
    """lr around the preset's 1e-3; FDA beta small, as small images want (docs/METHOD.md)."""
    _knobs.pull(trial)
    _knobs.weights(trial, adaptation_steps)
    _knobs.teacher(trial, adaptation_steps)
    trial.suggest_float("optim.lr", 2e-4, 5e-3, log=True)
    trial.suggest_float("method.pseudo_threshold", 0.8, 0.99)
    if trial.suggest_categorical("method.translate", ("fda", "color", "none")) == "fda":
        trial.suggest_float("method.fda_beta", 0.01, 0.2, log=True)
    trial.suggest_int("method.num_queries", 32, 256, log=True)
    trial.suggest_int("method.num_negatives", 32, 256, log=True)
    # MIC's masked image consistency (weight 1 as MIC, or off); its mask ratio around MIC's 0.7
    if trial.suggest_categorical("method.mic_weight", (0.0, 1.0)) > 0:
        trial.suggest_float("method.mic_mask_ratio", 0.3, 0.9)
