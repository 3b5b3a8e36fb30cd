"""Data-loading benchmark: images/s of the real training pipeline against the model's step rate.

Writes full-size PNGs (GTA5 1914x1052, Cityscapes 2048x1024, smooth enough to compress like
photos) into a temporary GTA5 and Cityscapes tree, builds the datasets of a preset through
the real loaders (file scan, rare-class sampling, resize, 512² crops, flips), and times the
source and target batch streams for each number of loader workers. Then it times
``train_step`` of the preset's model on batches of the same shape on this machine (or takes
--steps-per-s), and reports how many images/s a step consumes: the loader must exceed it.

    .venv/bin/python scripts/bench_data.py --workers 0 2 --out results/bench_data
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from t2sda.data.loaders import batch_stream, build_datasets
from t2sda.presets import PRESETS, get_preset

SIZES = {"gta5": (1914, 1052), "cityscapes": (2048, 1024)}


def _photo_like(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """(h, w, 3) uint8: bilinear-upsampled coarse noise plus fine grain."""
    coarse = Image.fromarray(rng.integers(0, 256, (h // 32, w // 32, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((w, h), Image.BILINEAR), np.int16)
    return np.clip(smooth + rng.integers(-6, 7, smooth.shape), 0, 255).astype(np.uint8)


def _labels(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """(h, w) uint8 Cityscapes label ids in blocks, a few blocks of each of the 19 classes."""
    ids = np.array([7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33, 0])
    blocks = rng.choice(ids, (h // 64 + 1, w // 64 + 1))
    return np.kron(blocks, np.ones((64, 64), np.int64))[:h, :w].astype(np.uint8)


def write_trees(root: Path, num_images: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(num_images):
        w, h = SIZES["gta5"]
        for rel, arr in ((f"gta5/images/{i:05d}.png", _photo_like(rng, w, h)),
                         (f"gta5/labels/{i:05d}.png", _labels(rng, w, h))):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(root / rel)
        w, h = SIZES["cityscapes"]
        for split in ("train", "val"):
            stem = f"cityscapes/%s/{split}/bench/bench_000000_{i:06d}_%s.png"
            for rel, arr in ((stem % ("leftImg8bit", "leftImg8bit"), _photo_like(rng, w, h)),
                             (stem % ("gtFine", "gtFine_labelIds"), _labels(rng, w, h))):
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(root / rel)


def time_stream(dataset, *, batch_size: int, workers: int, batches: int) -> float:
    """Images/s of one endless batch stream after its first batch (worker start-up) is out."""
    stream = batch_stream(dataset, batch_size=batch_size, seed=0, num_workers=workers)
    next(stream)
    tic = time.perf_counter()
    for _ in range(batches):
        next(stream)
    return batches * batch_size / (time.perf_counter() - tic)


def time_step(cfg, *, steps: int) -> float:
    """Seconds per ``train_step`` of cfg's model on random crops (CPU here), after one warm-up."""
    from t2sda.state import build_state
    from t2sda.step import train_step

    # random init: no ImageNet backbone to measure the feature distance against
    cfg = cfg.with_overrides({"model.pretrained": "", "method.fd_weight": 0,
                              "method.self_training_start": 0})
    state = build_state(cfg, num_classes=19, device=torch.device("cpu"), wrap=None)
    b, s = cfg.data.batch_size, cfg.data.crop_size
    src, tgt = torch.rand(b, 3, s, s), torch.rand(b, 3, s, s)
    label = torch.randint(0, 19, (b, s, s))
    times = []
    for _ in range(steps + 1):
        tic = time.perf_counter()
        train_step(state, src, label, tgt, cfg)
        times.append(time.perf_counter() - tic)
    return float(np.mean(times[1:]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="gta2cs_daformer", choices=[p for p in PRESETS if "2" in p])
    parser.add_argument("--images", type=int, default=12, help="generated images per dataset")
    parser.add_argument("--batches", type=int, default=10, help="timed batches per stream")
    parser.add_argument("--workers", type=int, nargs="+", default=None,
                        help="loader worker counts to time (default: the preset's data.num_workers)")
    parser.add_argument("--step-model", default=None, help="model whose step is timed "
                        "(default: the preset's); 'none' to skip and use --steps-per-s")
    parser.add_argument("--step-iters", type=int, default=2)
    parser.add_argument("--steps-per-s", type=float, default=0.0,
                        help="a step rate to compare against (e.g. measured on the GPU)")
    parser.add_argument("--out", type=Path, default=Path("results/bench_data"))
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, (os.cpu_count() or 1)))

    cfg = get_preset(args.preset).with_overrides(args.set)
    workers = args.workers if args.workers is not None else [cfg.data.num_workers]
    b = cfg.data.batch_size
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tic = time.perf_counter()
        write_trees(root, args.images)
        print(f"wrote {args.images} GTA5 + {2 * args.images} Cityscapes PNGs in "
              f"{time.perf_counter() - tic:.1f} s", flush=True)
        cfg = cfg.with_overrides({"data.source_root": str(root / "gta5"),
                                  "data.target_root": str(root / "cityscapes"),
                                  "data.cache_dir": str(root / "cache"),
                                  "data.rcs_min_pixels": 64 * 64})  # blocks are 64x64
        tic = time.perf_counter()
        data = build_datasets(cfg.data, seed=0)
        scan_s = time.perf_counter() - tic
        print(f"datasets built (first scan, {3 * args.images} files) in {scan_s:.1f} s", flush=True)
        for w in workers:
            for stream, dataset in (("source (gta5 1914x1052)", data.source),
                                    ("target (cityscapes 2048x1024)", data.target)):
                rate = time_stream(dataset, batch_size=b, workers=w, batches=args.batches)
                rows.append({"stream": stream, "workers": w, "images_per_s": rate})
                print(f"  {stream:<30} workers {w}: {rate:6.2f} images/s", flush=True)
    model = args.step_model or cfg.model.name
    step_s = None
    if model != "none":
        step_s = time_step(cfg.with_overrides({"model.name": model}), steps=args.step_iters)
    steps_per_s = args.steps_per_s or (1 / step_s if step_s else 0.0)
    need = 2 * b * steps_per_s  # a step eats one source and one target batch
    result = {
        "preset": args.preset, "batch_size": b, "crop_size": cfg.data.crop_size,
        "images_per_dataset": args.images, "scan_s": scan_s, "streams": rows,
        "step_model": model, "step_s_cpu": step_s, "steps_per_s": steps_per_s,
        "images_per_s_needed": need, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "command": "python " + " ".join(sys.argv),
    }
    print("\n| stream | workers | images/s |\n|---|---|---|")
    for row in rows:
        print(f"| {row['stream']} | {row['workers']} | {row['images_per_s']:.2f} |")
    if step_s:
        print(f"\n{model} train_step on this CPU: {step_s:.2f} s/step")
    print(f"a step at {steps_per_s:.3f} steps/s consumes {need:.2f} images/s "
          "(source + target, all streams share the machine)")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.preset}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out / (args.preset + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
