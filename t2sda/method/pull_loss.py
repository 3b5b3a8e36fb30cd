"""The pulling loss: target(-like) features are pulled toward source class prototypes.

Source is the anchor: keys (teacher features of source pixels) carry no gradient; queries
(student features of target-like and confident target pixels) move.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from t2sda import dist


def _sample(index: torch.Tensor, count: int | None) -> torch.Tensor:
    if count is None or len(index) <= count:
        return index
    return index[torch.randperm(len(index), device=index.device)[:count]]


def pull_loss(
    query: torch.Tensor,
    query_label: torch.Tensor,
    key: torch.Tensor,
    key_label: torch.Tensor,
    *,
    temperature: float,
    class_weight: torch.Tensor | None = None,
    prototypes: torch.Tensor | None = None,
    num_queries: int | None = None,
    num_negatives: int | None = None,
    ignore_index: int = 255,
) -> torch.Tensor:
    """InfoNCE of each query against its class prototype, with other-class keys as negatives.

    query (N, D) with grad, query_label (N,); key (M, D) (detached here), key_label (M,);
    prototypes (C, D) optional: the positive of class c is ``prototypes[c]`` when given (rows
    that are all zero or not finite count as missing), else the normalised mean of the keys of
    class c. Queries and keys are L2-normalised here. Classes count when they have both
    queries and keys.

    Per query: -log(e^{q.p/t} / (e^{q.p/t} + sum_neg e^{q.k/t})); class loss = mean over its
    queries (``num_queries`` sampled when given); result = sum_c w_c L_c / sum_c w_c over those
    classes (w = 1 without ``class_weight`` (C,)). With
    ``num_negatives`` the negatives are sampled from the other classes' keys, once per class
    and shared by its queries, so memory is O(C * num_negatives * D + N * num_negatives), never
    O(N * M). Returns a zero that keeps the graph when no class qualifies.
    """
    device = query.device
    query = F.normalize(query, dim=1)
    key = F.normalize(key.detach().to(query.dtype), dim=1)
    valid_key = key_label != ignore_index
    labels = torch.cat([query_label, key_label])
    num_classes = 1 + max(int(labels.masked_fill(labels == ignore_index, -1).max()),
                          len(prototypes) - 1 if prototypes is not None else -1)
    if num_classes == 0:
        return query.sum() * 0.0
    # Positives (C, D): the class's prototype if given, else the mean of its keys. Only classes
    # with keys in this call take part (to cover classes missing from a batch, pass the bank's
    # prototypes as the keys: ``negatives=prototypes``).
    key_sum = torch.zeros(num_classes, key.shape[1], device=device, dtype=key.dtype)
    key_sum.index_add_(0, key_label[valid_key], key[valid_key])
    has_positive = torch.bincount(key_label[valid_key], minlength=num_classes) > 0
    positive = F.normalize(key_sum, dim=1)
    if prototypes is not None:
        proto = prototypes.detach().to(query.dtype)
        has_proto = torch.isfinite(proto).all(dim=1) & (proto.abs().sum(dim=1) > 0)
        has_proto = F.pad(has_proto, (0, num_classes - len(proto)))
        proto = F.pad(F.normalize(proto.nan_to_num(0.0), dim=1), (0, 0, 0, num_classes - len(proto)))
        positive = torch.where(has_proto[:, None], proto, positive)
    # Queries of qualifying classes, at most ``num_queries`` per class, grouped by class.
    usable = (query_label != ignore_index) & has_positive[query_label.clamp(0, num_classes - 1)]
    picked = sample_index(torch.where(usable, query_label, ignore_index), per_class=num_queries,
                          ignore_index=ignore_index)
    # Group by class (stable): the per-class rank below needs it, and sample_index only
    # groups when it samples (num_queries=None keeps pixel order).
    picked = picked[torch.argsort(query_label[picked], stable=True)]
    if len(picked) == 0:
        return query.sum() * 0.0
    q, q_label = query[picked], query_label[picked]
    classes, slot, counts = torch.unique(q_label, return_inverse=True, return_counts=True)
    # Negatives per class (K classes, n_neg): random order, other classes' keys only.
    is_negative = valid_key[None, :] & (key_label[None, :] != classes[:, None])  # (K, M)
    n_neg = key.shape[0] if num_negatives is None else min(num_negatives, key.shape[0])
    scores = torch.rand(is_negative.shape, device=device).masked_fill(~is_negative, -1.0)
    top, neg_index = scores.topk(n_neg, dim=1)  # (K, n_neg)
    neg_ok = top >= 0
    # Queries padded per class -> one batched matmul against their class's negatives.
    rank = torch.arange(len(q), device=device) - (torch.cumsum(counts, 0) - counts)[slot]
    padded = q.new_zeros(len(classes), int(counts.max()), q.shape[1])
    padded = padded.index_put((slot, rank), q)
    neg_logits = torch.bmm(padded, key[neg_index].transpose(1, 2))[slot, rank]  # (n, n_neg)
    neg_logits = neg_logits.masked_fill(~neg_ok[slot], float("-inf"))
    pos_logits = (q * positive[q_label]).sum(dim=1, keepdim=True)
    logits = torch.cat([pos_logits, neg_logits], dim=1) / temperature
    per_query = torch.logsumexp(logits, dim=1) - logits[:, 0]
    per_class = torch.zeros(len(classes), device=device, dtype=q.dtype).index_add(0, slot, per_query)
    per_class = per_class / counts
    w = class_weight[classes].to(q.dtype) if class_weight is not None else torch.ones_like(per_class)
    return (w * per_class).sum() / w.sum().clamp_min(1e-12)


def sample_index(label: torch.Tensor, *, per_class: int | None, balanced: bool = True,
                 ignore_index: int = 255) -> torch.Tensor:
    """Pick labelled pixels of a flat label map (n,): returns their positions (k,).

    ``balanced``: up to ``per_class`` pixels of every class present, so frequent classes such
    as background cannot crowd out the rest; otherwise ``per_class * classes present`` pixels
    drawn uniformly.
    """
    if per_class is None:
        return torch.nonzero(label != ignore_index).squeeze(1)
    valid_mask = label != ignore_index
    if not valid_mask.any():  # e.g. target-only queries and no confident pixel this step
        return torch.zeros(0, dtype=torch.long, device=label.device)
    counts = torch.bincount(label[valid_mask])
    if not balanced:
        valid = torch.nonzero(valid_mask).squeeze(1)
        return _sample(valid, per_class * int((counts > 0).sum()))
    # Thin every class to a little over ``per_class`` candidates first (keep probability
    # (k + 4 sqrt(k) + 8) / count: short by chance about never), so the sort below stays small
    # even when one class (background) covers most pixels.
    keep = (per_class + 4 * per_class**0.5 + 8) / counts.clamp_min(1).float()
    safe = torch.where(valid_mask, label, 0)
    chosen = valid_mask & (torch.rand(label.shape, device=label.device) < keep[safe])
    valid = torch.nonzero(chosen).squeeze(1)
    cls = label[valid]
    # Order candidates by class, randomly within a class; keep the first ``per_class`` each.
    order = torch.argsort(cls * 2.0 + torch.rand(len(cls), device=label.device))
    kept = torch.bincount(cls, minlength=len(counts))
    starts = torch.cumsum(kept, 0) - kept
    rank = torch.arange(len(cls), device=label.device) - starts[cls[order]]
    return valid[order[rank < per_class]]


class PrototypeBank:
    """Per-class EMA of normalised mean source keys, identical on every DDP rank.

    Keeps a positive for classes missing from the current batch and makes the anchor a
    summary of many source images instead of the image the query came from.
    """

    def __init__(self, num_classes: int, dim: int, *, momentum: float, device=None):
        self.momentum = momentum
        self.prototypes = torch.zeros(num_classes, dim, device=device)  # (C, D), zero = unseen
        self.seen = torch.zeros(num_classes, dtype=torch.bool, device=device)

    @torch.no_grad()
    def update(self, key: torch.Tensor, key_label: torch.Tensor, *, ignore_index: int = 255):
        """Fold in the batch's class means: key (M, D), key_label (M,). All-reduced."""
        num_classes = len(self.prototypes)
        valid = key_label != ignore_index
        key = F.normalize(key.detach().float(), dim=1)[valid]
        label = key_label[valid]
        sums = torch.zeros_like(self.prototypes).index_add_(0, label, key)
        counts = torch.bincount(label, minlength=num_classes).to(sums)
        packed = dist.all_reduce_sum(torch.cat([sums, counts[:, None]], dim=1))
        sums, counts = packed[:, :-1], packed[:, -1]
        present = counts > 0
        mean = F.normalize(sums[present], dim=1)
        old = self.prototypes[present]
        keep = self.seen[present][:, None]
        new = torch.where(keep, self.momentum * old + (1 - self.momentum) * mean, mean)
        self.prototypes[present] = F.normalize(new, dim=1)
        self.seen |= present

    def get(self) -> torch.Tensor:
        return self.prototypes

    def state_dict(self) -> dict:
        return {"prototypes": self.prototypes.cpu(), "seen": self.seen.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.prototypes.copy_(state["prototypes"])
        self.seen.copy_(state["seen"])
