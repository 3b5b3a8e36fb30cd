"""Style randomisation: random weights written in the published checkpoint format."""

from pathlib import Path

import pytest
import torch

from t2sda.method import style
from t2sda.method.style import StyleLoadError, StyleRandomizer

# a few keys and shapes of the published files, written out independently of the modules
PUBLISHED = {
    "transformer": {"layers.0.conv.weight": (32, 3, 9, 9), "layers.3.fc_gamma1.weight": (128, 100),
                    "layers.7.conv2.bias": (128,), "layers.10.fc_beta.weight": (3, 100)},
    "predictor": {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Mixed_6e.branch7x7dbl_5.conv.weight":
                  (192, 192, 1, 7), "Mixed_5b.branch_pool.bn.running_var": (32,), "fc.weight": (100, 768)},
}


def _write(folder: Path, seed: int = 0, drop: str | None = None) -> Path:
    style.write_random_checkpoint(folder, seed)
    # the files hold the published wrappers, keys and shapes (checked against the list above)
    t = torch.load(folder / "checkpoint_transformer.pth")["state_dict_ghiasi"]
    p = torch.load(folder / "checkpoint_stylepredictor.pth")["state_dict_stylepredictor"]
    emb = torch.load(folder / "checkpoint_embeddings.pth")
    for key, shape in PUBLISHED["transformer"].items():
        assert tuple(t[key].shape) == shape, key
    for key, shape in PUBLISHED["predictor"].items():
        assert tuple(p[key].shape) == shape, key
    assert set(emb) == {"pbn_embedding_mean", "pbn_embedding_covariance", "imagenet_embedding_mean"}
    if drop:
        t.pop(drop)
        torch.save({"state_dict_ghiasi": t}, folder / "checkpoint_transformer.pth")
    return folder


@pytest.fixture(scope="module")
def randomizer(tmp_path_factory):
    return StyleRandomizer.from_folder(_write(tmp_path_factory.mktemp("style")), alpha=0.5)


def test_loads_output_shape_range_and_seeded(randomizer):
    x = torch.rand(2, 3, 80, 96)
    a = randomizer(x, torch.Generator().manual_seed(3))
    b = randomizer(x, torch.Generator().manual_seed(3))
    c = randomizer(x, torch.Generator().manual_seed(4))
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert not any(p.requires_grad for p in randomizer.parameters())


def test_embedding_is_alpha_mix(randomizer, tmp_path):
    x = torch.rand(2, 3, 80, 80)
    seen = {}
    hook = randomizer.transformer.register_forward_pre_hook(lambda m, args: seen.__setitem__("s", args[1]))
    randomizer(x, torch.Generator().manual_seed(5))
    hook.remove()
    z = torch.randn(2, 100, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        own = randomizer.predictor(x)
    expect = 0.5 * (z @ randomizer.chol.T + randomizer.mean) + 0.5 * own
    torch.testing.assert_close(seen["s"], expect)
    cov = randomizer.chol @ randomizer.chol.T
    stored = torch.load(_write(tmp_path) / "checkpoint_embeddings.pth")["pbn_embedding_covariance"]
    torch.testing.assert_close(cov, stored, atol=1e-4, rtol=1e-4)


def test_downsample_runs_both_networks_small_and_keeps_shape(tmp_path):
    r = StyleRandomizer.from_folder(_write(tmp_path), downsample=2)
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[-2:])))
             for m in (r.predictor, r.transformer)]
    out = r(torch.rand(1, 3, 97, 90), torch.Generator().manual_seed(0))
    assert out.shape == (1, 3, 97, 90) and 0 <= out.min() and out.max() <= 1
    assert seen == [(49, 45), (49, 45)]
    for h in hooks:
        h.remove()
    with pytest.raises(ValueError, match="style_downsample=2"):
        r(torch.rand(1, 3, 84, 84))  # 42 px after downsampling


def test_missing_key_and_file_are_one_line_errors(tmp_path):
    _write(tmp_path, drop="layers.3.fc_gamma1.weight")
    with pytest.raises(StyleLoadError, match=r"checkpoint_transformer.pth: missing key .*layers.3.fc_gamma1"):
        StyleRandomizer.from_folder(tmp_path)
    with pytest.raises(StyleLoadError, match="file not found.*style-augmentation"):
        StyleRandomizer.from_folder(tmp_path / "nowhere")
    assert style.SOURCE


def test_too_small_image_is_a_clear_error(randomizer):
    with pytest.raises(ValueError, match="at least 43 px"):
        randomizer(torch.rand(1, 3, 42, 64))
    assert randomizer(torch.rand(1, 3, 43, 43)).shape == (1, 3, 43, 43)
    with pytest.raises(RuntimeError), torch.no_grad():  # the bound is the predictor's own
        randomizer.predictor(torch.rand(1, 3, 42, 42))
