"""HRDA (model.hrda): the multi-resolution wrapper's shapes, its fusion and sliding inference
against a direct computation of HRDA's formulas on a tiny model, gradients through the scale
attention, and real train_steps with HRDA on."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from t2sda import scoring
from t2sda.config import ConfigError
from t2sda.data.loaders import build_datasets
from t2sda.models import build_model
from t2sda.models.hrda import HRDA, draw_boxes, slide_boxes
from t2sda.state import build_state
from t2sda.step import train_step

C = 5


def _tiny(**options) -> HRDA:
    torch.manual_seed(0)
    return build_model("small_cnn", num_classes=C, hrda={"detail_crop": 16, **options})


def _up(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def test_shapes_and_outputs():
    model = _tiny()
    image = torch.rand(2, 3, 32, 48)
    box = torch.tensor([[0, 8], [16, 32]])
    fused, feature, detail, last = model(image, with_bottleneck=True, detail_box=box)
    assert fused.shape == (2, C, 16, 24)  # full resolution / output stride 2
    assert feature.shape == (2, 64, 8, 12)  # the context image (0.5) / 2
    assert detail.shape == (2, C, 8, 8)  # 16 px detail crop / 2
    assert last.shape == (2, 64, 2, 3)  # the context image's stride-8 stage
    model.eval()
    with torch.no_grad():
        fused, feature = model(image)
        logits, feature_c = model(image, context_only=True)
    assert fused.shape == (2, C, 16, 24) and feature.shape == (2, 64, 8, 12)
    assert logits.shape == (2, C, 8, 12) and torch.equal(feature, feature_c)
    # the scale attention is a second head of the model's kind, classwise by default
    assert model.scale_attention.classifier.out_channels == C
    assert _tiny(classwise=False).scale_attention.classifier.out_channels == 1
    backbone, head = model.param_groups()
    assert len(backbone) + len(head) == len(list(model.parameters()))
    assert {id(p) for p in model.scale_attention.parameters()} <= {id(p) for p in head}


def test_training_fusion_equals_hrda_formula():
    """fused = up(a * inside) * detail_placed + up((1 - a * inside) * context), by hand."""
    model = _tiny()
    model.eval()  # running BN statistics: each sub-forward alone gives the same numbers
    image = torch.rand(2, 3, 32, 32)
    box = torch.tensor([[4, 12], [16, 0]])  # multiples of 4 (= stride 2 / scale 0.5)
    with torch.no_grad():
        fused, _, detail = model(image, detail_box=box)
        base = model.base
        small = F.interpolate(image, size=(16, 16), mode="bilinear", align_corners=False)
        context = base(small)[0]  # (2, C, 8, 8)
        att = torch.sigmoid(model.scale_attention(*base.backbone(base.normalise(small)))[0])
        for i, (y, x) in enumerate(box.tolist()):
            crop_logits = base(image[i:i + 1, :, y:y + 16, x:x + 16])[0]
            torch.testing.assert_close(detail[i:i + 1], crop_logits)
            mask = torch.zeros(1, 1, 8, 8)
            mask[:, :, y // 4:y // 4 + 4, x // 4:x // 4 + 4] = 1  # the crop in context logits
            a = att[i:i + 1] * mask
            placed = torch.zeros(1, C, 16, 16)
            placed[:, :, y // 2:y // 2 + 8, x // 2:x // 2 + 8] = crop_logits
            expected = _up(a, (16, 16)) * placed + _up((1 - a) * context[i:i + 1], (16, 16))
            torch.testing.assert_close(fused[i:i + 1], expected)
    # far outside the crop the fused prediction is the context one alone
    torch.testing.assert_close(fused[1:, :, :4, 12:], _up(context[1:], (16, 16))[:, :, :4, 12:])


def test_inference_equals_direct_sliding_computation():
    """HRDA inference: detail windows of 16 px at stride 8 over a 32 x 48 image (3 x 5 windows),
    each run alone, averaged where they overlap, fused with the unmasked attention."""
    model = _tiny()
    model.eval()
    image = torch.rand(1, 3, 32, 48)
    assert slide_boxes(32, 48, 16, 8)[-1] == (16, 32, 32, 48)
    with torch.no_grad():
        fused, _ = model(image)
        base = model.base
        small = F.interpolate(image, size=(16, 24), mode="bilinear", align_corners=False)
        context = base(small)[0]
        att = torch.sigmoid(model.scale_attention(*base.backbone(base.normalise(small)))[0])
        total, count = torch.zeros(1, C, 16, 24), torch.zeros(1, 1, 16, 24)
        for y in range(0, 17, 8):
            for x in range(0, 33, 8):
                total[:, :, y // 2:y // 2 + 8, x // 2:x // 2 + 8] += base(image[:, :, y:y + 16, x:x + 16])[0]
                count[:, :, y // 2:y // 2 + 8, x // 2:x // 2 + 8] += 1
        expected = _up(att, (16, 24)) * total / count + _up((1 - att) * context, (16, 24))
    assert count.min() == 1 and count.max() == 4
    torch.testing.assert_close(fused, expected)
    # scoring's whole-image and sliding prediction run the same forward
    pred = scoring.predict(model, image, num_classes=C)
    assert torch.equal(pred, _up(expected, (32, 48)).argmax(1))
    slid = scoring.predict(model, image, num_classes=C, crop=32, stride=16)
    assert slid.shape == (1, 32, 48)


def test_gradients_reach_the_scale_attention_inside_the_crop_only():
    model = _tiny()
    image = torch.rand(2, 3, 32, 32)
    box = torch.tensor([[0, 0], [16, 16]])
    fused, _, detail = model(image, detail_box=box)
    fused.square().mean().backward()
    grads = [p.grad for p in model.scale_attention.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is not None for p in model.base.parameters())
    # the attention's logits get no gradient outside the detail crop (it is zeroed there)
    model.zero_grad()
    seen = {}

    def keep(module, args, out):
        out.retain_grad()
        seen["att"] = out

    model.scale_attention.classifier.register_forward_hook(keep)
    fused, _, _ = model(image, detail_box=box)
    fused.sum().backward()
    grad = seen["att"].grad  # (2, C, 8, 8) context logits; the crops are 4 x 4 there
    assert grad[0, :, :4, :4].abs().sum() > 0 and grad[0, :, 4:, :].abs().sum() == 0
    assert grad[1, :, 4:, 4:].abs().sum() > 0 and grad[1, :, :4, :].abs().sum() == 0


def test_boxes_are_aligned_and_inside():
    torch.manual_seed(0)
    boxes = draw_boxes(3, 2, height=64, width=96, crop=32, divisible=8)
    assert boxes.shape == (6, 2) and (boxes % 8 == 0).all()
    assert (boxes[:, 0] <= 32).all() and (boxes[:, 1] <= 64).all()
    assert torch.equal(boxes[0], boxes[1]) and torch.equal(boxes[2], boxes[3])  # one per part
    many = draw_boxes(400, 1, height=64, width=96, crop=32, divisible=8)
    # HRDA's draw, randint(0, (margin + 1) // divisible) * divisible: the corner flush with
    # the far edge (32 here) is never drawn
    assert set(many[:, 0].tolist()) == {0, 8, 16, 24}


def _setup(tiny_cfg, *overrides):
    cfg = tiny_cfg.with_overrides(["model.hrda=true", "model.hrda_detail_crop=16", *overrides])
    data = build_datasets(cfg.data, seed=0)
    torch.manual_seed(0)
    state = build_state(cfg, num_classes=data.num_classes, device=torch.device("cpu"))
    src, label = (torch.stack(x) for x in zip(*(data.source[i] for i in range(4)), strict=True))
    return cfg, state, src, label, torch.stack([data.target[i][0] for i in range(4)])


def test_source_loss_is_fused_plus_detail(tiny_cfg, monkeypatch):
    """loss_src = 0.9 CE(up(fused), y) + 0.1 CE(up(detail), y cropped to the detail box)."""
    cfg, state, src, label, tgt = _setup(
        tiny_cfg, "method.self_training=false", "method.pull_weight=0",
        "method.src_ce_on_translated=false")
    box = torch.tensor([[8, 16]] * 4)
    monkeypatch.setattr("t2sda.step.draw_boxes", lambda *a, **k: box)
    student = copy.deepcopy(state.student.segmentor)  # train mode: the same batch statistics
    logs = train_step(state, src, label, tgt, cfg)
    with torch.no_grad():
        fused, _, detail = student(src, detail_box=box)
    ce = F.cross_entropy(_up(fused, (32, 32)), label, ignore_index=255)
    crop_ce = F.cross_entropy(_up(detail, (16, 16)), label[:, 8:24, 16:32], ignore_index=255)
    assert logs["loss_src"] == pytest.approx((0.9 * ce + 0.1 * crop_ce).item(), rel=1e-5)


@pytest.mark.parametrize("switch", [
    [], ["method.mic_weight=1", "method.mic_block=4"], ["method.pull_key_net=student"],
    ["method.mix=none", "method.pull_feature=decoder"], ["model.hrda_attention_classwise=false"],
])
def test_train_step_with_hrda(tiny_cfg, switch):
    cfg, state, src, label, tgt = _setup(tiny_cfg, "method.self_training_start=1", *switch)
    attention = [p.detach().clone() for p in state.student.segmentor.scale_attention.parameters()]
    logs = [train_step(state, src, label, tgt, cfg) for _ in range(2)]
    assert "loss_mix" in logs[1] and "loss_pull" in logs[1]
    assert ("loss_mic" in logs[1]) == ("method.mic_weight=1" in switch)
    assert all(v == v and abs(v) < 1e6 for log in logs for v in log.values())
    after = list(state.student.segmentor.scale_attention.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(attention, after, strict=True))


def test_train_step_feature_distance_on_the_context_image(tiny_cfg, tmp_path):
    torch.manual_seed(1)
    path = tmp_path / "backbone.pth"
    torch.save(build_model("small_cnn", num_classes=11).backbone.state_dict(), path)
    cfg, state, src, label, tgt = _setup(
        tiny_cfg, f"model.pretrained={path}", "method.fd_weight=0.5", "method.fd_min_ratio=0.0",
        "method.fd_classes=0,1,2,3,4,5,6,7,8,9,10", "method.self_training_start=0")
    seen = {}
    state.imnet.register_forward_hook(lambda mod, args, out: seen.update(image=args[0], out=out))
    logs = train_step(state, src, label, tgt, cfg)
    # HRDA's feature_scale=0.5: the frozen backbone sees the context image, as the student's
    # bottleneck does (8 x 8 image, stride 8: 2 x 2 cells)
    torch.testing.assert_close(seen["image"], F.interpolate(src, size=(16, 16), mode="bilinear",
                                                            align_corners=False))
    assert seen["out"].shape[-2:] == (2, 2) and 0 < logs["loss_fd"] < 1e6


def test_hrda_keys_do_nothing_when_off(tiny_cfg):
    runs = []
    for extra in ([], ["model.hrda_detail_crop=8", "model.hrda_context_scale=0.25",
                       "model.hrda_detail_loss_weight=0.5"]):
        cfg = tiny_cfg.with_overrides(["method.self_training_start=1", *extra])
        data = build_datasets(cfg.data, seed=0)
        state = build_state(cfg, num_classes=data.num_classes, device=torch.device("cpu"))
        src, label = (torch.stack(x) for x in zip(*(data.source[i] for i in range(4)), strict=True))
        tgt = torch.stack([data.target[i][0] for i in range(4)])
        torch.manual_seed(1)
        runs.append([train_step(state, src, label, tgt, cfg) for _ in range(2)])
    assert runs[0] == runs[1]


@pytest.mark.parametrize("override, message", [
    ("model.hrda_context_scale=0.3", r"model.hrda_context_scale=0.3: must be 1/k"),
    ("model.hrda_detail_crop=64", r"model.hrda_detail_crop=64: .*fit in the training crop \(32 px\)"),
    ("model.hrda_detail_loss_weight=1", r"model.hrda_detail_loss_weight=1.0: must be in \[0, 1\)"),
])
def test_bad_hrda_values(tiny_cfg, override, message):
    with pytest.raises(ConfigError, match=message):
        tiny_cfg.with_overrides(["model.hrda=true", override])


def test_detail_crop_off_the_context_grid(tiny_cfg):
    cfg = tiny_cfg.with_overrides(["model.hrda=true", "model.hrda_detail_crop=18"])
    with pytest.raises(ConfigError, match=r"model.hrda_detail_crop=18: must be a multiple of .* 4"):
        build_state(cfg, num_classes=11, device=torch.device("cpu"))


def test_grad_checkpointing_reaches_the_base_model():
    with torch.device("meta"):
        model = build_model("deeplabv2_r101", num_classes=C, hrda={"detail_crop": 64})
    model.set_grad_checkpointing(True)
    assert model.base.grad_checkpointing


@pytest.mark.parametrize("name", ["gta2cs_hrda", "gta2cs_mic", "syn2cs_hrda", "syn2cs_mic"])
def test_presets_are_the_published_recipes(name):
    from t2sda.presets import get_preset

    cfg = get_preset(name)
    d, mo, me = cfg.data, cfg.model, cfg.method
    assert (d.crop_size, d.batch_size, d.target_size, d.val_size) == (1024, 2, "2048x1024", "2048x1024")
    assert d.source_size == ("2560x1440" if name.startswith("gta") else "2560x1520")
    assert (d.rcs_temperature, d.rcs_min_pixels, d.rcs_min_crop_ratio) == (0.01, 3000, 2.0)
    assert (d.eval_crop, d.eval_stride) == (1024, 512)
    assert (mo.name, mo.pretrained, mo.hrda, mo.hrda_context_scale, mo.hrda_detail_crop) == \
        ("daformer_mitb5", "timm", True, 0.5, 512)
    assert (mo.hrda_detail_stride, mo.hrda_detail_loss_weight, mo.hrda_attention_classwise) == \
        (256, 0.1, True)
    assert (me.pseudo_threshold, me.pseudo_weight, me.ema_momentum, me.fd_weight) == \
        (0.968, "batch_fraction", 0.999, 0.005)
    assert (me.pseudo_ignore_top, me.pseudo_ignore_bottom) == (30, 240)
    mic = (me.mic_weight, me.mic_mask_ratio, me.mic_block, me.mic_augment)
    assert mic == ((1.0, 0.7, 64, True) if name.endswith("mic") else (0.0, 0.7, 64, True))
    assert (cfg.optim.lr, cfg.optim.head_lr_mult, cfg.optim.warmup_iters) == (6e-5, 10.0, 1500)
    assert (cfg.train.iters, cfg.train.eval_every) == (40000, 4000)
    # T2S-DA's own parts keep their defaults on top of the base recipe
    assert me.pull_weight == 0.1 and me.weight_mode == "iou"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["daformer_mitb5", "deeplabv2_r101"])
def test_grad_checkpointing_with_hrda_same_gradients_less_memory(name):
    """train.grad_checkpoint under model.hrda: the base model's checkpointing covers the
    context, detail and attention passes' backbone alike; gradients unchanged."""
    from t2sda.perf import cpu_peak_bytes

    torch.manual_seed(0)
    eager = build_model(name, num_classes=C, hrda={"detail_crop": 64}).train()
    ckpt = copy.deepcopy(eager)
    ckpt.set_grad_checkpointing(True)
    image, box = torch.rand(2, 3, 128, 128), torch.tensor([[32, 0], [64, 64]])

    def run(model):
        torch.manual_seed(1)  # same dropout masks in the heads
        fused, feature, detail = model(image, detail_box=box)
        (fused.square().mean() + detail.square().mean() + feature.mean()).backward()

    peaks = {}
    for key, model in (("eager", eager), ("ckpt", ckpt)):
        run(model)
        model.zero_grad(set_to_none=False)
        peaks[key] = cpu_peak_bytes(lambda model=model: run(model))
    for (n, p), q in zip(eager.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=n)
    # at 128 px the heads' stride-4 maps (two DAFormer heads on the context, one on the
    # detail crop) weigh more than the encoder's; DAFormer: 0.89 of eager here
    print(f"{name} + HRDA: checkpointed peak / eager {peaks['ckpt'] / peaks['eager']:.2f}")
    assert peaks["ckpt"] < 0.95 * peaks["eager"], peaks


def test_export_at_a_fixed_size_matches_eager(tmp_path):
    """``export`` of an HRDA model: TorchScript at the export size equals eager; --dynamic is
    refused in one line (the number of detail windows depends on the size)."""
    from t2sda import model_export

    module = model_export.Deployable(_tiny().eval())
    path = tmp_path / "hrda.pt"
    model_export.export(module, path, fmt="torchscript", size=(32, 48), dynamic=False)
    (check,) = model_export.verify(module, path, fmt="torchscript", size=(32, 48), dynamic=False)
    assert check["max_abs_diff"] < 1e-4 and check["agreement"] == 1.0
    with pytest.raises(model_export.ExportError, match="--dynamic: an HRDA model"):
        model_export.export(module, path, fmt="torchscript", size=(32, 48), dynamic=True)


def test_training_with_hrda_resumes_and_evaluates_with_hrda_inference(tiny_cfg, tmp_path):
    """train() with model.hrda: the detail boxes come from the step's seeded generator, so a
    resumed run ends where an uninterrupted one does; the run dir loads back as HRDA."""
    from t2sda import checkpoint
    from t2sda.inference import load_trained
    from t2sda.train import train

    cfg = tiny_cfg.with_overrides(["model.hrda=true", "model.hrda_detail_crop=16"])
    full = train(cfg, device="cpu", run_dir=tmp_path / "full")
    interrupted = cfg.with_overrides(["train.fail_at_step=4"])
    with pytest.raises(RuntimeError, match="injected failure at step 4"):
        train(interrupted, device="cpu", run_dir=tmp_path / "resumed")
    last = checkpoint.latest(tmp_path / "resumed" / "checkpoints")
    resumed = train(interrupted, device="cpu", run_dir=tmp_path / "resumed", resume=last)
    assert resumed["val/mIoU"] == pytest.approx(full["val/mIoU"], abs=1e-6)
    a = checkpoint.load(tmp_path / "full" / "checkpoints" / "step_0000006")["state"]["student"]
    b = checkpoint.load(tmp_path / "resumed" / "checkpoints" / "step_0000006")["state"]["student"]
    assert any(k.startswith("segmentor.scale_attention.") for k in a)
    for name, tensor in a.items():
        assert torch.allclose(tensor.float(), b[name].float(), atol=1e-6), name
    trained = load_trained(run_dir=tmp_path / "full", which="latest")
    assert isinstance(trained.models["student"], HRDA)
