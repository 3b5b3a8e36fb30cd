"""``python -m t2sda predict``: segment your own images with a trained model.

INPUTs are images, folders (searched recursively for png/jpg/jpeg/bmp/webp) or globs. Under
``--out``, each image gets a colour mask, an overlay and a raw class-id PNG (the trees
``color/``, ``overlay/``, ``trainIds/`` or ``labelIds/`` mirror the input's relative paths).
An unreadable image is a warning and is skipped (exit 1 at the end); nothing in ``--out`` is
replaced without ``--overwrite``.
"""

from __future__ import annotations

import argparse
import glob
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from t2sda import predictions
from t2sda.cli.evaluate import (
    add_inference_arguments,
    add_source_arguments,
    load_from_args,
    tta_from_args,
    writable,
)
from t2sda.config import Config, ConfigError

log = logging.getLogger("t2sda")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_source_arguments(parser)
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="image files, folders (recursive) or globs (quote them)")
    parser.add_argument("--out", required=True, help="where the prediction files go")
    parser.add_argument("--size", help="WxH to resize images to before inference (masks are "
                        "written at the input's size); 'native' runs at the input's size; default: "
                        "the run's data.val_size (aspect kept) for real data, native for digits")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    parser.add_argument("--legend", action="store_true", help="also write legend.png (palette + names)")
    add_inference_arguments(parser)


def gather(inputs: list[str]) -> list[tuple[Path, str]]:
    """(file, relative output path) of every input: a folder's images relative to it, a glob's
    matches relative to its fixed leading folder, a file by its name."""
    found: list[tuple[Path, str]] = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            images = _images_in(path)
            if not images:
                raise ConfigError(f"{text}: no images ({', '.join(predictions.IMAGE_SUFFIXES)}) in "
                                  "this folder")
            found += [(p, p.relative_to(path).as_posix()) for p in images]
        elif path.is_file():
            found.append((path, path.name))
        elif glob.has_magic(text):
            prefix = _fixed_prefix(path.parts)
            base = Path(*prefix) if prefix else Path(".")
            matches = [Path(m) for m in sorted(glob.glob(text, recursive=True))]
            files = [m for m in matches if m.is_file()] + [i for m in matches if m.is_dir()
                                                             for i in _images_in(m)]
            if not files:
                raise ConfigError(f"{text}: the pattern matches no file")
            found += [(f, f.relative_to(base).as_posix()) for f in files]
        else:
            raise ConfigError(f"{text}: no such file or folder")
    seen: dict[str, Path] = {}
    for file, rel in found:
        if rel in seen and seen[rel] != file:
            raise ConfigError(f"{seen[rel]} and {file}: both would be written as {rel}; predict "
                              "them in separate runs or with separate --out")
        seen[rel] = file
    return list(dict((rel, (file, rel)) for file, rel in found).values())


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in predictions.IMAGE_SUFFIXES
                  and p.is_file())


def _fixed_prefix(parts: tuple[str, ...]) -> list[str]:
    prefix = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        prefix.append(part)
    return prefix


def resize_rule(size: str | None, cfg: Config):
    """A function (w, h) -> the (w, h) to run the model at."""
    from t2sda.data.transforms import fit_size

    if size == "native" or (size is None and cfg.data.name == "digits"):
        return lambda wh: wh
    if size is None:
        scale = cfg.data.size("val")
        return lambda wh: fit_size(wh, scale)
    w, sep, h = size.partition("x")
    if not (sep and w.isdigit() and h.isdigit() and int(w) > 0 and int(h) > 0):
        raise ConfigError(f"--size {size!r}: expected WxH, e.g. 1024x512, or native")
    return lambda wh: (int(w), int(h))


def _read(path: Path) -> np.ndarray | None:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"t2sda: warning: {path}: not a readable image ({reason}); skipped", file=sys.stderr)
        return None


def main(args) -> int:
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: must be >= 1")
    files = gather(args.inputs)
    trained, device = load_from_args(args)
    tta, flip = tta_from_args(args)
    rule = resize_rule(args.size, trained.config)
    out = writable(Path(args.out), "--out")
    names = list(trained.models)
    targets = {rel: {m: predictions.output_paths(out / m if len(names) > 1 else out, rel, args.format)
                     for m in names} for _, rel in files}
    if not args.overwrite:
        every = [p for t in targets.values() for paths in t.values() for p in paths.values()]
        found = predictions.first_existing(every + ([out / "legend.png"] if args.legend else []))
        if found is not None:
            raise ConfigError(f"--out: {found} exists (pass --overwrite to replace it)")
    cfg, k = trained.config, len(trained.class_names)
    progress, skipped, batch = predictions.Progress(len(files), "predict"), 0, []

    def flush():
        image = torch.stack([x for _, _, x in batch]).to(device)
        size = batch[0][1].shape[:2]
        for name, model in trained.models.items():
            pred = predictions.segment(model, image, num_classes=k, crop=cfg.data.eval_crop,
                                       stride=cfg.data.eval_stride, size=size, tta=tta, flip=flip)
            for (rel, rgb, _), p in zip(batch, pred.cpu().numpy().astype(np.uint8)):
                predictions.write_prediction(targets[rel][name], rgb, p, num_classes=k, fmt=args.format,
                                             opacity=args.opacity)
        progress.update(len(batch))
        batch.clear()

    with torch.no_grad():
        for path, rel in files:
            rgb = _read(path)
            if rgb is None:
                skipped += 1
                progress.update(1)
                continue
            h, w = rgb.shape[:2]
            run = rule((w, h))
            small = rgb if run == (w, h) else np.asarray(Image.fromarray(rgb).resize(run, Image.BILINEAR))
            tensor = torch.from_numpy(small.copy()).permute(2, 0, 1).float().div_(255)
            if batch and (batch[0][1].shape != rgb.shape or batch[0][2].shape != tensor.shape):
                flush()
            batch.append((rel, rgb, tensor))
            if len(batch) == args.batch_size:
                flush()
        if batch:
            flush()
    progress.close()
    if args.legend:
        predictions.legend(trained.class_names, out / "legend.png")
    done = len(files) - skipped
    if skipped:
        print(f"predicted {done} images, skipped {skipped}: see above", file=sys.stderr)
        return 1
    log.info("predicted %d images into %s", done, out)
    return 0
