"""``python -m t2sda export``: write a trained model as ONNX or TorchScript, checked against eager.

Besides the model file, ``<out>.json`` tells a deployer what goes in and what comes out (input
dtype and shape, class names, palette, which checkpoint). See docs/export.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

import torch

from t2sda import model_export
from t2sda.cli.evaluate import add_source_arguments, load_from_args
from t2sda.config import ConfigError
from t2sda.model_export import ExportError, VerifyError
from t2sda.models import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger("t2sda")
_SIZE = re.compile(r"^(\d+)x(\d+)$")
MIN_SIZE = 32  # the coarsest backbone stage (stride 32) needs at least one pixel


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_source_arguments(parser)
    parser.add_argument("--out", required=True, help="the file to write (and <out>.json beside it)")
    parser.add_argument("--format", default="onnx", choices=model_export.FORMATS)
    parser.add_argument("--size", metavar="HxW", help="input height x width (default: the config's "
                        "validation size, e.g. 512x1024; digits: data.image_size)")
    parser.add_argument("--dynamic", action="store_true",
                        help="batch, height and width free in the file (checked at a second size)")
    parser.add_argument("--output", default="logits", choices=model_export.OUTPUTS,
                        help="logits (N, C, H, W) float32, or labels (N, H, W) int64")
    parser.add_argument("--input", default="uint8", choices=model_export.INPUTS,
                        help="uint8 RGB 0..255 (default) or float32 RGB in [0, 1]")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def parse_size(text: str) -> tuple[int, int]:
    match = _SIZE.match(text.strip())
    if not match:
        raise ExportError(f"--size {text!r}: expected HxW, e.g. 512x1024")
    size = int(match.group(1)), int(match.group(2))
    if min(size) < MIN_SIZE:
        raise ExportError(f"--size {text}: height and width must be >= {MIN_SIZE}")
    return size


def default_size(cfg) -> tuple[int, int]:
    """(H, W) the model is validated at: digits' square scenes, else data.val_size / crop_size."""
    if cfg.data.name == "digits":
        return cfg.data.image_size, cfg.data.image_size
    val = cfg.data.size("val")  # (W, H)
    if val is not None:
        return val[1], val[0]
    crop = cfg.data.crop_size or 512
    return crop, crop


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse before any slow work: an existing file without --overwrite, an unwritable folder."""
    sidecar = Path(f"{out}.json")
    if out.is_dir():
        raise ExportError(f"--out {out}: is a directory; name the file to write")
    for path in (out, sidecar):
        if path.exists() and not overwrite:
            raise ExportError(f"--out {out}: {path} exists (pass --overwrite to replace it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.parent / f".{out.name}.write-test"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise ExportError(f"--out {out}: not writable ({err.strerror})") from None


def sidecar(args, trained, module_name: str, size: tuple[int, int], checks: list[dict]) -> dict:
    from t2sda.tb import palette

    names = list(trained.class_names)
    batch, height, width = ("N", "H", "W") if args.dynamic else (1, *size)
    out_name = "labels" if args.output == "labels" else "logits"
    out_shape = [batch, height, width] if args.output == "labels" else [batch, len(names), height, width]
    return {
        "format": args.format,
        "model": trained.config.model.name,
        "network": module_name,
        "checkpoint": str(trained.checkpoint),
        "step": trained.step,
        "class_names": names,
        "palette": palette(len(names))[:len(names)].tolist(),  # RGB per class id
        "input": {"name": "image", "dtype": "uint8" if args.input == "uint8" else "float32",
                  "shape": [batch, 3, height, width], "layout": "NCHW, RGB",
                  "range": [0, 255] if args.input == "uint8" else [0.0, 1.0],
                  "normalisation": {"inside": True, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                                    "of": "pixel / 255" if args.input == "uint8" else "pixel"}},
        "output": {"name": out_name, "dtype": "int64" if args.output == "labels" else "float32",
                   "shape": out_shape, "meaning": "class id per pixel (argmax)" if out_name == "labels"
                   else "class scores before softmax, bilinearly upsampled to the input size"},
        "dynamic": args.dynamic,
        "export_size": list(size),
        "exporter": f"torch {torch.__version__} " + ("torch.onnx.export(dynamo=True)"
                                                      if args.format == "onnx" else "torch.jit.trace"),
        "verification": checks,
    }


def main(args) -> int:
    try:
        return _run(args)
    except VerifyError as err:
        print(f"t2sda: error: {err}", file=sys.stderr)
        return 1
    except ExportError as err:
        print(f"t2sda: error: {err}", file=sys.stderr)
        return 2


def _run(args) -> int:
    if args.model == "both":
        raise ExportError("--model both: export one network at a time (student or teacher)")
    if args.device not in (None, "cpu"):
        raise ExportError(f"--device {args.device}: export traces on the CPU; drop --device")
    args.device = "cpu"
    size = parse_size(args.size) if args.size else None
    out = Path(args.out)
    check_out(out, args.overwrite)
    model_export.check_packages(args.format)

    trained, _ = load_from_args(args)
    size = size or default_size(trained.config)
    if min(size) < MIN_SIZE:
        raise ConfigError(f"the config's size {size[0]}x{size[1]} is below {MIN_SIZE}; pass --size HxW")
    module = model_export.Deployable(trained.models[args.model], input=args.input, output=args.output)
    log.info("exporting %s %s (step %d of %s) to %s at %dx%d%s; large models take minutes on CPU",
             trained.config.model.name, args.model, trained.step, trained.checkpoint, args.format,
             *size, ", dynamic batch/height/width" if args.dynamic else "")
    # Written under temporary names and renamed only once verified, so a failure (or ^C) leaves
    # any earlier --out intact and no half-written file behind.
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp_json = out.with_name(f".{out.name}.json.tmp-{os.getpid()}")
    try:
        start = time.perf_counter()
        model_export.export(module, tmp, fmt=args.format, size=size, dynamic=args.dynamic)
        log.info("exported in %.1f s; verifying against eager PyTorch", time.perf_counter() - start)
        checks = model_export.verify(module, tmp, fmt=args.format, size=size, dynamic=args.dynamic)
        for check in checks:
            diff = "n/a (labels)" if check["max_abs_diff"] is None else f"{check['max_abs_diff']:.3g}"
            log.info("  input %-18s max abs logit diff %s  argmax agreement %.4f %%",
                     "x".join(map(str, check["input"])), diff, 100 * check["agreement"])
        info = sidecar(args, trained, args.model, size, checks)
        tmp_json.write_text(json.dumps(info, indent=1) + "\n")
        tmp.replace(out)
        tmp_json.replace(f"{out}.json")
    finally:
        tmp.unlink(missing_ok=True)
        tmp_json.unlink(missing_ok=True)
    log.info("wrote %s (%.1f MB) and %s.json", out, out.stat().st_size / 2**20, out)
    return 0
