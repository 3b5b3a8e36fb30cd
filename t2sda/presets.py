"""Named starting configurations: functions returning a Config (no inheritance)."""

from __future__ import annotations

import os
from collections.abc import Callable

from t2sda.config import (
    Config,
    ConfigError,
    DataConfig,
    MethodConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
)


def digits() -> Config:
    """The embedded default: DigitScenes -> DigitScenes-M at strength 0.5, a small CNN trained
    from scratch on CPU in a few minutes (source-only warm-up, then adaptation)."""
    return Config(
        seed=0,
        data=DataConfig(name="digits", strength=0.5, batch_size=32),
        model=ModelConfig(name="small_cnn", proj_dim=64),
        method=MethodConfig(
            self_training_start=600,
            ema_momentum=0.99,
            pseudo_threshold=0.968,
            fda_beta=0.05,
            pull_weight=0.1,
            pull_warmup=100,
            pull_temperature=0.2,
            num_queries=128,
            num_negatives=128,
            weight_warmup=300,
            mic_block=8,  # MIC's 64 px at DAFormer's 512 px crops: 1/8 of the side
        ),
        optim=OptimConfig(lr=1e-3, head_lr_mult=1.0, weight_decay=0.01, warmup_iters=50),
        train=TrainConfig(iters=1200, eval_every=200, checkpoint_every=200, log_every=20),
    )


def digits_hard() -> Config:
    """The full MNIST-M-style gap (strength 1.0), where plain self-training can collapse."""
    cfg = digits()
    return cfg.with_overrides({"data.strength": 1.0})


STYLE_ENV = "T2SDA_STYLE_CHECKPOINT"


def _translation() -> dict:
    """The paper presets' target-like translation, named explicitly.

    The authors randomise style (method.translate=style) with the style-augmentation release's
    checkpoints, which cannot be shipped here: when ``$T2SDA_STYLE_CHECKPOINT`` names their
    folder the presets use it, otherwise FDA (β = 0.01), which needs no weights.
    """
    folder = os.environ.get(STYLE_ENV, "")
    if folder:
        return {"translate": "style", "style_checkpoint": folder, "style_alpha": 0.5}
    return {"translate": "fda", "fda_beta": 0.01}


def _daformer_recipe(*, source: str, model: str) -> Config:
    """The DAFormer UDA recipe (docs/METHOD.md) on dataset folders: batch 2 of 512² crops
    (GTA5 fitted into 1280x720, SYNTHIA 1280x760, Cityscapes 1024x512), rare-class sampling
    T=0.01, pseudo labels at 0.968 with the DAFormer margins (15 rows at the top, 120 at the
    bottom: rectification border and ego car), EMA 0.999, AdamW 6e-5 (head x10) with 1500
    warm-up iterations, 40k iterations, ImageNet feature distance 0.005 on thing classes;
    validation on Cityscapes val at 1024x512, sliding 512² windows, scored against the
    full-resolution labels. Translation: see ``_translation``."""
    return Config(
        seed=0,
        data=DataConfig(
            name="real", source=source, target="cityscapes", val="cityscapes",
            source_size="1280x720" if source == "gta5" else "1280x760", target_size="1024x512",
            val_size="1024x512", crop_size=512, flip=True, cat_max_ratio=0.75,
            rcs_temperature=0.01, rcs_min_pixels=3000, rcs_min_crop_ratio=0.5,
            eval_crop=512, eval_stride=341, eval_batch_size=1, batch_size=2, num_workers=4),
        model=ModelConfig(name=model, pretrained="timm", proj_dim=128),
        method=MethodConfig(pseudo_threshold=0.968, pseudo_weight="batch_fraction", pseudo_ignore_top=15,
                            pseudo_ignore_bottom=120, ema_momentum=0.999, fd_weight=0.005,
                            **_translation()),
        optim=OptimConfig(lr=6e-5, head_lr_mult=10.0, weight_decay=0.01, warmup_iters=1500),
        train=TrainConfig(iters=40000, eval_every=4000, checkpoint_every=4000, log_every=50),
    )


def gta2cs_daformer() -> Config:
    """GTA5 -> Cityscapes, DAFormer (MiT-B5-like backbone + fusion head)."""
    return _daformer_recipe(source="gta5", model="daformer_mitb5")


def gta2cs_deeplabv2() -> Config:
    """GTA5 -> Cityscapes, DeepLabV2 ResNet-101."""
    return _daformer_recipe(source="gta5", model="deeplabv2_r101")


def syn2cs_daformer() -> Config:
    """SYNTHIA -> Cityscapes, DAFormer; val/mIoU16 and val/mIoU13 are the reported scores."""
    return _daformer_recipe(source="synthia", model="daformer_mitb5")


def syn2cs_deeplabv2() -> Config:
    """SYNTHIA -> Cityscapes, DeepLabV2 ResNet-101."""
    return _daformer_recipe(source="synthia", model="deeplabv2_r101")


def _hrda_recipe(*, source: str, mic: bool) -> Config:
    """HRDA's published recipe (configs/hrda/gtaHR2csHR_hrda.py; SYNTHIA as its experiments.py
    id 40), MIC's on top of it with ``mic`` (seg/configs/mic/gtaHR2csHR_mic_hrda.py, id 80):
    the DAFormer recipe at full resolution (GTA5 fitted into 2560x1440, SYNTHIA 2560x1520,
    Cityscapes 2048x1024; 1024² context crops, batch 2), a 512² detail crop, context at 0.5,
    λ_d 0.1, class-wise scale attention, rare-class sampling T=0.01 with min_crop_ratio 2.0
    (four times the pixels), pseudo-label margins 30 / 240 rows (HRDA's "v2" crop margins; see
    docs/METHOD.md), FD 0.005 on the context features; validation on 2048x1024 Cityscapes val
    in sliding 1024² windows at stride 512, each run with HRDA inference. MIC: masked target
    images, 64 px blocks, ratio 0.7, weight 1, colour-augmented before masking."""
    cfg = _daformer_recipe(source=source, model="daformer_mitb5")
    return cfg.with_overrides({
        "data.source_size": "2560x1440" if source == "gta5" else "2560x1520",
        "data.target_size": "2048x1024", "data.val_size": "2048x1024", "data.crop_size": 1024,
        "data.rcs_min_crop_ratio": 2.0, "data.eval_crop": 1024, "data.eval_stride": 512,
        "model.hrda": True, "model.hrda_context_scale": 0.5, "model.hrda_detail_crop": 512,
        "model.hrda_detail_stride": 256, "model.hrda_detail_loss_weight": 0.1,
        "model.hrda_attention_classwise": True,
        "method.pseudo_ignore_top": 30, "method.pseudo_ignore_bottom": 240,
        **({"method.mic_weight": 1.0, "method.mic_mask_ratio": 0.7, "method.mic_block": 64,
            "method.mic_augment": True} if mic else {}),
    })


def gta2cs_hrda() -> Config:
    """GTA5 -> Cityscapes, HRDA (DAFormer MiT-B5 network) + T2S-DA."""
    return _hrda_recipe(source="gta5", mic=False)


def gta2cs_mic() -> Config:
    """GTA5 -> Cityscapes, MIC on HRDA + T2S-DA."""
    return _hrda_recipe(source="gta5", mic=True)


def syn2cs_hrda() -> Config:
    """SYNTHIA -> Cityscapes, HRDA + T2S-DA; val/mIoU16 and val/mIoU13 are the reported scores."""
    return _hrda_recipe(source="synthia", mic=False)


def syn2cs_mic() -> Config:
    """SYNTHIA -> Cityscapes, MIC on HRDA + T2S-DA."""
    return _hrda_recipe(source="synthia", mic=True)


def gta_dg_daformer() -> Config:
    """Domain generalization from GTA5: no target images. With ``$T2SDA_STYLE_CHECKPOINT``
    (or ``--set method.translate=style method.style_checkpoint=DIR``) the translation
    randomises style, what style randomisation is for; without it FDA takes its style from
    other GTA5 images. No self-training, nothing pulled from target pixels; scored on
    Cityscapes (val/mIoU), BDD100K (val_bdd100k/mIoU) and Mapillary (val_mapillary/mIoU)."""
    return gta2cs_daformer().with_overrides({
        "data.target": "", "data.val": "cityscapes,bdd100k,mapillary",
        "method.self_training": False, "method.pull_target_pixels": False,
    })


PRESETS: dict[str, Callable[[], Config]] = {
    "digits": digits,
    "digits_hard": digits_hard,
    "gta2cs_daformer": gta2cs_daformer,
    "gta2cs_deeplabv2": gta2cs_deeplabv2,
    "syn2cs_daformer": syn2cs_daformer,
    "syn2cs_deeplabv2": syn2cs_deeplabv2,
    "gta_dg_daformer": gta_dg_daformer,
    "gta2cs_hrda": gta2cs_hrda,
    "gta2cs_mic": gta2cs_mic,
    "syn2cs_hrda": syn2cs_hrda,
    "syn2cs_mic": syn2cs_mic,
}


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return PRESETS[name]()


# A search trains many runs of one preset. Where that preset's full run is too long for a
# search on the machine the preset is made for, the search's trials train a shorter one: these
# overrides come before the user's --set (so --set train.iters=... searches at any length).
# digits: six trials of its 600 adaptation steps cost 6 x 600 x 0.35 s of 2-core CPU time in
# steps alone, about 10.5 min however the trials are scheduled; with 300 (trials of 900 steps:
# the same 600-step warm-up, shared, then 300 of adaptation) the default search fits 10 min.
SEARCH_OVERRIDES: dict[str, tuple[str, ...]] = {"digits": ("train.iters=900",)}


def search_preset(name: str) -> Config:
    """The config a search's trials start from: the preset plus its SEARCH_OVERRIDES."""
    return get_preset(name).with_overrides(list(SEARCH_OVERRIDES.get(name, ())))
