"""Inference modes compared on a run's validation set: mIoU and images/s of plain inference
and test-time augmentation (flip only; mmseg's 6 scales, without and with flips).

    python scripts/bench_inference.py --run-dir RUN [--images 200] [--device cpu] [--name digits]

Prints a table and writes results/inference/<name>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from t2sda.cli.evaluate import score, val_data
from t2sda.data.loaders import eval_loader
from t2sda.inference import load_trained
from t2sda.predictions import TTA_SCALES, mode_name, segment
from t2sda.scoring import confusion_matrix

# name -> (TTA scales or None for plain inference, flips)
MODES = {"plain": (None, False), "tta flip": ((1.0,), True), "tta 6 scales": (TTA_SCALES, False),
         "tta 6 scales + flip": (TTA_SCALES, True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--images", type=int, default=200, help="first N val images (0 = all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="digits")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    trained = load_trained(run_dir=args.run_dir, device=args.device)
    model, cfg = trained.models["student"], trained.config
    dataset, names, subsets = val_data(cfg)
    if args.images:
        dataset = torch.utils.data.Subset(dataset, range(min(args.images, len(dataset))))
    k = len(names)
    for _ in eval_loader(dataset, batch_size=64):  # read (and cache) every image before timing
        pass
    rows = []
    for label_, (tta, flip) in MODES.items():
        conf = torch.zeros(k, k, dtype=torch.long)
        loader = eval_loader(dataset, batch_size=cfg.data.eval_batch_size or cfg.data.batch_size)
        start = time.perf_counter()
        with torch.no_grad():
            for image, label in loader:
                pred = segment(model, image.to(args.device), num_classes=k, crop=cfg.data.eval_crop,
                               stride=cfg.data.eval_stride, size=label.shape[-2:], tta=tta,
                               flip=flip).cpu()
                conf += confusion_matrix(pred, label, k)
        seconds = time.perf_counter() - start
        result = score(conf, names, subsets)
        inference = mode_name(cfg.data.eval_crop, cfg.data.eval_stride, tta, flip)
        rows.append({"mode": label_, "inference": inference,
                     "mIoU": result["mIoU"], "images_per_s": len(dataset) / seconds})
    print(f"{'mode':<22}{'mIoU':>8}{'images/s':>10}")
    for r in rows:
        print(f"{r['mode']:<22}{r['mIoU']:>8.2f}{r['images_per_s']:>10.1f}")
    out = Path("results/inference") / f"{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"run_dir": str(args.run_dir), "checkpoint": str(trained.checkpoint), "step": trained.step,
              "images": len(dataset), "device": args.device, "threads": args.threads, "rows": rows}
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
