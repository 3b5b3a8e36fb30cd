"""HRDA / MIC releases (``model.*`` / ``ema_model.*`` with HRDA's ``decode_head.head.*`` and
``decode_head.scale_attention.*``) map onto daformer_mitb5 with model.hrda, tested on
generated state dicts with the release's key layout."""

import pytest
import torch
import torch.nn.functional as F

from t2sda.models import convert
from t2sda.models.daformer import DAFormerHead
from tests import mit_reference as ref

pytest.importorskip("transformers")

LEVELS = (32, 64, 160, 256)  # MiT-B0's channels: the generated files' encoder


def _attention_state(num_classes: int, embed: int = 256) -> dict:
    """HRDA's scale attention under its mmseg names: DAFormerHead with a 1x1 ConvModule fusion."""
    state = {}
    for i, c in enumerate(LEVELS):
        state[f"embed_layers.{i}.proj.weight"] = torch.randn(embed, c) / c ** 0.5
        state[f"embed_layers.{i}.proj.bias"] = 0.1 * torch.randn(embed)
    state.update(ref._conv_module("fuse_layer", embed * len(LEVELS), embed, 1))
    state["conv_seg.weight"] = torch.randn(num_classes, embed, 1, 1) / embed ** 0.5
    state["conv_seg.bias"] = 0.1 * torch.randn(num_classes)
    return state


def _hrda_segmentor(tmp_path, seed: int, num_classes: int = 19) -> dict:
    torch.manual_seed(seed)
    hub = ref.hub_state(ref.segformer("mit_b0", seed=seed), tmp_path / f"hub{seed}")
    state = {f"backbone.{k}": v for k, v in ref.mmseg_from_hub(hub).items() if k[:5] != "head."}
    head = ref.daformer_head_state(LEVELS, num_classes)  # "decode_head.<name>"
    state.update({k.replace("decode_head.", "decode_head.head.", 1): v for k, v in head.items()})
    state.update({f"decode_head.scale_attention.{k}": v for k, v in _attention_state(num_classes).items()})
    return state


def _own_hrda_state(num_classes: int) -> dict:
    """daformer_mitb5 + model.hrda's state dict names, with a MiT-B0-sized encoder."""
    own = {f"base.backbone.{k}": v for k, v in ref.timm_backbone("mit_b0").state_dict().items()}
    for prefix, head in (("base.head.", DAFormerHead(LEVELS, num_classes)),
                         ("scale_attention.", DAFormerHead(LEVELS, num_classes, fusion="conv"))):
        own.update({prefix + k: v for k, v in head.state_dict().items()})
    return own


def test_hrda_release_maps_every_tensor_for_both_roles(tmp_path):
    student, teacher = _hrda_segmentor(tmp_path, 0), _hrda_segmentor(tmp_path, 1)
    release = {**{f"model.{k}": v for k, v in student.items()},
               **{f"ema_model.{k}": v for k, v in teacher.items()},
               **{f"imnet_model.{k}": v for k, v in student.items() if k.startswith("backbone.")}}
    assert convert.is_mmseg_segmentor(release) and convert.is_hrda(release)
    own = _own_hrda_state(19)
    for role, expected in (("student", student), ("teacher", teacher)):
        converted, source = convert.convert_segmentor(release, role)
        convert.check_state(own, converted, source)  # every key, every shape
        assert set(converted) == set(own)
        prefix = "model." if role == "student" else "ema_model."
        assert source["scale_attention.aspp.0.1.running_var"] == \
            f"{prefix}decode_head.scale_attention.fuse_layer.bn.running_var"
        assert torch.equal(converted["scale_attention.aspp.0.0.weight"],
                           expected["decode_head.scale_attention.fuse_layer.conv.weight"])
        assert torch.equal(converted["base.head.classifier.weight"],
                           expected["decode_head.head.conv_seg.weight"])
        assert torch.equal(converted["base.backbone.stages_1.norm.weight"], expected["backbone.norm2.weight"])


def test_scale_attention_computes_what_hrdas_does(tmp_path):
    """The converted scale attention (eval mode) equals HRDA's attention head computed straight
    from its mmseg-named tensors: Linear per pixel per level, bilinear to stride 4, concat,
    1x1 conv + BN + ReLU, conv_seg."""
    state = _attention_state(19)
    head = DAFormerHead(LEVELS, 19, fusion="conv").eval()
    converted, _ = convert.convert_daformer_head(state, prefix="decode_head.scale_attention.")
    head.load_state_dict(converted)
    features = [torch.randn(1, c, 16 // 2 ** i, 16 // 2 ** i) for i, c in enumerate(LEVELS)]
    embedded = []
    for i, x in enumerate(features):
        b, _, h, w = x.shape
        x = F.linear(x.flatten(2).transpose(1, 2), state[f"embed_layers.{i}.proj.weight"],
                     state[f"embed_layers.{i}.proj.bias"]).transpose(1, 2).reshape(b, -1, h, w)
        embedded.append(F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False))
    fused = ref._cbr(torch.cat(embedded, dim=1), state, "fuse_layer")
    expected = F.conv2d(fused, state["conv_seg.weight"], state["conv_seg.bias"])
    with torch.no_grad():
        torch.testing.assert_close(head(features)[0], expected, rtol=1e-4, atol=1e-4)


def test_hrda_release_errors_name_the_key(tmp_path):
    state = {f"model.{k}": v for k, v in _hrda_segmentor(tmp_path, 0).items()}
    state["model.decode_head.lr_head.conv_seg.weight"] = torch.zeros(19, 256, 1, 1)
    with pytest.raises(convert.ConversionError, match="'model.decode_head.lr_head.conv_seg.weight' "
                       "is not part of HRDA's head"):
        convert.convert_segmentor(state)
    state.pop("model.decode_head.lr_head.conv_seg.weight")
    state.pop("model.decode_head.scale_attention.fuse_layer.bn.running_mean")
    converted, source = convert.convert_segmentor(state)
    with pytest.raises(convert.ConversionError, match="missing key 'scale_attention.aspp.0.1.running_mean'"):
        convert.check_state(_own_hrda_state(19), converted, source)
    converted["scale_attention.classifier.weight"] = torch.zeros(1, 256, 1, 1)  # not class-wise
    own = _own_hrda_state(19)
    own.pop("scale_attention.aspp.0.1.running_mean")
    with pytest.raises(convert.ConversionError, match=r"the model's 'scale_attention.classifier.weight' "
                       r"has \(19, 256, 1, 1\)"):
        convert.check_state(own, converted, source)


def test_load_trained_refuses_a_daformer_release_for_an_hrda_config(tmp_path):
    from t2sda.checkpoint import CheckpointError
    from t2sda.inference import load_trained
    from t2sda.presets import get_preset

    hub = ref.hub_state(ref.segformer("mit_b0"), tmp_path / "hub")
    state = {f"model.backbone.{k}": v for k, v in ref.mmseg_from_hub(hub).items() if k[:5] != "head."}
    state.update({f"model.{k}": v for k, v in ref.daformer_head_state(LEVELS, 19).items()})
    torch.save({"meta": {"iter": 10}, "state_dict": state}, tmp_path / "daformer.pth")
    with pytest.raises(CheckpointError, match="single-scale DAFormer release, but the config has "
                       "model.hrda=true"):
        load_trained(checkpoint_path=tmp_path / "daformer.pth", config=get_preset("gta2cs_hrda"))


@pytest.mark.slow
def test_released_mic_checkpoint_evaluates_with_hrda_inference(tmp_path):
    """A MIC (HRDA) release at full size loads through ``load_trained`` with gta2cs_mic, both
    roles, every tensor set; the student runs HRDA inference on an image."""
    from t2sda.inference import load_trained
    from t2sda.models.hrda import HRDA
    from t2sda.presets import get_preset

    hub = ref.hub_state(ref.segformer("mit_b5"), tmp_path / "hub")
    backbone = {f"backbone.{k}": v for k, v in ref.mmseg_from_hub(hub).items() if k[:5] != "head."}
    levels = (64, 128, 320, 512)
    roles = {}
    for role in ("model", "ema_model"):
        head = ref.daformer_head_state(levels, 19)
        attention = {k.replace("decode_head.", "decode_head.scale_attention.", 1): v for k, v in
                     ref.daformer_head_state(levels, 19).items()
                     if "aspp_modules" not in k and "bottleneck" not in k}
        attention.update({f"decode_head.scale_attention.{k}": v for k, v in
                          ref._conv_module("fuse_layer", 4 * 256, 256, 1).items()})
        roles[role] = {**backbone, **{k.replace("decode_head.", "decode_head.head.", 1): v
                                      for k, v in head.items()}, **attention}
    state = {f"{role}.{k}": v for role, part in roles.items() for k, v in part.items()}
    torch.save({"meta": {"iter": 40000}, "state_dict": state}, tmp_path / "mic.pth")
    trained = load_trained(checkpoint_path=tmp_path / "mic.pth", config=get_preset("gta2cs_mic"),
                           model="both")
    for role, name in (("student", "model"), ("teacher", "ema_model")):
        model = trained.models[role]
        assert isinstance(model, HRDA)
        assert torch.equal(model.scale_attention.classifier.bias,
                           roles[name]["decode_head.scale_attention.conv_seg.bias"])
    with torch.no_grad():
        fused, _ = trained.models["student"](torch.rand(1, 3, 64, 128))
    assert fused.shape == (1, 19, 16, 32) and torch.isfinite(fused).all()
