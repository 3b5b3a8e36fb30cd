"""Write DigitScenes to disk in real dataset folder layouts (GTA5, Cityscapes).

This lets the real-dataset loaders be exercised end to end without the real datasets. Labels are
written as *Cityscapes label ids* (what GTA5 and Cityscapes ship), chosen so that the standard
label-id -> train-id mapping of those loaders gives back our train ids unchanged:

    our train id            Cityscapes label id (its Cityscapes train id / name)
    0  background       ->   7  (0 road)
    1  digit "0"        ->   8  (1 sidewalk)
    2  digit "1"        ->  11  (2 building)
    3  digit "2"        ->  12  (3 wall)
    4  digit "3"        ->  13  (4 fence)
    5  digit "4"        ->  17  (5 pole)
    6  digit "5"        ->  19  (6 traffic light)
    7  digit "6"        ->  20  (7 traffic sign)
    8  digit "7"        ->  21  (8 vegetation)
    9  digit "8"        ->  22  (9 terrain)
    10 digit "9"        ->  23  (10 sky)
    255 ignore          ->   0  (unlabeled, maps to ignore)

Layouts (i is the scene index):

* ``gta5``: ``images/{i:05d}.png`` (RGB) and ``labels/{i:05d}.png`` (8-bit label ids);
* ``cityscapes``: ``leftImg8bit/<s>/digits/digits_000000_{i:06d}_leftImg8bit.png`` and
  ``gtFine/<s>/digits/digits_000000_{i:06d}_gtFine_labelIds.png``, where ``<s>`` is ``train``
  for our train split and ``val`` for our test split (Cityscapes' test labels are withheld).

CLI: ``python -m t2sda.data.write_layouts --layout gta5 --domain source --split train
--num-images 100 --out DIR``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from t2sda.data.digits import DOMAINS, IGNORE_INDEX, SPLITS, DigitScenes

TRAIN_ID_TO_LABEL_ID: dict[int, int] = {
    0: 7, 1: 8, 2: 11, 3: 12, 4: 13, 5: 17, 6: 19, 7: 20, 8: 21, 9: 22, 10: 23, IGNORE_INDEX: 0,
}
LAYOUTS = ("gta5", "cityscapes")

_LUT = np.zeros(256, np.uint8)  # train id -> label id, for the whole label map at once
for _train_id, _label_id in TRAIN_ID_TO_LABEL_ID.items():
    _LUT[_train_id] = _label_id


def _paths(out_dir: Path, layout: str, split: str, i: int) -> tuple[Path, Path]:
    """(image path, label path) of scene i."""
    if layout == "gta5":
        return out_dir / "images" / f"{i:05d}.png", out_dir / "labels" / f"{i:05d}.png"
    folder = "train" if split == "train" else "val"
    stem = f"digits_000000_{i:06d}"
    return (out_dir / "leftImg8bit" / folder / "digits" / f"{stem}_leftImg8bit.png",
            out_dir / "gtFine" / folder / "digits" / f"{stem}_gtFine_labelIds.png")


def write_layout(out_dir: str | Path, *, layout: str, domain: str, split: str, num_images: int,
                 strength: float = 0.5, seed: int = 0, image_size: int = 64) -> list[Path]:
    """Write scenes 0..num_images-1 of DigitScenes(domain, split, ...); returns the image paths.

    Existing files with the same names are overwritten; other files are left alone.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images!r}")
    out_dir = Path(out_dir)
    # cache=False: scenes are streamed to disk, no need to hold them all
    ds = DigitScenes(domain=domain, split=split, length=num_images, strength=strength,
                     seed=seed, image_size=image_size, cache=False)
    written = []
    for i in range(num_images):
        image, label = ds[i]
        image_path, label_path = _paths(out_dir, layout, split, i)
        image_path.parent.mkdir(parents=True, exist_ok=True)
        label_path.parent.mkdir(parents=True, exist_ok=True)
        # the dataset stores uint8 and divides by 255, so this rounding is exact
        rgb = (image.numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8)  # (H, W, 3)
        Image.fromarray(rgb).save(image_path)
        Image.fromarray(_LUT[label.numpy()]).save(label_path)  # (H, W) uint8 -> 8-bit "L" PNG
        written.append(image_path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m t2sda.data.write_layouts",
        description="Write DigitScenes as PNGs in a GTA5 or Cityscapes folder layout.")
    parser.add_argument("--layout", required=True, choices=LAYOUTS)
    parser.add_argument("--domain", required=True, choices=DOMAINS)
    parser.add_argument("--split", required=True, choices=SPLITS)
    parser.add_argument("--num-images", required=True, type=int)
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--strength", type=float, default=0.5, help="target style, 0..1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--overwrite", action="store_true",
                        help="allow writing into a non-empty output directory")
    args = parser.parse_args(argv)

    def fail(msg: str) -> int:
        print(f"{parser.prog}: error: {msg}", file=sys.stderr)
        return 2

    if args.out.exists() and not args.out.is_dir():
        return fail(f"--out {args.out} exists and is not a directory")
    if args.out.is_dir() and any(args.out.iterdir()) and not args.overwrite:
        return fail(f"--out {args.out} is not empty (pass --overwrite to write into it)")
    try:
        paths = write_layout(args.out, layout=args.layout, domain=args.domain,
                             split=args.split, num_images=args.num_images,
                             strength=args.strength, seed=args.seed, image_size=args.image_size)
    except ValueError as e:
        return fail(str(e))
    print(f"wrote {len(paths)} {args.layout} scenes to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
