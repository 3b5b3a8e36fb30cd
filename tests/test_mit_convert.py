"""SegFormer's MiT weights (mmseg ``mit_b*.pth`` and HuggingFace hub files) and released
DAFormer checkpoints load into t2sda's models: every tensor, and the same function as
transformers' SegformerModel / DAFormer's head."""

import pytest
import torch

from t2sda.models import convert, load_backbone
from t2sda.models.daformer import DAFormerHead
from tests import mit_reference as ref

pytest.importorskip("transformers")

TOLERANCE = 1e-3  # SegFormer on the hub uses LayerNorm eps 1e-5 where timm/mmseg use 1e-6


@pytest.mark.parametrize("fmt", ["hf", "mmseg"])
def test_mit_b0_matches_transformers(fmt, tmp_path):
    errors = ref.stage_errors("mit_b0", fmt, torch.randn(2, 3, 64, 96), tmp_path)
    print(f"mit_b0 {fmt}: max abs stage error {errors}")
    assert max(errors) <= TOLERANCE


def test_mit_b0_bit_identical_with_mmseg_layernorm_eps(tmp_path):
    """The whole difference is LayerNorm eps: the hub's SegFormer uses 1e-5 in the blocks and
    after each stage, SegFormer's own MiT (and timm) 1e-6. With 1e-6 the outputs are equal."""
    hf = ref.segformer("mit_b0")
    path = tmp_path / "hub"
    ref.hub_state(hf, path)
    backbone = ref.timm_backbone("mit_b0")
    load_backbone(backbone, path)
    changed = 0
    for name, module in hf.named_modules():
        # (transformers 4 and 5 name modules differently; both put "attention" above the
        # reduction norm and "patch_embeddings" above the embedding norm, which keep 1e-5)
        if isinstance(module, torch.nn.LayerNorm) and not ("patch_embeddings" in name or
                                                           "attention" in name):
            module.eps, changed = 1e-6, changed + 1
    assert changed == 2 * 8 + 4  # two per block, one per stage
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = backbone(image)
    for o, t in zip(ours, ref.hub_stage_features(hf, image), strict=True):
        assert torch.equal(o, t)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["hf", "mmseg"])
def test_mit_b5_matches_transformers(fmt, tmp_path):
    """The real size: MiT-B5 (depths 3/6/40/3) into pvt_v2_b5, daformer_mitb5's encoder."""
    errors = ref.stage_errors("mit_b5", fmt, torch.randn(2, 3, 64, 96), tmp_path)
    print(f"mit_b5 {fmt}: max abs stage error {errors}")
    assert max(errors) <= TOLERANCE


def test_mmseg_key_map_covers_every_tensor(tmp_path):
    """Each backbone tensor comes from the checkpoint tensor of the same role: kv is
    [key; value] and the classification head is dropped by name."""
    hub = ref.hub_state(ref.segformer("mit_b0"), tmp_path / "hub")
    mmseg = ref.mmseg_from_hub(hub)
    converted, source = convert.convert_mit(mmseg, convert.checkpoint_format(mmseg))
    own = ref.timm_backbone("mit_b0").state_dict()
    assert converted.keys() == own.keys()
    assert "head.weight" not in source.values()
    assert torch.equal(converted["stages_1.blocks.0.mlp.dwconv.weight"],
                       hub["segformer.encoder.block.1.0.mlp.dwconv.dwconv.weight"])
    kv = converted["stages_0.blocks.1.attn.kv.bias"]
    assert torch.equal(kv[:32], hub["segformer.encoder.block.0.1.attention.self.key.bias"])
    assert torch.equal(kv[32:], hub["segformer.encoder.block.0.1.attention.self.value.bias"])
    assert torch.equal(converted["stages_3.norm.weight"], hub["segformer.encoder.layer_norm.3.weight"])


def _save_mmseg(tmp_path, edit):
    hub = ref.hub_state(ref.segformer("mit_b0"), tmp_path / "hub")
    state = ref.mmseg_from_hub(hub)
    edit(state)
    path = tmp_path / "edited.pth"
    torch.save(state, path)
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("block3.1.mlp.fc2.bias"), "missing key 'stages_2.blocks.1.mlp.fc2.bias'"),
    (lambda s: s.update({"block2.0.attn.extra.weight": torch.zeros(1)}),
     "'block2.0.attn.extra.weight' is not a MiT"),
    (lambda s: s.update({"block4.2.norm1.weight": torch.zeros(256)}),
     "unexpected key 'block4.2.norm1.weight'"),
    (lambda s: s.update({"norm2.weight": torch.zeros(65)}),
     r"key 'norm2.weight' has shape \(65,\), the model's 'stages_1.norm.weight' has \(64,\)"),
])
def test_bad_mit_file_names_the_key(edit, message, tmp_path):
    path = _save_mmseg(tmp_path, edit)
    with pytest.raises(ValueError, match=message) as err:
        load_backbone(ref.timm_backbone("mit_b0"), path)
    assert "\n" not in str(err.value)


def test_hub_key_without_value_half(tmp_path):
    hub = ref.hub_state(ref.segformer("mit_b0"), tmp_path / "hub")
    hub.pop("segformer.encoder.block.2.0.attention.self.value.weight")
    with pytest.raises(convert.ConversionError, match="block.2.0.attention.self.key.weight.*value"):
        convert.convert_mit(hub, "hf")


def _mmseg_segmentor(tmp_path, num_classes: int, *, seed: int) -> dict:
    torch.manual_seed(seed)
    hub = ref.hub_state(ref.segformer("mit_b0", seed=seed), tmp_path / f"hub{seed}")
    backbone = {f"backbone.{k}": v for k, v in ref.mmseg_from_hub(hub).items() if k[:5] != "head."}
    return {**backbone, **ref.daformer_head_state((32, 64, 160, 256), num_classes)}


def test_daformer_head_matches_daformer_layer_for_layer(tmp_path):
    """DAFormer's decode_head (real mmseg names) loads into our DAFormerHead strictly and
    computes what DAFormer's head computes from those tensors."""
    state = _mmseg_segmentor(tmp_path, 19, seed=0)
    mmseg_head = {k.removeprefix("decode_head."): v for k, v in state.items() if k.startswith("decode_head.")}
    head_state, source = convert.convert_daformer_head(mmseg_head)
    head = DAFormerHead((32, 64, 160, 256), 19).eval()
    convert.check_state(head.state_dict(), head_state, source)
    head.load_state_dict(head_state)
    features = [torch.randn(1, c, 32 // s, 48 // s) for c, s in ((32, 1), (64, 2), (160, 4), (256, 8))]
    with torch.no_grad():
        ours, _ = head(features)
    theirs = ref.daformer_head_forward(state, features)
    assert (ours - theirs).abs().max().item() < 1e-4


def test_uda_roles_and_foreign_heads(tmp_path):
    student = _mmseg_segmentor(tmp_path, 19, seed=0)
    teacher = _mmseg_segmentor(tmp_path, 19, seed=1)
    uda = {**{f"model.{k}": v for k, v in student.items()},
           **{f"ema_model.{k}": v for k, v in teacher.items()},
           **{f"imnet_model.{k}": v for k, v in student.items() if k.startswith("backbone.")}}
    assert convert.is_mmseg_segmentor(uda) and convert.is_mmseg_segmentor(student)
    for role, expected in (("student", student), ("teacher", teacher)):
        converted, _ = convert.convert_segmentor(uda, role)
        assert torch.equal(converted["head.classifier.weight"], expected["decode_head.conv_seg.weight"])
        assert torch.equal(converted["backbone.stages_2.norm.bias"], expected["backbone.norm3.bias"])
    # a DAFormer head beside an HRDA scale attention is neither layout (tests/test_hrda_convert.py)
    hrda = {**student, "decode_head.scale_attention.conv_seg.weight": torch.zeros(19, 256, 1, 1)}
    with pytest.raises(convert.ConversionError, match="'decode_head.embed_layers.0.proj.weight' is "
                       "not part of HRDA's head"):
        convert.convert_segmentor(hrda)


@pytest.mark.slow
def test_released_daformer_checkpoint_evaluates(tmp_path):
    """A DAFormer UDA checkpoint (model / ema_model / imnet_model, mmcv's meta) loads through
    ``load_trained`` as ``--checkpoint X --preset gta2cs_daformer`` does: student = model.*,
    teacher = ema_model.*, every tensor of daformer_mitb5 set."""
    from t2sda.inference import load_trained
    from t2sda.presets import get_preset

    hf = ref.segformer("mit_b5")
    hub = ref.hub_state(hf, tmp_path / "hub")
    backbone = {f"backbone.{k}": v for k, v in ref.mmseg_from_hub(hub).items() if k[:5] != "head."}
    student = {**backbone, **ref.daformer_head_state((64, 128, 320, 512), 19)}
    teacher = {**backbone, **ref.daformer_head_state((64, 128, 320, 512), 19)}  # shared backbone
    state = {**{f"model.{k}": v for k, v in student.items()},
             **{f"ema_model.{k}": v for k, v in teacher.items()},
             **{f"imnet_model.{k}": v for k, v in backbone.items()}}
    path = tmp_path / "daformer_release.pth"
    torch.save({"meta": {"iter": 40000, "CLASSES": ("road",) * 19}, "state_dict": state}, path)

    trained = load_trained(checkpoint_path=path, config=get_preset("gta2cs_daformer"), model="both")
    assert trained.step == 40000
    for role, expected in (("student", student), ("teacher", teacher)):
        model = trained.models[role]
        assert torch.equal(model.head.classifier.weight, expected["decode_head.conv_seg.weight"])
        assert torch.equal(model.head.aspp[2][0][1].running_var,
                           expected["decode_head.fuse_layer.aspp_modules.2.depthwise_conv.bn.running_var"])
    image = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ours = trained.models["student"].backbone(trained.models["student"].normalise(image))
    theirs = ref.hub_stage_features(hf, trained.models["student"].normalise(image))
    assert max((o - t).abs().max().item() for o, t in zip(ours, theirs)) <= TOLERANCE


def _own_segmentor_state(num_classes: int) -> dict:
    """daformer_mitb5's state dict names, with the MiT-B0-sized encoder of the generated files."""
    own = {f"backbone.{k}": v for k, v in ref.timm_backbone("mit_b0").state_dict().items()}
    head = DAFormerHead((32, 64, 160, 256), num_classes).state_dict()
    return {**own, **{f"head.{k}": v for k, v in head.items()}}


@pytest.mark.parametrize("edit, message", [
    (lambda s: None, None),
    (lambda s: s.pop("model.decode_head.fuse_layer.bottleneck.bn.running_mean"),
     "missing key 'head.bottleneck.1.running_mean'"),
    (lambda s: s.update({"model.decode_head.conv_seg.weight": torch.zeros(16, 256, 1, 1)}),
     r"key 'model.decode_head.conv_seg.weight' has shape \(16, 256, 1, 1\), the model's "
     r"'head.classifier.weight' has \(19, 256, 1, 1\)"),
])
def test_release_checked_against_the_model(edit, message, tmp_path):
    state = {f"model.{k}": v for k, v in _mmseg_segmentor(tmp_path, 19, seed=0).items()}
    edit(state)
    converted, source = convert.convert_segmentor(state, "student")
    if message is None:
        convert.check_state(_own_segmentor_state(19), converted, source)
        return
    with pytest.raises(convert.ConversionError, match=message):
        convert.check_state(_own_segmentor_state(19), converted, source)


def test_load_trained_refuses_an_hrda_release_for_a_single_scale_config(tmp_path):
    """``evaluate --checkpoint hrda.pth --preset gta2cs_daformer``: an HRDA-style head stops
    with one line naming model.hrda; a state dict that is no mmseg segmentor goes on to
    t2sda's own checkpoint reader."""
    from t2sda.checkpoint import CheckpointError
    from t2sda.inference import load_trained
    from t2sda.presets import get_preset

    state = {f"model.{k}": v for k, v in _mmseg_segmentor(tmp_path, 19, seed=0).items()}
    state["model.decode_head.scale_attention.conv_seg.weight"] = torch.zeros(19, 256, 1, 1)
    torch.save({"meta": {"iter": 10}, "state_dict": state}, tmp_path / "hrda.pth")
    torch.save(ref.timm_backbone("mit_b0").state_dict(), tmp_path / "timm.pth")
    config = get_preset("gta2cs_daformer")
    with pytest.raises(CheckpointError, match="HRDA / MIC release needs model.hrda=true") as err:
        load_trained(checkpoint_path=tmp_path / "hrda.pth", config=config)
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="not a t2sda checkpoint"):
        load_trained(checkpoint_path=tmp_path / "timm.pth", config=config)
