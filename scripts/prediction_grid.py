"""One picture of predictions: rows of image | colour mask | overlay, from a `predict --out` dir.

    python scripts/prediction_grid.py IMAGES_DIR PRED_DIR --out results/predict/grid.png [--rows 6]

IMAGES_DIR is the folder given to ``python -m t2sda predict``; PRED_DIR its ``--out``. Images are
upscaled (nearest) to ``--cell`` pixels so small inputs stay visible.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

from t2sda.predictions import IMAGE_SUFFIXES, output_paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", type=Path)
    parser.add_argument("pred", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=6)
    parser.add_argument("--cell", type=int, default=128, help="cell height in pixels")
    args = parser.parse_args(argv)
    files = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:args.rows]
    if not files:
        print(f"prediction_grid: error: {args.images}: no images", file=sys.stderr)
        return 2
    rows = []
    for file in files:
        paths = output_paths(args.pred, file.relative_to(args.images).as_posix(), "trainids")
        if not paths["color"].is_file():
            print(f"prediction_grid: error: {paths['color']}: missing (run predict first)", file=sys.stderr)
            return 2
        cells = [Image.open(p).convert("RGB") for p in (file, paths["color"], paths["overlay"])]
        w, h = cells[0].size
        size = (round(w * args.cell / h), args.cell)
        rows.append([c.resize(size, Image.NEAREST) for c in cells])
    gap = 4
    width = max(sum(c.size[0] for c in r) + gap * 2 for r in rows)
    grid = Image.new("RGB", (width, len(rows) * (args.cell + gap) - gap), "white")
    for i, row in enumerate(rows):
        x = 0
        for cell in row:
            grid.paste(cell, (x, i * (args.cell + gap)))
            x += cell.size[0] + gap
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    print(f"wrote {args.out} ({len(rows)} rows: image | prediction | overlay)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
