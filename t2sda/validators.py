"""Label-free model-selection scores ("validators"), and the direction each is optimised in.

A user adapting to an unlabelled domain cannot rank runs by target mIoU. These scores use data
such a user has: labelled *source* images held out of training, and unlabelled target images.

- ``source_miou``: the student's mIoU on the held-out source validation split (max).
- ``agreement``: share of target pixels where teacher and student predict the same class (max).
- ``entropy``: mean entropy (nats) of the student's per-pixel prediction on target (min).
- ``snd``: soft neighbourhood density (Saito et al., ICCV 2021, "Tune it the Right Way"):
  L2-normalised target pixel predictions, cosine similarity of each to every other one, a
  softmax over those similarities at temperature 0.05, and the mean entropy of that softmax
  (max: a dense neighbourhood of similar predictions). As in the paper, the features are the
  softmax class probabilities.

``target_miou`` is the one score that needs target labels (today's search metric).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# name -> mode: which way is better. ``target_miou`` uses target labels; the rest do not.
DIRECTIONS: dict[str, str] = {
    "target_miou": "max",
    "source_miou": "max",
    "agreement": "max",
    "entropy": "min",
    "snd": "max",
}
LABEL_FREE = tuple(name for name in DIRECTIONS if name != "target_miou")
SND_TEMPERATURE = 0.05


def best_key(name: str) -> str:
    """The best-so-far metric a run reports for ``name`` (what a search ranks by)."""
    return "val/best_mIoU" if name == "target_miou" else f"select/best_{name}"


def better(name: str, a: float, b: float) -> float:
    """The better of two values of ``name`` in its direction."""
    return max(a, b) if DIRECTIONS[name] == "max" else min(a, b)


def entropy_sum(logits: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum over pixels of the prediction entropy (nats) of logits (B, C, H, W), and the count."""
    logp = F.log_softmax(logits.float(), dim=1)
    ent = -(logp.exp() * logp).sum(dim=1)
    return ent.double().sum(), ent.numel()


def agreement_count(logits_a: torch.Tensor, logits_b: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Pixels where two models' argmax classes agree, and the pixel count."""
    same = logits_a.argmax(dim=1) == logits_b.argmax(dim=1)
    return same.sum().double(), same.numel()


def snd(feat: torch.Tensor, temperature: float = SND_TEMPERATURE) -> float:
    """Soft neighbourhood density of features (N, D), N >= 2: mean over i of the entropy of
    softmax_j(cos(f_i, f_j) / temperature), j != i."""
    if len(feat) < 2:
        raise ValueError(f"snd needs at least 2 features, got {len(feat)}")
    f = F.normalize(feat.double(), dim=1)
    sim = f @ f.T / temperature
    sim.fill_diagonal_(-float("inf"))
    logp = F.log_softmax(sim, dim=1)
    p = logp.exp()
    ent = -(p * logp.masked_fill(p == 0, 0)).sum(dim=1)
    return ent.mean().item()
