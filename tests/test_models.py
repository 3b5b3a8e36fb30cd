"""Model registry: shapes, parameter groups, gradients and backbone checkpoint loading."""

from __future__ import annotations

import logging

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from t2sda.models import MODELS, Segmentor, _full_model_key, build_model, load_backbone
from t2sda.models.proj import ProjectionHead

NUM_CLASSES = 11
STRIDE = {"deeplabv2_r101": 8, "daformer_mitb5": 4, "small_cnn": 2}
FEATURE_DIM = {"deeplabv2_r101": 2048, "daformer_mitb5": 256, "small_cnn": 64}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Batch-1 forwards are too small to gain from threads, and on a shared 2-core machine
    OpenMP workers waiting on a descheduled sibling made these tests several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=sorted(MODELS))
def built(request) -> tuple[str, Segmentor]:
    """(name, model), each built once per module: the big ones take seconds to construct."""
    torch.manual_seed(0)
    return request.param, build_model(request.param, num_classes=NUM_CLASSES)


def test_registry_matches_expectations():
    assert set(MODELS) == set(STRIDE)


def test_output_shapes(built: tuple[str, Segmentor]):
    name, model = built
    model.eval()  # batch 1 with BN: use running statistics
    with torch.no_grad():
        logits, feature = model(torch.rand(1, 3, 64, 64))
    h = 64 // STRIDE[name]
    assert logits.shape == (1, NUM_CLASSES, h, h)
    assert feature.shape == (1, model.feature_dim, h, h)
    assert model.feature_dim == FEATURE_DIM[name]
    assert torch.isfinite(logits).all() and torch.isfinite(feature).all()
    # the bottleneck (feature distance) is the backbone's last stage, from the same forward
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        *same, bottleneck = model(x, with_bottleneck=True)
        direct = model.backbone(model.normalise(x))[-1]
    assert len(same) == 2
    torch.testing.assert_close(bottleneck, direct)
    assert bottleneck.shape[1] == {"small_cnn": 64, "deeplabv2_r101": 2048,
                                   "daformer_mitb5": 512}[name]


def test_param_groups_partition(built: tuple[str, Segmentor]):
    _, model = built
    backbone, head = model.param_groups()
    ids_b, ids_h = {id(p) for p in backbone}, {id(p) for p in head}
    assert len(ids_b) == len(backbone) and len(ids_h) == len(head)
    assert not ids_b & ids_h
    assert ids_b | ids_h == {id(p) for p in model.parameters()}
    assert backbone and head


def test_small_cnn_trains_every_parameter():
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=NUM_CLASSES).train()
    logits, feature = model(torch.rand(4, 3, 64, 64))
    label = torch.randint(0, NUM_CLASSES, (4, 64, 64))
    logits = F.interpolate(logits, size=(64, 64), mode="bilinear", align_corners=False)
    (F.cross_entropy(logits, label) + feature.square().mean()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_small_cnn_width_and_size():
    model = MODELS["small_cnn"](num_classes=NUM_CLASSES, width=16)
    assert model.feature_dim == 32
    _, feature = model.eval()(torch.rand(2, 3, 48, 80))
    assert feature.shape == (2, 32, 24, 40)
    n_params = sum(p.numel() for p in build_model("small_cnn", num_classes=11).parameters())
    assert 50_000 <= n_params <= 150_000


def test_projection_head():
    head = ProjectionHead(64)
    pixels = torch.rand(10, 64, requires_grad=True)
    out = head(pixels)
    assert out.shape == (10, 128)
    # The backward's values, not only its existence: against finite differences (float64).
    assert torch.autograd.gradcheck(ProjectionHead(6, 4).double(),
                                    (torch.rand(5, 6, dtype=torch.float64, requires_grad=True),))
    assert ProjectionHead(32, 16)(torch.rand(3, 32)).shape == (3, 16)


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown model 'nope'; available: daformer_mitb5, "
                                         "deeplabv2_r101, small_cnn"):
        build_model("nope", num_classes=2)


def test_small_cnn_has_no_timm_weights():
    with pytest.raises(ValueError, match="no timm weights"):
        build_model("small_cnn", num_classes=2, pretrained="timm")


def _assert_same_backbone(a: Segmentor, b: Segmentor) -> None:
    sa, sb = a.backbone.state_dict(), b.backbone.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_pretrained_from_file(built: tuple[str, Segmentor], tmp_path):
    """The backbone of a fresh model, saved nested as training scripts do, loads exactly."""
    name, model = built
    path = tmp_path / "backbone.pth"
    torch.save({"state_dict": model.backbone.state_dict()}, path)
    torch.manual_seed(1)  # a different random init
    loaded = build_model(name, num_classes=NUM_CLASSES, pretrained=str(path))
    _assert_same_backbone(model, loaded)


def test_pretrained_full_timm_checkpoint(tmp_path, caplog):
    """A full timm model's weights (``stages.0...``, classifier included) load into a
    features_only backbone (``stages_0...``), here from safetensors. pvt_v2_b0 is the small
    sibling of daformer_mitb5's pvt_v2_b5, with the same module names."""
    full = timm.create_model("pvt_v2_b0", pretrained=False)
    path = tmp_path / "pvt_v2_b0.safetensors"
    save_file(full.state_dict(), str(path))
    backbone = timm.create_model("pvt_v2_b0", features_only=True, pretrained=False)
    with caplog.at_level(logging.WARNING, logger="t2sda.models"):
        load_backbone(backbone, path)
    own, ref = backbone.state_dict(), full.state_dict()
    assert "stages_0.blocks.0.norm1.weight" in own
    for key, value in own.items():
        assert torch.equal(value, ref[key if key in ref else _full_model_key(key)]), key
    assert "0 missing keys" in caplog.text and "2 unexpected keys" in caplog.text  # head.*


def test_pretrained_missing_file(tmp_path):
    path = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_model("small_cnn", num_classes=NUM_CLASSES, pretrained=str(path))


def test_pretrained_nothing_matches(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"model": {"foo.weight": torch.zeros(3)}}, path)
    with pytest.raises(ValueError, match="no key matches the backbone"):
        build_model("small_cnn", num_classes=NUM_CLASSES, pretrained=str(path))


def test_pretrained_shape_mismatch(tmp_path):
    path = tmp_path / "wide.pt"
    torch.save(MODELS["small_cnn"](num_classes=NUM_CLASSES, width=16).backbone.state_dict(), path)
    with pytest.raises(ValueError, match="wrong shape"):
        build_model("small_cnn", num_classes=NUM_CLASSES, pretrained=str(path))
