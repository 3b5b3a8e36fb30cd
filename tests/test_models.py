"""Model registry: shapes, parameter groups, gradients and backbone checkpoint loading."""

from __future__ import annotations

import logging

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from t2sda.models import MODELS, Segmentor, _full_model_key, build_model, load_backbone
from t2sda.models.proj import ProjectionHead, _reaches, gather_pixels
from t2sda.state import Network

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


def _reference_rows(feature, index):
    return feature.permute(0, 2, 3, 1).reshape(-1, feature.shape[1]).index_select(0, index)


def _in_place_rows(feature, index):
    """The in-place path: the map's own other consumer is the one the rows' gradient joins."""
    return gather_pixels(feature, index, consumer=feature * 1.0)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_gather_pixels_gradient_matches_index_select(layout):
    """The rows' gradient lands in the feature's gradient exactly as a dense scatter would,
    next to another consumer of the feature, and is not left behind when a backward skips it."""
    torch.manual_seed(0)
    base = torch.randn(3, 5, 4, 6, dtype=torch.double, requires_grad=True)
    index = torch.tensor([0, 7, 7, 23, 24, 71, 50])  # a repeat, image borders, the last pixel
    weight = torch.randn(len(index), 5, dtype=torch.double)
    grads = []
    for gather in (_reference_rows, gather_pixels, _in_place_rows):  # plain, dense, in place
        feature = (base * 2).contiguous(memory_format=layout)
        rows = gather(feature, index)
        torch.testing.assert_close(rows, _reference_rows(feature, index))
        loss = (feature.square().sum() + (rows * weight).sum())
        grads.append(torch.autograd.grad(loss, base)[0])
    torch.testing.assert_close(grads[1], grads[0])
    torch.testing.assert_close(grads[2], grads[0])
    feature = base * 2
    consumer = (feature * 1.0).sum()
    rows = gather_pixels(feature, index, consumer=consumer)
    only_map = torch.autograd.grad(consumer, base, retain_graph=True)[0]
    torch.testing.assert_close(only_map, torch.full_like(base, 2.0))
    both = torch.autograd.grad(consumer + rows.sum(), base, retain_graph=True)[0]
    expected = torch.full_like(base, 2.0) + 2 * torch.bincount(index, minlength=72).view(3, 1, 4, 6)
    torch.testing.assert_close(both, expected)
    # An add hands one gradient tensor to both inputs: never written into, the dense path.
    assert not _reaches(feature + base, feature) and _reaches((feature * 3).sum(), feature)
    # the rows alone cannot join a gradient that never comes: an error, not a dropped gradient
    with pytest.raises(RuntimeError, match="must include the logits"):
        torch.autograd.grad(rows.sum(), base)
    with torch.no_grad():
        torch.testing.assert_close(gather_pixels(feature, index), rows)


def test_network_projection_gradients_match_index_select(built: tuple[str, Segmentor]):
    """Every parameter's gradient through segmentor + projection head equals the one with a
    plain index_select gather, for every registered model."""
    name, model = built
    model.eval()  # no dropout, fixed BN statistics: the two passes see the same function
    torch.manual_seed(1)
    net = Network(model, ProjectionHead(model.feature_dim, 8))
    image = torch.rand(2, 3, 32, 32)
    h = 32 // STRIDE[name]
    index = torch.randperm(2 * h * h)[: max(3, h * h // 2)]
    for mode in ("train", "eval"):  # the in-place path is taken, dropout or not
        getattr(model, mode)()
        logits, feature = model(image)
        assert _reaches(logits, feature)
    model.eval()
    grads = []
    for tapped in (False, True):
        net.zero_grad()
        if tapped:
            logits, projected = net(image, lambda size: index)
        else:
            logits, feature = model(image)
            projected = net.proj(_reference_rows(feature, index))
        (logits.square().mean() + projected.square().mean()).backward()
        grads.append({k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == len(list(net.parameters()))
    for key, reference in grads[0].items():
        torch.testing.assert_close(grads[1][key], reference, rtol=1e-4, atol=1e-6, msg=key)
    model.train()


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
