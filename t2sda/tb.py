"""TensorBoard logging (rank 0 only) and a null logger, so the loop has no ``if logging``."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

IGNORE = 255
log = logging.getLogger("t2sda")


def palette(num_classes: int) -> torch.Tensor:
    """(C + 1, 3) uint8 colours; the last row (black) is for ignore pixels.

    Cityscapes' own colours for 19 classes, a fixed spread of hues otherwise.
    """
    if num_classes == 19:
        colours = [(128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
                   (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
                   (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70),
                   (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32)]
    else:
        import colorsys

        colours = [(40, 40, 40)] + [
            tuple(int(255 * v) for v in colorsys.hsv_to_rgb(i / max(num_classes - 1, 1), 0.8, 0.95))
            for i in range(num_classes - 1)
        ]
    return torch.tensor(colours + [(0, 0, 0)], dtype=torch.uint8)


def colorize(label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, H, W) class ids (255 = ignore) -> (B, 3, H, W) float in [0, 1]."""
    label = label.long().cpu()
    index = torch.where(label == IGNORE, num_classes, label.clamp(0, num_classes))
    return palette(num_classes)[index].permute(0, 3, 1, 2).float() / 255


class NullLogger:
    def scalar(self, tag: str, value: float, step: int) -> None:
        pass

    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        pass

    def images(self, tag: str, images: torch.Tensor, step: int) -> None:
        pass

    def embedding(self, tag: str, features: torch.Tensor, metadata: list, header: list,
                  step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class TBLogger(NullLogger):
    """SummaryWriter over ``log_dir``. ``purge_step`` drops events past a resumed step."""

    def __init__(self, log_dir: str | Path, *, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)
        self._warned: set[str] = set()  # tags already reported as non-finite

    def scalar(self, tag: str, value: float, step: int) -> None:
        if value is not None and np.isfinite(value):
            self.writer.add_scalar(tag, value, step)
        elif tag not in self._warned:  # once per tag: a class absent all run would flood the log
            self._warned.add(tag)
            log.warning("tensorboard: %s is %s at step %d; non-finite values of this tag are "
                        "not plotted (warned once)", tag, value, step)

    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        for tag, value in values.items():
            self.scalar(prefix + tag, value, step)

    def images(self, tag: str, images: torch.Tensor, step: int) -> None:
        """(B, 3, H, W) in [0, 1], shown side by side as one image."""
        grid = torch.cat(list(images.float().clamp(0, 1).cpu()), dim=2)
        self.writer.add_image(tag, grid, step)

    def embedding(self, tag: str, features: torch.Tensor, metadata: list, header: list,
                  step: int) -> None:
        """Points (n, D) for the projector, one metadata row per point (columns ``header``)."""
        self.writer.add_embedding(features.float().cpu(), metadata=metadata, metadata_header=header,
                                  global_step=step, tag=tag)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
