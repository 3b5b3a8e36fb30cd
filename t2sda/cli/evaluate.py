"""``python -m t2sda evaluate``: score a trained model on labelled validation data.

Writes ``eval.json`` (mIoU, IoU per class name, confusion, pixel accuracy, checkpoint, data,
inference mode) and ``confusion.png`` under ``--out`` (default ``<run dir>/eval/``), prints a
per-class table, and with ``--save-pred DIR`` writes every prediction (t2sda/predictions.py).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from t2sda import predictions, remote
from t2sda.config import Config, ConfigError
from t2sda.inference import MODELS, load_trained
from t2sda.presets import PRESETS, get_preset

log = logging.getLogger("t2sda")


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the trained model comes from (shared by evaluate, predict and export)."""
    parser.add_argument("--run-dir", help="a training run dir (config.json + checkpoints)")
    parser.add_argument("--which", default="best", help="best (by val mIoU, default), latest or step_N")
    parser.add_argument("--checkpoint", help="a checkpoint dir or state.pt (with --config/--preset)")
    parser.add_argument("--config", help="a config.json (default: the run dir's)")
    parser.add_argument("--preset", help=f"one of: {', '.join(PRESETS)}")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. data.val=cityscapes data.val_roots=/data/cs")
    parser.add_argument("--model", default="student", choices=MODELS)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """Test-time augmentation and prediction files (shared by evaluate and predict)."""
    parser.add_argument("--tta", action="store_true", help="test-time augmentation: average the "
                        "softmax over scales and horizontal flips (mmseg's --aug-test)")
    parser.add_argument("--tta-scales", default=",".join(f"{s:g}" for s in predictions.TTA_SCALES),
                        help="comma-separated TTA scales (default %(default)s)")
    parser.add_argument("--tta-flip", action=argparse.BooleanOptionalAction, default=True,
                        help="add horizontally flipped views to TTA (default on)")
    parser.add_argument("--format", default="trainids", choices=predictions.FORMATS,
                        help="raw prediction PNGs: trainids (<name>_trainIds.png) or cityscapes "
                        "(<name>_labelIds.png, Cityscapes label ids, for the official scripts)")
    parser.add_argument("--opacity", type=float, default=0.5, help="mask opacity in overlays (0..1)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing prediction files")


def tta_from_args(args) -> tuple[tuple[float, ...] | None, bool]:
    if not 0 <= args.opacity <= 1:
        raise ConfigError(f"--opacity {args.opacity}: must be in [0, 1]")
    scales = predictions.parse_scales(args.tta_scales)
    return (scales if args.tta else None), args.tta_flip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_source_arguments(parser)
    parser.add_argument("--out", help="where eval.json goes (default: <run dir>/eval)")
    parser.add_argument("--save-pred", metavar="DIR", help="write each prediction: color/, "
                        "overlay/ and trainIds/ or labelIds/ trees mirroring the images' paths")
    add_inference_arguments(parser)


def load_from_args(args):
    if args.config and args.preset:
        raise ConfigError("--config and --preset: pass one of them")
    cfg = Config.load(args.config) if args.config else get_preset(args.preset) if args.preset else None
    if cfg is None and args.run_dir and args.set:
        local = remote.mirror_run(args.run_dir) if remote.is_uri(args.run_dir) else Path(args.run_dir)
        cfg = Config.load(local / "config.json") if (local / "config.json").is_file() else None
    if cfg is not None and args.set:
        cfg = cfg.with_overrides(args.set)
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ConfigError(f"--device {args.device!r}: not a torch device (cpu, cuda, cuda:0 ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device}: CUDA is not available on this machine")
    return load_trained(run_dir=args.run_dir, which=args.which, checkpoint_path=args.checkpoint,
                        config=cfg, model=args.model, device=device), device


def _out_dir(args) -> Path:
    if args.out:
        out = Path(args.out)
    elif args.run_dir and remote.is_uri(args.run_dir):  # beside the local copy; uploaded after
        out = remote.local_path(args.run_dir) / "eval"
    elif args.run_dir:
        out = Path(args.run_dir) / "eval"
    else:
        raise ConfigError("--out DIR is needed with --checkpoint")
    return writable(out, "--out")


def writable(out: Path, flag: str) -> Path:
    """``out`` created if needed and probed, or a ConfigError naming ``flag``."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-test").touch()
        (out / ".write-test").unlink()
    except OSError as err:
        raise ConfigError(f"{flag} {out}: not writable ({err.strerror})") from None
    return out


def score(confusion: torch.Tensor, class_names: tuple[str, ...], subsets: dict) -> dict:
    """mIoU as the Cityscapes evaluator defines it: classes with no GT and no prediction are
    left out (NaN); the others count, a predicted-but-absent class with IoU 0."""
    from t2sda.scoring import iou_from_confusion

    iou, miou = iou_from_confusion(confusion)
    per_class = zip(class_names, iou.tolist(), strict=True)
    result = {"mIoU": 100 * miou.item(),
              "IoU": {n: (100 * v if v == v else None) for n, v in per_class},  # NaN -> null
              "pixel_accuracy": 100 * (confusion.diag().sum() / confusion.sum().clamp_min(1)).item(),
              "confusion": confusion.tolist()}
    for name, ids in subsets.items():
        result[name] = 100 * iou[list(ids)].nanmean().item()
    return result


def _table(results: dict, class_names: tuple[str, ...]) -> str:
    names = list(results)
    lines = [f"{'class':<16}" + "".join(f"{n:>10}" for n in names)]
    for c in class_names:
        cells = [results[n]["IoU"][c] for n in names]
        lines.append(f"{c:<16}" + "".join(f"{'-':>10}" if v is None else f"{v:>10.2f}" for v in cells))
    for key in ("mIoU", "mIoU16", "mIoU13", "pixel_accuracy"):
        if key in results[names[0]]:
            lines.append(f"{key:<16}" + "".join(f"{results[n][key]:>10.2f}" for n in names))
    return "\n".join(lines)


def val_data(cfg: Config):
    """(val dataset, class names, class subsets): the first of the run's val sets alone."""
    if cfg.data.name == "digits":
        from t2sda.data import digits
        from t2sda.data.loaders import digits_val

        return digits_val(cfg.data), digits.CLASS_NAMES, {}
    from t2sda.data import labels, real

    vals = real.build_val(cfg.data)
    names = labels.CLASS_NAMES[:cfg.data.num_classes or labels.NUM_CLASSES]
    return vals[cfg.data.val.split(",")[0]], names, real.class_subsets(cfg.data)


def _rel_path(dataset, i: int) -> str:
    return dataset.files[i][0] if hasattr(dataset, "files") else f"{i:06d}.png"


def _original_rgb(dataset, i: int, image: torch.Tensor, size: tuple[int, int]):
    """(H, W, 3) uint8 image at the label's size: the file itself where there is one."""
    import numpy as np
    from PIL import Image

    if hasattr(dataset, "files"):
        with Image.open(dataset.root / dataset.files[i][0]) as im:
            pil = im.convert("RGB")
    else:
        pil = Image.fromarray((image.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8))
    if pil.size != (size[1], size[0]):
        pil = pil.resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(pil)


def _prediction_paths(args, dataset, model_names) -> list[dict] | None:
    """Per image, model -> the paths of its files under --save-pred (subfolders per model when
    there are two); checks that nothing there would be overwritten without --overwrite."""
    if not args.save_pred:
        return None
    root = writable(Path(args.save_pred), "--save-pred")
    targets = [{m: predictions.output_paths(root / m if len(model_names) > 1 else root,
                                            _rel_path(dataset, i), args.format)
                for m in model_names} for i in range(len(dataset))]
    if not args.overwrite:
        found = predictions.first_existing(p for t in targets for paths in t.values() for p in paths.values())
        if found is not None:
            raise ConfigError(f"--save-pred: {found} exists (pass --overwrite to replace it)")
    return targets


def confusion_png(conf: torch.Tensor, class_names: tuple[str, ...], path: Path, title: str) -> None:
    """Row-normalised confusion matrix (rows: truth, columns: prediction) with class names."""
    from matplotlib.figure import Figure

    rows = conf.double()
    norm = (rows / rows.sum(1, keepdim=True).clamp_min(1)).numpy()
    k = len(class_names)
    fig = Figure(figsize=(2 + 0.45 * k, 1.5 + 0.45 * k), layout="constrained")
    ax = fig.subplots()
    shown = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), class_names, rotation=90)
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    if k <= 25:
        for r in range(k):
            for c in range(k):
                if norm[r, c] >= 0.005:
                    ax.text(c, r, f"{norm[r, c]:.2f}"[1:] if norm[r, c] < 1 else "1", ha="center",
                            va="center", fontsize=6, color="white" if norm[r, c] > 0.5 else "black")
    fig.colorbar(shown, ax=ax, fraction=0.04, label="fraction of the row")
    ax.set_title(title)
    fig.savefig(path, dpi=100)


def main(args) -> int:
    from t2sda.data.loaders import eval_loader
    from t2sda.scoring import confusion_matrix

    trained, device = load_from_args(args)
    tta, flip = tta_from_args(args)
    out = _out_dir(args)
    cfg = trained.config
    dataset, class_names, subsets = val_data(cfg)
    targets = _prediction_paths(args, dataset, list(trained.models))
    loader = eval_loader(dataset, batch_size=cfg.data.eval_batch_size or cfg.data.batch_size)
    k = len(class_names)
    confs = {name: torch.zeros(k, k, dtype=torch.long) for name in trained.models}
    mode = predictions.mode_name(cfg.data.eval_crop, cfg.data.eval_stride, tta, flip)
    progress, done = predictions.Progress(len(dataset), "evaluate"), 0
    with torch.no_grad():
        for image, label in loader:
            for name, model in trained.models.items():
                pred = predictions.segment(model, image.to(device), num_classes=k, crop=cfg.data.eval_crop,
                                           stride=cfg.data.eval_stride, size=label.shape[-2:], tta=tta,
                                           flip=flip).cpu()
                confs[name] += confusion_matrix(pred, label, k)
                for j in range(len(image)) if targets else ():
                    rgb = _original_rgb(dataset, done + j, image[j], tuple(label.shape[-2:]))
                    predictions.write_prediction(targets[done + j][name], rgb,
                                                 pred[j].numpy().astype("uint8"), num_classes=k,
                                                 fmt=args.format, opacity=args.opacity)
            done += len(image)
            progress.update(len(image))
    progress.close()
    results = {name: score(conf, class_names, subsets) for name, conf in confs.items()}
    report = {"checkpoint": str(trained.checkpoint), "step": trained.step, "mode": mode,
              "data": {"val": cfg.data.name if cfg.data.name == "digits" else cfg.data.val,
                       "roots": cfg.data.val_roots, "split": cfg.data.val_split, "images": len(dataset)}}
    if len(results) == 1:
        report.update(next(iter(results.values())))
    else:
        report.update(results)
    (out / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
    for name, conf in confs.items():
        png = out / ("confusion.png" if len(confs) == 1 else f"confusion_{name}.png")
        confusion_png(conf, class_names, png, f"{name} step {trained.step}: mIoU {results[name]['mIoU']:.2f}")
    print(_table(results, class_names))
    log.info("wrote %s%s", out / "eval.json", f" and predictions under {args.save_pred}" if targets else "")
    if args.run_dir and remote.is_uri(args.run_dir) and not args.out:
        remote.upload(out, f"{args.run_dir.rstrip('/')}/eval")
        log.info("and %s/eval/eval.json", args.run_dir.rstrip("/"))
    return 0
