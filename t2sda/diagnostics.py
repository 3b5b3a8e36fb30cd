"""Feature-space diagnostics of "pulling target to source": pure functions on pixel features.

Every function takes pixel features (N, D) with their class labels (N,) and returns per-class
values (C,) (NaN for a class the inputs do not hold) or a number. The training loop feeds them a
fixed, labelled pixel sample of the source and target validation splits (t2sda/monitor.py);
labels serve only to measure, never to train.

- ``cross_domain_cos``: cosine of the target class mean to the source class mean (1 = the
  class sits in the same direction in both domains).
- ``target_to_source_acc``: target pixels classified by the nearest *source* class prototype
  (cosine): the share that lands with the source features of its own class.
- ``separability``: between-class over within-class scatter (trace ratio) in one domain.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def class_means(feat: torch.Tensor, label: torch.Tensor, num_classes: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class mean features (C, D) (zero rows for absent classes) and counts (C,)."""
    feat = feat.double()
    counts = torch.bincount(label, minlength=num_classes)[:num_classes]
    sums = feat.new_zeros(num_classes, feat.shape[1]).index_add_(0, label, feat)
    return sums / counts.clamp_min(1)[:, None], counts


def cross_domain_cos(src_feat: torch.Tensor, src_label: torch.Tensor, tgt_feat: torch.Tensor,
                     tgt_label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C,) cosine of each target class mean to the source class mean; NaN unless the class
    is present in both domains."""
    src_mean, src_n = class_means(src_feat, src_label, num_classes)
    tgt_mean, tgt_n = class_means(tgt_feat, tgt_label, num_classes)
    cos = F.cosine_similarity(src_mean, tgt_mean, dim=1)
    return torch.where((src_n > 0) & (tgt_n > 0), cos, torch.full_like(cos, float("nan")))


def target_to_source_acc(src_feat: torch.Tensor, src_label: torch.Tensor, tgt_feat: torch.Tensor,
                         tgt_label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C,) share of each class's target pixels whose nearest source prototype (cosine to the
    source class means, over classes present in the source sample) is their own class; NaN for
    classes without target pixels or without a source prototype."""
    src_mean, src_n = class_means(src_feat, src_label, num_classes)
    sim = F.normalize(tgt_feat.double(), dim=1) @ F.normalize(src_mean, dim=1).T
    sim[:, src_n == 0] = -float("inf")
    correct = (sim.argmax(dim=1) == tgt_label).double()
    hits = correct.new_zeros(num_classes).index_add_(0, tgt_label, correct)
    tgt_n = torch.bincount(tgt_label, minlength=num_classes)[:num_classes]
    acc = hits / tgt_n.clamp_min(1)
    return torch.where((tgt_n > 0) & (src_n > 0), acc, torch.full_like(acc, float("nan")))


def separability(feat: torch.Tensor, label: torch.Tensor, num_classes: int
                 ) -> tuple[float, torch.Tensor]:
    """Trace ratio tr(S_B) / tr(S_W) over the sample, and per class ||mu_c - mu||^2 over the
    class's mean squared distance to mu_c (NaN for absent classes).

    S_B = sum_c n_c (mu_c - mu)(mu_c - mu)^T, S_W = sum_i (x_i - mu_y)(x_i - mu_y)^T; larger
    means classes are further apart relative to their spread. Invariant to a global scale.
    """
    feat = feat.double()
    means, counts = class_means(feat, label, num_classes)
    centre = feat.mean(dim=0)
    between_c = ((means - centre) ** 2).sum(dim=1)
    within_i = ((feat - means[label]) ** 2).sum(dim=1)
    within_c = feat.new_zeros(num_classes).index_add_(0, label, within_i) / counts.clamp_min(1)
    ratio = (counts * between_c).sum() / within_i.sum().clamp_min(1e-12)
    per_class = between_c / within_c.clamp_min(1e-12)
    return ratio.item(), torch.where(counts > 0, per_class, torch.full_like(per_class, float("nan")))


def balanced_sample(label: torch.Tensor, *, per_class: int, num_classes: int,
                    generator: torch.Generator) -> torch.Tensor:
    """Positions (n,) of up to ``per_class`` pixels of each class of a flat label map, drawn
    with ``generator`` (ignore and out-of-range labels never drawn), sorted."""
    picks = []
    for c in range(num_classes):
        where = (label == c).nonzero().squeeze(1)
        order = torch.randperm(len(where), generator=generator)[:per_class]
        picks.append(where[order.to(where.device)])
    return torch.cat(picks).sort().values


def feature_metrics(src_feat: torch.Tensor, src_label: torch.Tensor, tgt_feat: torch.Tensor,
                    tgt_label: torch.Tensor, num_classes: int) -> dict[str, tuple[float, torch.Tensor]]:
    """Every diagnostic: name -> (class-averaged value, per-class values (C,))."""
    out = {}
    for name, fn in (("cross_domain_cos", cross_domain_cos),
                     ("target_to_source_acc", target_to_source_acc)):
        per_class = fn(src_feat, src_label, tgt_feat, tgt_label, num_classes)
        out[name] = (per_class.nanmean().item(), per_class)
    out["separability_source"] = separability(src_feat, src_label, num_classes)
    out["separability_target"] = separability(tgt_feat, tgt_label, num_classes)
    return out
