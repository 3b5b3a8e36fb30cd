"""Run configuration: nested keyword-only dataclasses, validated on construction.

Every reconstructed choice of the method (see docs/METHOD.md) is a field here, so the search
spaces can explore it. Overrides use dotted keys: ``method.pull_temperature=0.1``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from t2sda.config_parse import ConfigError, _build, _missing, _set_dotted, _split

log = logging.getLogger("t2sda")


def _check(ok: bool, key: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {allowed}")


def _choice(key: str, value, options: tuple[str, ...]) -> None:
    _check(value in options, key, value, "allowed: " + ", ".join(options))


def _unit(key: str, value, *, open_high: bool = False) -> None:
    ok = 0.0 <= value < 1.0 if open_high else 0.0 <= value <= 1.0
    _check(ok, key, value, "must be in [0, 1)" if open_high else "must be in [0, 1]")


def _positive(key: str, value) -> None:
    _check(value > 0, key, value, "must be > 0")


def _non_negative(key: str, value) -> None:
    _check(value >= 0, key, value, "must be >= 0")


@dataclass(kw_only=True)
class DataConfig:
    name: str = "digits"  # digits (embedded) | real (the dataset folders below)
    strength: float = 0.5  # digits: blend of target ("real") rendering over the source one
    image_size: int = 64
    train_scenes: int = 4000  # scenes per domain in the cached training pool
    val_scenes: int = 500  # held-out target scenes used for evaluation
    # Labelled source images held out of training (and of rare-class sampling) for label-free
    # model selection and feature diagnostics: digits renders them from the held-out digits,
    # real datasets take those whose relative image path hashes lowest (data/real.py).
    source_val_images: int = 200
    batch_size: int = 32  # per process (per worker under DDP)
    num_workers: int = 0
    oracle: bool = False  # train on *labelled target* images: the upper bound
    # name=real: dataset folders in their official layouts (t2sda/data/folders.py).
    source: str = "gta5"  # gta5 | synthia | cityscapes | bdd100k | mapillary | acdc | dark_zurich
    target: str = "cityscapes"  # "" = domain generalization: no target images
    val: str = "cityscapes"  # comma-separated; the first gives val/mIoU, others val_<name>/mIoU
    source_root: str = ""  # "" = $T2SDA_<NAME>_ROOT, else $T2SDA_DATA/<name>
    target_root: str = ""
    val_roots: str = ""  # comma-separated like val; "" entries: target_root or the environment
    source_split: str = "train"
    target_split: str = "train"
    val_split: str = "val"
    source_size: str = "1280x720"  # WxH to fit images into (aspect kept) before cropping; "" = as is
    target_size: str = "1024x512"
    val_size: str = "1024x512"  # validation images are resized; labels are scored at full size
    crop_size: int = 512  # random square training crops; 0 = whole images
    flip: bool = True
    cat_max_ratio: float = 0.75  # re-crop while one class covers more of the crop (1 = off)
    rcs_temperature: float = 0.0  # rare-class sampling of source images (DAFormer 0.01); 0 = off
    rcs_min_pixels: int = 3000  # an image counts for a class with more than this many pixels (DAFormer: >)
    rcs_min_crop_ratio: float = 0.5  # crops retried until they hold ratio * min_pixels of it (HRDA 2)
    num_classes: int = 0  # 0 = all 19; K scores train ids < K only (the rest ignored)
    eval_crop: int = 0  # sliding-window side for validation; 0 = whole image
    eval_stride: int = 0  # 0 = eval_crop // 2
    eval_batch_size: int = 0  # 0 = batch_size
    cache_dir: str = ""  # folder scans, class statistics, rendered digits; "" = ~/.cache/t2sda
    scan_workers: int = 0  # threads reading files at start-up; 0 = min(8, CPUs)

    def __post_init__(self):
        from t2sda.data.folders import LAYOUTS  # data.folders imports config lazily: no cycle

        _choice("data.name", self.name, ("digits", "real"))
        _unit("data.strength", self.strength)
        _check(self.image_size >= 16, "data.image_size", self.image_size, "must be >= 16")
        for key in ("train_scenes", "val_scenes", "batch_size"):
            _positive(f"data.{key}", getattr(self, key))
        _non_negative("data.num_workers", self.num_workers)
        _choice("data.source", self.source, tuple(LAYOUTS))
        _choice("data.target", self.target, ("", *LAYOUTS))
        for name in self.val.split(","):
            _choice("data.val", name, tuple(LAYOUTS))
        roots = self.val_roots.split(",") if self.val_roots else []
        _check(len(roots) <= len(self.val.split(",")), "data.val_roots", self.val_roots,
               "at most one root per data.val entry")
        for key in ("source", "target", "val"):
            name, split = getattr(self, key).split(",")[0], getattr(self, f"{key}_split")
            if name:
                _choice(f"data.{key}_split", split, tuple(LAYOUTS[name].splits))
            size = getattr(self, f"{key}_size")
            _check(size == "" or self.size(key) is not None, f"data.{key}_size", size,
                   "expected WIDTHxHEIGHT, e.g. 1280x720, or empty")
        for key in ("source_val_images", "crop_size", "rcs_min_pixels", "num_classes", "eval_crop",
                    "eval_stride", "eval_batch_size", "scan_workers"):
            _non_negative(f"data.{key}", getattr(self, key))
        _check(0 < self.cat_max_ratio <= 1, "data.cat_max_ratio", self.cat_max_ratio,
               "must be in (0, 1]")
        _non_negative("data.rcs_temperature", self.rcs_temperature)
        _non_negative("data.rcs_min_crop_ratio", self.rcs_min_crop_ratio)  # HRDA: 2.0
        _check(self.num_classes <= 19, "data.num_classes", self.num_classes, "must be <= 19")

    def size(self, key: str) -> tuple[int, int] | None:
        """``data.<key>_size`` as (width, height); None when empty or malformed."""
        width, sep, height = getattr(self, f"{key}_size").partition("x")
        if not (sep and width.isdigit() and height.isdigit() and int(width) and int(height)):
            return None
        return int(width), int(height)


@dataclass(kw_only=True)
class ModelConfig:
    name: str = "small_cnn"
    pretrained: str = ""  # "" random init, "timm" hub weights, or a local checkpoint path
    proj_dim: int = 128  # output dim of the training-only projection head
    # HRDA (docs/METHOD.md): a context crop (the training crop) seen at hrda_context_scale and
    # a detail crop of hrda_detail_crop px inside it at full resolution, fused by a learned
    # scale attention; inference and pseudo labels from overlapping detail windows.
    hrda: bool = False
    hrda_context_scale: float = 0.5  # HRDA: 0.5 (1/k for a whole k)
    hrda_detail_crop: int = 512  # detail-crop side in pixels (HRDA: 512 in 1024 px crops)
    hrda_detail_stride: int = 0  # sliding detail windows' stride; 0 = crop / 2 (HRDA)
    hrda_detail_loss_weight: float = 0.1  # HRDA's lambda_d; the fused loss gets 1 - it
    hrda_attention_classwise: bool = True  # one attention per class (HRDA) or one per pixel

    def __post_init__(self):
        from t2sda.models import MODELS  # models do not import config: no cycle

        _choice("model.name", self.name, tuple(MODELS))
        _positive("model.proj_dim", self.proj_dim)
        scale = self.hrda_context_scale
        _check(0 < scale <= 1 and round(1 / scale, 6).is_integer(), "model.hrda_context_scale",
               scale, "must be 1/k for a whole k >= 1, e.g. 0.5")
        _positive("model.hrda_detail_crop", self.hrda_detail_crop)
        _non_negative("model.hrda_detail_stride", self.hrda_detail_stride)
        _unit("model.hrda_detail_loss_weight", self.hrda_detail_loss_weight, open_high=True)

    def hrda_options(self) -> dict | None:
        """build_model's ``hrda`` keywords (None with model.hrda off)."""
        if not self.hrda:
            return None
        return {"context_scale": self.hrda_context_scale, "detail_crop": self.hrda_detail_crop,
                "detail_stride": self.hrda_detail_stride,
                "classwise": self.hrda_attention_classwise}


@dataclass(kw_only=True)
class MethodConfig:
    # Self-training (DAFormer-style mean teacher).
    self_training: bool = True  # false = source-only
    self_training_start: int = 0  # steps of source-only warm-up before adaptation starts
    ema_momentum: float = 0.999
    # true: the teacher becomes a copy of the student at the first adaptation step, so the
    # momentum only acts from there on (and a search can share one source-only warm-up).
    teacher_reset: bool = False
    pseudo_threshold: float = 0.968
    pseudo_weight: str = "fraction"  # batch_fraction (DAFormer: q per batch) | fraction (per image) | pixel
    pseudo_ignore_top: int = 0  # pixels at the top/bottom of target crops ignored (margins)
    pseudo_ignore_bottom: int = 0
    mix: str = "classmix"  # classmix | none (plain pseudo-label CE on the target image)
    strong_aug: bool = True  # colour jitter + Gaussian blur on mixed images
    # 1. Target-like source.
    translate: str = "fda"  # fda | color | style | none
    # translate=style: folder with the style-augmentation release's checkpoint_transformer.pth,
    # checkpoint_stylepredictor.pth and checkpoint_embeddings.pth (t2sda/method/style.py)
    style_checkpoint: str = ""
    style_alpha: float = 0.5  # embedding = alpha * random painting style + (1 - alpha) * own style
    style_downsample: int = 1  # run the style network at 1/k resolution, then upsample (1 = off)
    fda_beta: float = 0.01  # half-side of the swapped low-frequency square, fraction of side
    color_space: str = "lab"  # lab | rgb, for translate=color
    src_ce_on_translated: bool = True
    # 2. Pull loss.
    pull_weight: float = 0.1  # lambda; 0 switches the pull term off
    pull_warmup: int = 0  # steps over which lambda ramps in (after self_training_start)
    pull_temperature: float = 0.2
    pull_source_pixels: bool = True  # queries from target-like source pixels (labels y_s)
    pull_target_pixels: bool = True  # also pull confident target pixels (teacher labels)
    pull_target_threshold: float = 0.968  # teacher confidence a target pixel needs to be pulled
    pull_keys: str = "bank"  # bank (EMA prototypes of past batches) | batch
    pull_key_net: str = "teacher"  # teacher (EMA) | student (its own x_s pass, detached: cheaper)
    # proj: the pull acts on the training-only projection head's output (model.proj_dim);
    # decoder: directly on the decoder feature the classifier reads (no projection head)
    pull_feature: str = "proj"
    proto_momentum: float = 0.99
    negatives: str = "pixels"  # pixels | prototypes
    negative_sampling: str = "balanced"  # balanced (evenly per class) | uniform
    num_queries: int = 256  # per class
    num_negatives: int = 256  # per query
    query_aug: bool = True  # queries from strongly augmented translated images
    # DAFormer's ImageNet feature distance: student vs frozen pretrained backbone, bottleneck
    # features of source images, on pixels of these classes (train ids; Cityscapes "things").
    fd_weight: float = 0.0  # DAFormer 0.005; needs model.pretrained
    fd_classes: str = "6,7,11,12,13,14,15,16,17,18"
    fd_min_ratio: float = 0.75  # a feature pixel counts for a class covering >= this of its cell
    # 3. Dynamic class re-weighting.
    weight_mode: str = "iou"  # iou | confidence | uniform
    weight_momentum: float = 0.9
    weight_gamma: float = 1.0
    weight_schedule: str = "linear"  # constant | linear | cosine | step
    weight_warmup: int = 0  # steps over which uniform weights blend into dynamic ones
    # 4. MIC's masked image consistency (docs/METHOD.md): the student on the target image with
    # random blocks hidden learns the teacher's pseudo labels of the whole image.
    mic_weight: float = 0.0  # MIC: 1; 0 = off
    mic_mask_ratio: float = 0.7  # fraction of blocks hidden (MIC: 0.7)
    mic_block: int = 64  # block side in pixels (MIC: 64 at 512-1024 px crops; digits: 8)
    mic_augment: bool = True  # colour jitter + blur on the image before masking (MIC: on)

    def __post_init__(self):
        _non_negative("method.self_training_start", self.self_training_start)
        _unit("method.ema_momentum", self.ema_momentum, open_high=True)
        _unit("method.pseudo_threshold", self.pseudo_threshold)
        _choice("method.pseudo_weight", self.pseudo_weight, ("batch_fraction", "fraction", "pixel"))
        _non_negative("method.pseudo_ignore_top", self.pseudo_ignore_top)
        _non_negative("method.pseudo_ignore_bottom", self.pseudo_ignore_bottom)
        _choice("method.mix", self.mix, ("classmix", "none"))
        _choice("method.translate", self.translate, ("fda", "color", "style", "none"))
        _check(self.translate != "style" or self.style_checkpoint != "", "method.style_checkpoint",
               self.style_checkpoint, "translate=style needs the folder of the style-augmentation "
               "release's checkpoints (github.com/philipjackson/style-augmentation, "
               "styleaug/checkpoints/)")
        _unit("method.style_alpha", self.style_alpha)
        _positive("method.style_downsample", self.style_downsample)
        _non_negative("method.fd_weight", self.fd_weight)
        _check(all(c.strip().isdigit() for c in self.fd_classes.split(",")), "method.fd_classes",
               self.fd_classes, "expected comma-separated train ids, e.g. 6,7,11")
        _unit("method.fd_min_ratio", self.fd_min_ratio)
        _check(0 < self.fda_beta <= 0.5, "method.fda_beta", self.fda_beta, "must be in (0, 0.5]")
        _choice("method.color_space", self.color_space, ("lab", "rgb"))
        _non_negative("method.pull_weight", self.pull_weight)
        _unit("method.pull_target_threshold", self.pull_target_threshold)
        _non_negative("method.pull_warmup", self.pull_warmup)
        _positive("method.pull_temperature", self.pull_temperature)
        _choice("method.pull_keys", self.pull_keys, ("bank", "batch"))
        _choice("method.pull_key_net", self.pull_key_net, ("teacher", "student"))
        _choice("method.pull_feature", self.pull_feature, ("proj", "decoder"))
        _check(self.pull_weight == 0 or self.pull_source_pixels or self.pull_target_pixels,
               "method.pull_source_pixels", self.pull_source_pixels,
               "the pull needs queries: set it or method.pull_target_pixels to true "
               "(or method.pull_weight=0)")
        _unit("method.proto_momentum", self.proto_momentum, open_high=True)
        _choice("method.negatives", self.negatives, ("pixels", "prototypes"))
        _choice("method.negative_sampling", self.negative_sampling, ("balanced", "uniform"))
        _positive("method.num_queries", self.num_queries)
        _positive("method.num_negatives", self.num_negatives)
        _choice("method.weight_mode", self.weight_mode, ("iou", "confidence", "uniform"))
        _unit("method.weight_momentum", self.weight_momentum, open_high=True)
        _non_negative("method.weight_gamma", self.weight_gamma)
        _choice(
            "method.weight_schedule", self.weight_schedule, ("constant", "linear", "cosine", "step")
        )
        _non_negative("method.weight_warmup", self.weight_warmup)
        _non_negative("method.mic_weight", self.mic_weight)
        _unit("method.mic_mask_ratio", self.mic_mask_ratio, open_high=True)
        _check(self.mic_block >= 1, "method.mic_block", self.mic_block, "must be >= 1 (pixels)")


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 6e-5
    head_lr_mult: float = 10.0
    weight_decay: float = 0.01
    warmup_iters: int = 1500
    poly_power: float = 1.0
    # The lr above is for one process. Under DDP the global batch is data.batch_size x workers;
    # linear / sqrt multiply the lr by workers / sqrt(workers) (none keeps it as given).
    lr_scaling: str = "none"

    def __post_init__(self):
        _positive("optim.lr", self.lr)
        _positive("optim.head_lr_mult", self.head_lr_mult)
        _non_negative("optim.weight_decay", self.weight_decay)
        _non_negative("optim.warmup_iters", self.warmup_iters)
        _non_negative("optim.poly_power", self.poly_power)
        _choice("optim.lr_scaling", self.lr_scaling, ("none", "linear", "sqrt"))


@dataclass(kw_only=True)
class TrainConfig:
    iters: int = 40000
    eval_every: int = 4000
    checkpoint_every: int = 4000
    log_every: int = 50
    keep_checkpoints: int = 2  # best checkpoints by val mIoU kept (the newest is always kept too)
    images_every: int = 0  # 0 = log images at each evaluation
    amp: str = "auto"  # auto (bf16 on CUDA) | bf16 | none
    channels_last: bool = True  # CUDA only: NHWC memory format (faster convolutions on tensor cores)
    threads: int = 0  # torch CPU threads, 0 = torch's default
    # Under DDP (2+ processes) the student's BatchNorm layers become SyncBatchNorm: batch
    # statistics over the global batch instead of each rank's shard. CUDA only (DDP refuses
    # SyncBatchNorm on CPU/gloo); one process has nothing to sync, so it is a no-op there.
    sync_bn: bool = False
    # torch.compile of the student's and teacher's segmentor forward (docs/performance.md)
    compile: str = "none"  # none | default | max-autotune
    # Activation checkpointing of the student's backbone stages: less memory, ~1 more forward
    grad_checkpoint: bool = False  # daformer_mitb5 / deeplabv2_r101 only
    fail_at_step: int = -1  # testing aid: raise once at this step (fault-tolerance tests)
    # At each evaluation: feature diagnostics feat/... (t2sda/monitor.py) and the label-free
    # model-selection scores select/... (t2sda/validators.py).
    diagnostics: bool = True
    validators: bool = True

    def __post_init__(self):
        _non_negative("train.iters", self.iters)
        for key in ("eval_every", "checkpoint_every", "log_every"):
            _positive(f"train.{key}", getattr(self, key))
        _positive("train.keep_checkpoints", self.keep_checkpoints)
        _non_negative("train.images_every", self.images_every)
        _choice("train.amp", self.amp, ("auto", "bf16", "none"))
        _non_negative("train.threads", self.threads)
        _choice("train.compile", self.compile, ("none", "default", "max-autotune"))


@dataclass(kw_only=True)
class Config:
    seed: int = 0  # everything: initialisation, the digits scenes, data order, sampling
    # Only what happens from method.self_training_start on (0 with no self-training): the data
    # order and the per-step randomness (mixing, sampled pixels, augmentation) of adaptation.
    # 0 = the run's seed throughout. Replicates that share one warm-up differ only in this.
    adapt_seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        _non_negative("seed", self.seed)
        _non_negative("adapt_seed", self.adapt_seed)
        _check(self.method.fd_weight == 0 or self.model.pretrained != "", "method.fd_weight",
               self.method.fd_weight, "the feature distance is to the pretrained backbone: "
               "set model.pretrained (timm or a checkpoint path) or method.fd_weight=0")
        side = self.data.image_size if self.data.name == "digits" else self.data.crop_size
        _check(not self.model.hrda or not side or self.model.hrda_detail_crop <= side,
               "model.hrda_detail_crop", self.model.hrda_detail_crop,
               f"the detail crop must fit in the training crop ({side} px)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> Config:
        return _build(cls, raw, prefix="")

    def with_overrides(self, overrides: list[str] | dict) -> Config:
        """Return a new validated Config with ``key=value`` strings (or a dict) applied."""
        raw = self.to_dict()
        items = overrides.items() if isinstance(overrides, dict) else map(_split, overrides)
        for key, value in items:
            _set_dotted(raw, key, value)
        return Config.from_dict(raw)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Config:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path}: not found") from None
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"config file {path}: not valid JSON ({err})") from None
        if isinstance(raw, dict) and "config" in raw:
            # best_config.json (tune.py) wraps the config under "config" beside its metadata;
            # config keys beside it would be ignored, so such a file is refused.
            clash = sorted(set(raw) & {f.name for f in dataclasses.fields(cls)})
            if clash:
                raise ConfigError(f"config file {path}: has a 'config' entry and top-level config "
                                  f"keys ({', '.join(clash)}); keep one or the other")
            raw = raw["config"]
        try:
            cfg = cls.from_dict(raw)
        except ConfigError as err:
            raise ConfigError(f"config file {path}: {err}") from None
        missing = _missing(cfg.to_dict(), raw, prefix="")
        if missing:
            log.warning("config file %s: %d key(s) not in it take their defaults: %s", path,
                        len(missing), ", ".join(missing))
        return cfg
