"""Target-like source images x~_s = T(x_s, x_ref), runs on any device.

All images are (B, 3, H, W) floats in [0, 1]; the output keeps the source's content (and so
its label map). fda and color take the reference's low-level appearance (no learned
parameters); style ignores the reference and randomises the style with the frozen network of
t2sda/method/style.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def fda(src: torch.Tensor, ref: torch.Tensor, *, beta: float) -> torch.Tensor:
    """Fourier domain adaptation: swap the low-frequency amplitude of ``src`` for ``ref``'s.

    The swapped region is a square of half-side ``b = floor(beta * min(H, W))`` centred on the
    zero frequency: frequencies -b..b on each axis. That set is closed under negation, so the
    spectrum stays Hermitian and the inverse is real up to rounding (even sizes included).
    The phase of ``src`` (where its edges are) is kept.

    Computed on the half spectrum of real input (``rfft2``), and only the square's
    coefficients are touched: the same result as swapping amplitudes over the full centred
    spectrum, at a fraction of the cost (a third of a ``digits`` step's translation time).
    """
    h, w = src.shape[-2:]
    b = int(beta * min(h, w))
    rows = torch.tensor(sorted({k % h for k in range(-b, b + 1)}), device=src.device)
    cols = torch.arange(min(b, w // 2) + 1, device=src.device)  # non-negative frequencies only
    at = (..., rows[:, None], cols[None, :])
    spec = torch.fft.rfft2(src.float())
    own = spec[at]
    amp = own.abs()
    # The source's phase as a unit complex number; angle(0) is 0, as torch.polar would take it.
    phase = torch.where(amp > 0, own / amp.clamp_min(torch.finfo(amp.dtype).tiny), torch.ones_like(own))
    spec[at] = torch.fft.rfft2(ref.float())[at].abs() * phase
    out = torch.fft.irfft2(spec, s=(h, w))
    return out.clamp_(0.0, 1.0).to(src.dtype)


# sRGB (D65) <-> CIE Lab, enough to match colour statistics; constants from the standards.
_RGB_TO_XYZ = torch.tensor(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
)
_WHITE = torch.tensor([0.950456, 1.0, 1.088754])


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) sRGB in [0, 1] -> Lab (L in [0, 100])."""
    lin = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = torch.einsum("ij,bjhw->bihw", _RGB_TO_XYZ.to(rgb), lin) / _WHITE.to(rgb)[:, None, None]
    f = torch.where(xyz > 0.008856, xyz.clamp_min(1e-12) ** (1 / 3), 7.787 * xyz + 16 / 116)
    return torch.stack(
        [116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], dim=1
    )


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    fy = (lab[:, 0] + 16) / 116
    f = torch.stack([fy + lab[:, 1] / 500, fy, fy - lab[:, 2] / 200], dim=1)
    xyz = torch.where(f > 0.206893, f**3, (f - 16 / 116) / 7.787) * _WHITE.to(lab)[:, None, None]
    lin = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(_RGB_TO_XYZ).to(lab), xyz).clamp(0, 1)
    return torch.where(lin > 0.0031308, 1.055 * lin.clamp_min(1e-12) ** (1 / 2.4) - 0.055, 12.92 * lin)


def color_transfer(src: torch.Tensor, ref: torch.Tensor, *, space: str = "lab") -> torch.Tensor:
    """Match each channel's mean and std of ``src`` to ``ref`` (Reinhard et al.)."""
    to, back = (rgb_to_lab, lab_to_rgb) if space == "lab" else (lambda x: x, lambda x: x)
    a, r = to(src.float()), to(ref.float())
    a_mean, a_std = a.mean(dim=(2, 3), keepdim=True), a.std(dim=(2, 3), keepdim=True)
    r_mean, r_std = r.mean(dim=(2, 3), keepdim=True), r.std(dim=(2, 3), keepdim=True)
    out = (a - a_mean) / (a_std + 1e-5) * r_std + r_mean
    return back(out).clamp_(0.0, 1.0).to(src.dtype)


def translate(src: torch.Tensor, ref: torch.Tensor, *, mode: str, fda_beta: float,
              color_space: str, style: Callable[[torch.Tensor], torch.Tensor] | None = None
              ) -> torch.Tensor:
    """The ``method.translate`` option. ``none`` returns ``src`` (strong augmentation, applied
    by the caller, then provides the appearance change). ``style`` calls ``style(src)`` (a
    StyleRandomizer; its random styles come from torch's global generator)."""
    if mode == "fda":
        return fda(src, ref, beta=fda_beta)
    if mode == "color":
        return color_transfer(src, ref, space=color_space)
    if mode == "style":
        if style is None:
            raise ValueError("translate=style needs the style network (TrainState.style)")
        return style(src)
    if mode == "none":
        return src
    raise ValueError(f"unknown translation mode {mode!r}")
