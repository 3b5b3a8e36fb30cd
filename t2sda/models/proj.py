"""The projection head of the contrastive "pull" loss."""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn


class ProjectionHead(nn.Module):
    """Per-pixel MLP (linear -> ReLU -> linear) from decoder features to the loss's space.

    Training-only and kept outside the Segmentor: as in SimCLR-style contrastive learning the
    loss acts on a projection, so the decoder feature is shaped without being forced onto the
    unit sphere, and inference needs the segmenter alone. It runs on the *sampled* pixels
    only, (n, in_dim) -> (n, out_dim), never on whole feature maps: projecting every pixel
    would cost more than the rest of the step on small models. The output is not normalised;
    the loss normalises it.
    """

    def __init__(self, in_dim: int, out_dim: int = 128):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, in_dim),
            nn.ReLU(inplace=True),
            nn.Linear(in_dim, out_dim),
        )

    def forward(self, pixels: Tensor) -> Tensor:
        return self.net(pixels)  # (n, in_dim) -> (n, out_dim)


def gather_pixels(feature: Tensor, index: Tensor, *, consumer: Tensor | None = None) -> Tensor:
    """Rows of a feature map: feature (B, D, h, w), index (n,) into the flattened B*h*w pixels
    -> (n, D), for any memory layout.

    ``consumer``: a tensor computed from ``feature`` by eager autograd ops (the logits) that
    every backward through the rows also goes through (the loss always has a CE term). The
    rows' gradient is then added in place into the gradient the feature gets from it, instead
    of being scattered into a zero-filled feature-sized tensor that autograd then adds to the
    other: on the CPU presets that dense scatter-and-add was about 20 ms of a 220 ms step, more
    than all the pull's own work. When the consumer does not reach the feature through eager
    nodes (a compiled segmentor computes both in one graph node) or none is given, the rows'
    gradient is the plain dense one.
    """
    if not (torch.is_grad_enabled() and feature.requires_grad):
        return _rows(feature, index)
    if consumer is None or not _reaches(consumer, feature):
        # index_select's backward is an index_add (indexing's would sort the positions).
        return feature.permute(0, 2, 3, 1).reshape(-1, feature.shape[1]).index_select(0, index)
    slot: dict[str, Tensor] = {}
    pixels = _GatherRows.apply(feature, index, slot)
    feature.register_hook(functools.partial(_add_rows, index=index, slot=slot))
    return pixels


# Backward nodes whose gradient for their input is a new tensor, never one that another
# gradient shares (an add's backward hands the same tensor to both of its inputs).
_FRESH = ("ConvolutionBackward", "NativeDropoutBackward", "MulBackward", "ToCopyBackward",
          "AddmmBackward", "MmBackward", "BmmBackward")


def _reaches(consumer: Tensor, feature: Tensor, max_nodes: int = 64) -> bool:
    """Whether ``consumer``'s autograd graph has an edge into ``feature`` (within a few nodes:
    the classifier sits right after the decoder feature), and every such edge comes from a node
    whose input gradient is a fresh tensor, so the feature's gradient can be written in place."""
    if feature.grad_fn is None:  # a leaf: nothing to hook a gradient buffer to
        return False
    target, found = (feature.grad_fn, feature.output_nr), False
    frontier, seen = [consumer.grad_fn], set()
    while frontier and len(seen) < max_nodes:
        node = frontier.pop(0)
        if node is None or node in seen:
            continue
        seen.add(node)
        for edge in node.next_functions:
            if edge[0] is target[0] and edge[1] == target[1]:
                if not type(node).__name__.rstrip("0123456789").endswith(_FRESH):
                    return False
                found = True
            else:
                frontier.append(edge[0])
    return found


def _positions(feature: Tensor, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    per_image = feature.shape[2] * feature.shape[3]
    b = index.div(per_image, rounding_mode="floor")
    rest = index - b * per_image
    y = rest.div(feature.shape[3], rounding_mode="floor")
    return b, y, rest - y * feature.shape[3]


def _rows(feature: Tensor, index: Tensor) -> Tensor:
    b, y, x = _positions(feature, index)
    return feature[b, :, y, x]  # (n, D) whatever the strides: no copy of the whole map


class _GatherRows(torch.autograd.Function):
    """Forward: the rows. Backward: no gradient for the feature here; the rows' gradient is
    left in ``slot`` for the feature's hook, which runs after every consumer of the feature
    (this one included) has delivered, so it can never be missed or come too early."""

    @staticmethod
    def forward(ctx, feature: Tensor, index: Tensor, slot: dict) -> Tensor:
        ctx.slot = slot
        return _rows(feature, index)

    @staticmethod
    def backward(ctx, grad_rows: Tensor):
        ctx.slot["grad"] = grad_rows
        return None, None, None


def _add_rows(grad: Tensor | None, *, index: Tensor, slot: dict) -> Tensor | None:
    rows = slot.pop("grad", None)
    if rows is None:  # a backward that did not go through the rows
        return grad
    if grad is None:  # autograd cannot turn a missing gradient into one: say so, never drop it
        raise RuntimeError("the projected pixels' gradient joins the feature's gradient from the "
                           "logits; a backward through the projection must include the logits")
    # The feature's gradient buffer is a fresh tensor owned by autograd (the output of the
    # classifier's backward), so it is updated in place rather than copied.
    _scatter_add(grad, index, rows)
    return grad


def _scatter_add(grad: Tensor, index: Tensor, rows: Tensor) -> None:
    """grad (B, D, h, w) += rows (n, D) at the flattened pixel positions ``index``."""
    rows = rows.to(grad.dtype)
    flat = grad.permute(0, 2, 3, 1)
    if flat.is_contiguous():  # channels_last: pixels are rows of a (B*h*w, D) view
        flat.view(-1, grad.shape[1]).index_add_(0, index, rows)
        return
    b, y, x = _positions(grad, index)
    channel = torch.arange(grad.shape[1], device=grad.device)
    grad.index_put_((b[:, None], channel[None, :], y[:, None], x[:, None]), rows, accumulate=True)
