"""Style randomisation (Jackson et al., "Style Augmentation"; used by Kundu et al. and the T2S-DA
authors): a Ghiasi et al. arbitrary-style transfer network conditioned on a 100-d embedding that
mixes a random painting style with the image's own style, ``alpha * random + (1 - alpha) * own``.

The modules mirror the published PyTorch checkpoint files (philipjackson/style-augmentation,
``styleaug/checkpoints/``) so they load by their real key names, strictly:
``checkpoint_transformer.pth`` -> ``{"state_dict_ghiasi": ...}``,
``checkpoint_stylepredictor.pth`` -> ``{"state_dict_stylepredictor": ...}``,
``checkpoint_embeddings.pth`` -> ``pbn_embedding_mean`` (1x100), ``pbn_embedding_covariance``
(100x100), ``imagenet_embedding_mean`` (1x100). The networks are frozen and run without grad.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

EMBED_DIM = 100
FILES = {
    "transformer": ("checkpoint_transformer.pth", "state_dict_ghiasi"),
    "predictor": ("checkpoint_stylepredictor.pth", "state_dict_stylepredictor"),
    "embeddings": ("checkpoint_embeddings.pth", None),
}
SOURCE = "https://github.com/philipjackson/style-augmentation (styleaug/checkpoints/)"
MIN_SIZE = 43  # the smallest image side the predictor's strided, unpadded stem accepts


class StyleLoadError(ValueError):
    """A checkpoint file that does not match the published format; one line naming file and key."""


class _Plain(nn.Module):
    """Conv, instance norm, ReLU; not conditioned (the first three layers in Ghiasi et al.)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1):
        super().__init__()
        self.pad, self.conv = nn.ReflectionPad2d(k // 2), nn.Conv2d(cin, cout, k, stride)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        return F.relu(F.instance_norm(self.conv(self.pad(x))))


def _cin(x: torch.Tensor, gamma: nn.Linear, beta: nn.Linear, style: torch.Tensor) -> torch.Tensor:
    """Conditional instance norm: scale and shift per channel predicted from the embedding."""
    return F.instance_norm(x) * gamma(style)[..., None, None] + beta(style)[..., None, None]


class _Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3), nn.Conv2d(c, c, 3)
        for name in ("fc_beta1", "fc_gamma1", "fc_beta2", "fc_gamma2"):
            setattr(self, name, nn.Linear(EMBED_DIM, c))

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        y = F.relu(_cin(self.conv1(F.pad(x, (1,) * 4, mode="reflect")), self.fc_gamma1, self.fc_beta1, style))
        return x + _cin(self.conv2(F.pad(y, (1,) * 4, mode="reflect")), self.fc_gamma2, self.fc_beta2, style)


class _Up(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, upsample: int | None, relu: bool = True):
        super().__init__()
        self.upsample, self.relu, self.k = upsample, relu, k
        self.conv = nn.Conv2d(cin, cout, k)
        self.fc_beta, self.fc_gamma = nn.Linear(EMBED_DIM, cout), nn.Linear(EMBED_DIM, cout)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        if self.upsample:
            x = F.interpolate(x, scale_factor=self.upsample, mode="nearest")
        x = _cin(self.conv(F.pad(x, (self.k // 2,) * 4, mode="reflect")), self.fc_gamma, self.fc_beta, style)
        return F.relu(x) if self.relu else x


class StyleTransformer(nn.Module):
    """Ghiasi et al. transfer network; keys ``layers.{i}.conv``, ``layers.{i}.fc_*``."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(
            [_Plain(3, 32, 9), _Plain(32, 64, 3, 2), _Plain(64, 128, 3, 2)]
            + [_Residual(128) for _ in range(5)]
            + [_Up(128, 64, 3, 2), _Up(64, 32, 3, 2), _Up(32, 3, 9, None, relu=False)]
        )

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, style)
        return torch.sigmoid(x)


class StylePredictor(nn.Module):
    """Inception-v3 up to Mixed_6e, spatial mean, a linear bottleneck 768 -> 100 (``fc``)."""

    def __init__(self):
        super().__init__()
        # Imported here: torchvision.models takes about 2 s to import, paid only with
        # translate=style.
        from torchvision.models.inception import BasicConv2d, InceptionA, InceptionB, InceptionC

        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b, self.Mixed_5c = InceptionA(192, pool_features=32), InceptionA(256, pool_features=64)
        self.Mixed_5d, self.Mixed_6a = InceptionA(288, pool_features=64), InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, channels_7x7=128), InceptionC(768, channels_7x7=160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, channels_7x7=160), InceptionC(768, channels_7x7=192)
        self.fc = nn.Linear(768, EMBED_DIM)
        # ImageNet normalisation then Google's [-1, 1] Inception input, folded into one affine map
        # (the published code uses std 0.255 for the first red step; kept for fidelity)
        mean, std1 = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.255])
        std2 = torch.tensor([0.229, 0.224, 0.225])
        self.register_buffer("_scale", (std2 / 0.5 / std1).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_shift", (-mean / std1 * std2 / 0.5 + (mean - 0.5) / 0.5).view(1, 3, 1, 1),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self._scale + self._shift
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, 2)))
        x = F.max_pool2d(x, 3, 2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e"):
            x = getattr(self, f"Mixed_{name}")(x)
        return self.fc(x.mean(dim=(2, 3)))


def _load_state(module: nn.Module, path: Path, wrapper: str) -> None:
    blob = _read(path)
    if wrapper not in blob:
        raise StyleLoadError(f"{path}: missing key {wrapper!r}")
    state, own = blob[wrapper], module.state_dict()
    for key in own:
        if key not in state:
            if key.endswith("num_batches_tracked"):  # a BN counter, unused in eval mode
                continue
            raise StyleLoadError(f"{path}: missing key {wrapper}.{key}")
        if tuple(state[key].shape) != tuple(own[key].shape):
            raise StyleLoadError(f"{path}: key {wrapper}.{key} has shape {tuple(state[key].shape)}, "
                                 f"expected {tuple(own[key].shape)}")
    extra = sorted(set(state) - set(own))
    if extra:
        raise StyleLoadError(f"{path}: unexpected key {wrapper}.{extra[0]}")
    module.load_state_dict(state, strict=False)  # every other key was checked above


def _read(path: Path) -> dict:
    if not path.is_file():
        raise StyleLoadError(f"{path}: file not found (get it from {SOURCE})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise StyleLoadError(f"{path}: not a readable torch checkpoint ({type(e).__name__})") from None


class StyleRandomizer(nn.Module):
    """Frozen transfer network + style predictor + the painting-style Gaussian, batched.

    ``forward(x, generator)``: (B, 3, H, W) in [0, 1] -> restyled images of the same shape.
    ``downsample=k`` runs both networks (predictor and transfer network) on a 1/k-resolution
    copy (area average) and upsamples the output bilinearly (1 = full resolution).
    """

    def __init__(self, alpha: float = 0.5, downsample: int = 1):
        super().__init__()
        self.alpha, self.downsample = alpha, downsample
        self.transformer, self.predictor = StyleTransformer(), StylePredictor()
        self.register_buffer("mean", torch.zeros(1, EMBED_DIM))
        self.register_buffer("chol", torch.eye(EMBED_DIM))  # A with A A^T = covariance
        self.requires_grad_(False).eval()

    @classmethod
    def from_folder(cls, folder: str | Path, **kw) -> StyleRandomizer:
        folder, self = Path(folder), cls(**kw)
        for part, attr in (("transformer", self.transformer), ("predictor", self.predictor)):
            name, wrapper = FILES[part]
            _load_state(attr, folder / name, wrapper)
        path = folder / FILES["embeddings"][0]
        emb = _read(path)
        expected = {"pbn_embedding_mean": (1, EMBED_DIM), "pbn_embedding_covariance": (EMBED_DIM, EMBED_DIM)}
        for key, shape in expected.items():
            if key not in emb:
                raise StyleLoadError(f"{path}: missing key {key!r}")
            if tuple(emb[key].shape) != shape:
                got = tuple(emb[key].shape)
                raise StyleLoadError(f"{path}: key {key!r} has shape {got}, expected {shape}")
        # covariance = U S U^T (symmetric PSD), so A = U sqrt(S) draws N(mean, cov) from N(0, I)
        u, s, _ = torch.linalg.svd(emb["pbn_embedding_covariance"].double())
        self.mean.copy_(emb["pbn_embedding_mean"].float())
        self.chol.copy_((u * s.clamp_min(0).sqrt()).float())
        return self

    def embedding(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """alpha * random painting style + (1 - alpha) * the image's own predicted style."""
        z = torch.randn(x.shape[0], EMBED_DIM, generator=generator, device="cpu").to(x.device)
        random = z @ self.chol.T + self.mean
        return self.alpha * random + (1 - self.alpha) * self.predictor(x)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if -(-min(x.shape[-2:]) // self.downsample) < MIN_SIZE:
            raise ValueError(f"style translation needs images of at least {MIN_SIZE} px after "
                             f"style_downsample={self.downsample} (the Inception style predictor), "
                             f"got {tuple(x.shape[-2:])}")
        amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda)
        with amp:
            k = self.downsample
            small = F.avg_pool2d(x.float(), k, ceil_mode=True) if k > 1 else x.float()
            out = self.transformer(small, self.embedding(small, generator))
        out = out.float()
        if out.shape[-2:] != x.shape[-2:]:  # downsampled, or sizes not divisible by 4
            out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return out.clamp_(0.0, 1.0).to(x.dtype)


def write_random_checkpoint(folder: str | Path, seed: int = 0) -> Path:
    """Random weights in the published file format (keys, shapes, wrappers), for tests and
    cost benchmarks where the real files are absent. Returns ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    parts = {"transformer": StyleTransformer(), "predictor": StylePredictor()}
    for part, module in parts.items():
        name, wrapper = FILES[part]
        torch.save({wrapper: module.state_dict()}, folder / name)
    half = torch.randn(EMBED_DIM, EMBED_DIM) * 0.1
    torch.save({"pbn_embedding_mean": torch.randn(1, EMBED_DIM),
                "pbn_embedding_covariance": half @ half.T,
                "imagenet_embedding_mean": torch.randn(1, EMBED_DIM)}, folder / FILES["embeddings"][0])
    return folder
