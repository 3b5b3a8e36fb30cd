"""``python -m t2sda evaluate``: score a trained model on labelled validation data.

Writes ``eval.json`` (mIoU, IoU per class name, confusion, pixel accuracy, checkpoint, data,
inference mode) under ``--out`` (default ``<run dir>/eval/``) and prints a per-class table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_source_arguments(parser)
    parser.add_argument("--out", help="where eval.json goes (default: <run dir>/eval)")


def load_from_args(args):
    if args.config and args.preset:
        raise ConfigError("--config and --preset: pass one of them")
    cfg = Config.load(args.config) if args.config else get_preset(args.preset) if args.preset else None
    if cfg is None and args.run_dir and args.set:
        cfg = Config.load(Path(args.run_dir) / "config.json") if (Path(args.run_dir) / "config.json"
                                                                 ).is_file() else None
    if cfg is not None and args.set:
        cfg = cfg.with_overrides(args.set)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return load_trained(run_dir=args.run_dir, which=args.which, checkpoint_path=args.checkpoint,
                        config=cfg, model=args.model, device=device), device


def _out_dir(args) -> Path:
    if args.out:
        out = Path(args.out)
    elif args.run_dir:
        out = Path(args.run_dir) / "eval"
    else:
        raise ConfigError("--out DIR is needed with --checkpoint")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-test").touch()
        (out / ".write-test").unlink()
    except OSError as err:
        raise ConfigError(f"--out {out}: not writable ({err.strerror})") from None
    return out


def score(confusion: torch.Tensor, class_names: tuple[str, ...], subsets: dict) -> dict:
    """mIoU as the Cityscapes evaluator defines it: classes with no GT and no prediction are
    left out (NaN); the others count, a predicted-but-absent class with IoU 0."""
    from t2sda.evaluate import iou_from_confusion

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


def main(args) -> int:
    from t2sda.data.loaders import build_datasets, eval_loader
    from t2sda.evaluate import confusion_matrix, predict

    trained, device = load_from_args(args)
    out = _out_dir(args)
    cfg = trained.config
    data = build_datasets(cfg.data, seed=cfg.seed)
    loader = eval_loader(data.val, batch_size=cfg.data.eval_batch_size or cfg.data.batch_size)
    k = data.num_classes
    confs = {name: torch.zeros(k, k, dtype=torch.long) for name in trained.models}
    mode = f"sliding {cfg.data.eval_crop}/{cfg.data.eval_stride}" if cfg.data.eval_crop else "whole"
    start, done, total = time.perf_counter(), 0, len(loader.dataset)
    with torch.no_grad():
        for image, label in loader:
            image = image.to(device)
            for name, model in trained.models.items():
                pred = predict(model, image, num_classes=k, crop=cfg.data.eval_crop,
                               stride=cfg.data.eval_stride, size=label.shape[-2:]).cpu()
                confs[name] += confusion_matrix(pred, label, k)
            done += len(image)
            rate = done / max(time.perf_counter() - start, 1e-9)
            print(f"\revaluate {done}/{total} images  {rate:.1f} images/s  ETA {(total - done) / rate:.0f} s",
                  end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    results = {name: score(conf, data.class_names, data.class_subsets) for name, conf in confs.items()}
    report = {"checkpoint": str(trained.checkpoint), "step": trained.step, "mode": mode,
              "data": {"val": cfg.data.name if cfg.data.name == "digits" else cfg.data.val,
                       "roots": cfg.data.val_roots, "split": cfg.data.val_split, "images": total}}
    if len(results) == 1:
        report.update(next(iter(results.values())))
    else:
        report.update(results)
    (out / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
    print(_table(results, data.class_names))
    log.info("wrote %s", out / "eval.json")
    return 0
