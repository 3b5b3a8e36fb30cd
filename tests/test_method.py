import math

import numpy as np
import pytest
import torch
from torch import nn

from t2sda import schedules
from t2sda.method.class_weights import ClassWeighter
from t2sda.method.mixing import class_mix_mask, mix, strong_augment
from t2sda.method.pseudo_label import pseudo_label
from t2sda.method.teacher import EMATeacher
from t2sda.method.translate import color_transfer, fda, lab_to_rgb, rgb_to_lab, translate


def _images(b=4, h=32, w=32, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_teacher_update_arithmetic():
    student = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    teacher = EMATeacher(student)
    before = [p.clone() for p in teacher.model.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    student.train()
    student(torch.randn(8, 3))  # moves BN running stats and the batch counter
    teacher.update(student, momentum=0.9)
    for t, b0, s in zip(teacher.model.parameters(), before, student.parameters(), strict=True):
        assert torch.allclose(t, 0.9 * b0 + 0.1 * s)
    bn_t, bn_s = teacher.model[1], student[1]
    assert torch.allclose(bn_t.running_mean, 0.1 * bn_s.running_mean)
    assert bn_t.num_batches_tracked == bn_s.num_batches_tracked
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.model.training


def test_ema_schedule():
    assert schedules.ema_momentum(0, momentum=0.999) == 0.0
    assert schedules.ema_momentum(9, momentum=0.999) == pytest.approx(0.9)
    assert schedules.ema_momentum(100_000, momentum=0.999) == 0.999


def test_lr_and_ramps():
    assert schedules.lr_factor(0, total=100, warmup=10, power=1.0) == pytest.approx(0.1)
    assert schedules.lr_factor(10, total=100, warmup=10, power=1.0) == pytest.approx(1.0)
    assert schedules.lr_factor(55, total=100, warmup=10, power=1.0) == pytest.approx(0.5)
    assert schedules.lr_factor(100, total=100, warmup=10, power=1.0) == 0.0
    assert schedules.ramp(4, start=5, length=10) == 0.0
    assert schedules.ramp(9, start=5, length=10) == pytest.approx(0.5)
    assert schedules.ramp(5, start=5, length=0) == 1.0
    kw = {"start": 0, "length": 100}
    assert schedules.weight_blend(0, schedule="constant", **kw) == 1.0
    assert schedules.weight_blend(49, schedule="linear", **kw) == pytest.approx(0.5)
    assert schedules.weight_blend(49, schedule="cosine", **kw) == pytest.approx(0.5)
    assert schedules.weight_blend(24, schedule="cosine", **kw) < 0.25
    assert schedules.weight_blend(99, schedule="step", **kw) == 0.0
    assert schedules.weight_blend(100, schedule="step", **kw) == 1.0


def _fda_numpy(src, ref, beta):
    """FDA as Yang & Soatto (2020) describe it, in float64 numpy: amplitudes of the centred
    spectrum swapped in the square of half-side floor(beta * min(H, W)), source phase kept."""
    src, ref = src.double().numpy(), ref.double().numpy()
    h, w = src.shape[-2:]
    b = int(np.floor(min(h, w) * beta))
    f_src = np.fft.fftshift(np.fft.fft2(src, axes=(-2, -1)), axes=(-2, -1))
    f_ref = np.fft.fftshift(np.fft.fft2(ref, axes=(-2, -1)), axes=(-2, -1))
    amp, pha = np.abs(f_src), np.angle(f_src)
    cy, cx = h // 2, w // 2
    amp[..., cy - b:cy + b + 1, cx - b:cx + b + 1] = np.abs(f_ref)[..., cy - b:cy + b + 1,
                                                                   cx - b:cx + b + 1]
    out = np.fft.ifft2(np.fft.ifftshift(amp * np.exp(1j * pha), axes=(-2, -1)), axes=(-2, -1))
    return torch.from_numpy(np.clip(out.real, 0, 1))


@pytest.mark.parametrize("h, w, beta", [(32, 32, 0.1), (33, 40, 0.05), (32, 48, 0.2)])
def test_fda_matches_the_reference_and_swaps_only_the_low_square(h, w, beta):
    gen = torch.Generator().manual_seed(1)
    src = torch.rand(2, 3, h, w, generator=gen) * 0.2 + 0.4
    ref = torch.rand(2, 3, h, w, generator=gen) * 0.2 + 0.2
    out = fda(src, ref, beta=beta)
    torch.testing.assert_close(out.double(), _fda_numpy(src, ref, beta), atol=1e-5, rtol=0)
    assert 0 < out.min() and out.max() < 1  # nothing clipped: the spectrum is FDA's own
    spec = {k: torch.fft.fftshift(torch.fft.fft2(x.double()), dim=(-2, -1))
            for k, x in (("out", out), ("src", src), ("ref", ref))}
    b, cy, cx = int(beta * min(h, w)), h // 2, w // 2
    inside = torch.zeros(h, w, dtype=torch.bool)
    inside[cy - b:cy + b + 1, cx - b:cx + b + 1] = True
    amp = {k: v.abs() for k, v in spec.items()}
    # Inside the square the reference's amplitude, outside the source's: a whole-spectrum swap
    # (or none) fails one of the two, since src and ref amplitudes differ there by far more.
    torch.testing.assert_close(amp["out"][..., inside], amp["ref"][..., inside], atol=2e-3, rtol=0)
    torch.testing.assert_close(amp["out"][..., ~inside], amp["src"][..., ~inside], atol=2e-3, rtol=0)
    assert (amp["src"][..., ~inside] - amp["ref"][..., ~inside]).abs().max() > 0.5
    assert (amp["src"][..., inside] - amp["ref"][..., inside]).abs().max() > 0.5
    # The phase is the source's wherever it is defined (amplitude not ~0).
    defined = amp["src"] > 1e-3
    diff = (spec["out"].angle() - spec["src"].angle()).abs()[defined]
    assert (torch.minimum(diff, 2 * math.pi - diff) < 1e-3).all()
    assert torch.equal(translate(src, ref, mode="none", fda_beta=beta, color_space="lab"), src)


def test_fda_beta_zero_square_is_mean_colour_swap():
    src, ref = _images(seed=3) * 0.5 + 0.25, _images(seed=4) * 0.5 + 0.25
    out = fda(src, ref, beta=0.01)  # b = 0 on 32 px: only the zero frequency moves
    assert torch.allclose(out.mean(dim=(2, 3)), ref.mean(dim=(2, 3)), atol=1e-4)
    assert torch.allclose(out - out.mean(dim=(2, 3), keepdim=True),
                          src - src.mean(dim=(2, 3), keepdim=True), atol=1e-4)


def test_color_transfer_matches_statistics():
    src, ref = _images(seed=5), _images(seed=6) * 0.3 + 0.6
    out = color_transfer(src, ref, space="rgb")
    assert torch.allclose(out.mean(dim=(2, 3)), ref.mean(dim=(2, 3)), atol=0.02)
    lab = color_transfer(src, ref, space="lab")
    assert torch.allclose(rgb_to_lab(lab).mean(dim=(2, 3)), rgb_to_lab(ref).mean(dim=(2, 3)),
                          atol=1.5)
    assert torch.allclose(lab_to_rgb(rgb_to_lab(src)), src, atol=1e-3)


def test_classmix_labels_follow_pixels():
    torch.manual_seed(0)
    label = torch.zeros(3, 16, 16, dtype=torch.long)
    label[:, 4:8, 4:8] = 3
    label[:, 10:14, 2:6] = 5
    label[:, 0] = 255
    mask = class_mix_mask(label)
    assert mask.shape == (3, 1, 16, 16)
    for image_mask, image_label in zip(mask[:, 0], label, strict=True):
        chosen = image_label[image_mask.bool()].unique().tolist()
        assert len(chosen) == 2  # half of {0, 3, 5}, rounded up
        assert 255 not in chosen
        # A class is either fully pasted or not at all.
        for c in (0, 3, 5):
            inside = image_mask[image_label == c]
            assert inside.all() or not inside.any()
    src, tgt = torch.ones(3, 3, 16, 16), torch.zeros(3, 3, 16, 16)
    mixed = mix(mask, src, tgt)
    tgt_label = torch.full_like(label, 7)
    mixed_label = mix(mask, label, tgt_label)
    assert torch.equal(mixed[:, 0] == 1, mixed_label != 7)


def test_strong_augment_keeps_shape_and_range():
    torch.manual_seed(0)
    images = _images(b=8)
    out = strong_augment(images, p_jitter=1.0, p_blur=1.0)
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    assert not torch.allclose(out, images)
    assert torch.allclose(strong_augment(images, p_jitter=0.0, p_blur=0.0), images, atol=1e-6)


def test_pseudo_label_weights():
    logits = torch.zeros(2, 3, 4, 4)
    logits[0, 1] = 10.0  # image 0: confident class 1 everywhere
    logits[1, 2, :2] = 10.0  # image 1: confident on the top half only
    label, weight, conf = pseudo_label(logits, threshold=0.9)
    assert (label[0] == 1).all() and (label[1, :2] == 2).all()
    assert torch.allclose(weight[0], torch.ones(4, 4)) and torch.allclose(weight[1], torch.full((4, 4), 0.5))
    _, pixel, _ = pseudo_label(logits, threshold=0.9, weight_mode="pixel")
    assert pixel[1, :2].eq(1).all() and pixel[1, 2:].eq(0).all()
    _, margin, _ = pseudo_label(logits, threshold=0.9, ignore_top=1, ignore_bottom=1)
    assert margin[:, 0].eq(0).all() and margin[:, -1].eq(0).all() and margin[0, 1].eq(1).all()
    assert conf.max() <= 1


def test_class_weights_favour_low_iou_and_average_one():
    weighter = ClassWeighter(3, mode="iou", momentum=0.0, gamma=1.0)
    label = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]])
    pred = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 0, 2, 0, 0, 0]])
    logits = torch.nn.functional.one_hot(pred, 3).permute(0, 2, 1)[..., None].float()
    weighter.update(logits, label[..., None])
    w = weighter.weights()
    assert w.mean().item() == pytest.approx(1.0)
    # IoUs: class 0 = 4/8, class 1 = 3/4, class 2 = 1/4
    assert w[2] > w[0] > w[1]
    assert torch.allclose(w, torch.tensor([0.5, 0.25, 0.75]) / 0.5)
    assert torch.allclose(weighter.weights(blend=0.0), torch.ones(3))
    half = weighter.weights(blend=0.5)
    assert torch.allclose(half, 0.5 + 0.5 * w)
    uniform = ClassWeighter(3, mode="uniform", momentum=0.0, gamma=1.0)
    uniform.update(logits, label[..., None])
    assert torch.equal(uniform.weights(), torch.ones(3))


def test_class_weights_confidence_mode_and_unseen_classes():
    weighter = ClassWeighter(4, mode="confidence", momentum=0.5, gamma=2.0)
    logits = torch.zeros(1, 4, 1, 4)
    logits[0, 0, 0, :2] = 5.0  # confident and right on class 0
    label = torch.tensor([[[0, 0, 1, 1]]])
    weighter.update(logits, label)
    w = weighter.weights()
    assert w[1] > w[0] and w[2] == 1.0 and w[3] == 1.0
    assert w[:2].mean().item() == pytest.approx(1.0)


def test_pseudo_weight_batch_fraction_is_one_q_over_the_batch():
    """DAFormer's dacs.py: q = confident pixels / all pixels of the batch (issue 11 §4)."""
    logits = torch.zeros(2, 2, 2, 2)
    logits[0, 0] = 10.0  # image 0: all 4 pixels confident
    logits[1, 0, 0, 0] = 10.0  # image 1: 1 of 4 confident
    _, w, _ = pseudo_label(logits, threshold=0.9, weight_mode="batch_fraction")
    assert torch.allclose(w, torch.full_like(w, 5 / 8))
    _, w, _ = pseudo_label(logits, threshold=0.9, weight_mode="fraction")
    assert torch.allclose(w[0], torch.ones(2, 2)) and torch.allclose(w[1], torch.full((2, 2), 0.25))
    _, w, _ = pseudo_label(logits, threshold=0.9, weight_mode="batch_fraction", ignore_top=1)
    assert (w[:, 0] == 0).all() and torch.allclose(w[:, 1], torch.full((2, 2), 5 / 8))
