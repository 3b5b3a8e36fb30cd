"""``python -m t2sda data check``: validate one dataset split and print what it holds.

Every image and label is decoded in full (no cache): the report lists each problem with its
path (missing root, wrong layout, unpaired files, unreadable or corrupt files, image/label
size mismatches, label ids outside the dataset's table) and a pixel histogram over the 19
train ids. Exit status 0 when the split is clean, 1 when it has problems.
"""

from __future__ import annotations

import json
from pathlib import Path

from t2sda.data import folders, labels, scan


def check(name: str, root: str | Path, split: str = "train", *, workers: int = 0) -> dict:
    """The report: {"dataset", "num_images", "class_pixels", "ignored_pixels", "problems"}.

    ``class_pixels`` maps each train id's official name to its pixel count; every pixel whose
    id maps to ignore (or lies outside the table) counts in ``ignored_pixels``.
    """
    files, problems = folders.list_files(name, root, split)
    records = scan.scan(name, root, files, full=True, workers=workers) if files else []
    table = folders.table(name)
    problems += scan.problems(records, files, root, table)
    pixels = scan.class_pixels(records, table, labels.NUM_CLASSES).sum(axis=0)
    return {
        "dataset": name,
        "num_images": len(files),
        "class_pixels": {c: int(n) for c, n in zip(labels.CLASS_NAMES, pixels[:-1].tolist())},
        "ignored_pixels": int(pixels[-1]),
        "problems": sorted(problems),
    }


def format_report(report: dict, *, root: str | Path, split: str) -> str:
    total = sum(report["class_pixels"].values()) + report["ignored_pixels"]
    lines = [f"{report['dataset']} at {root}, split {split}: {report['num_images']} images",
             "train id  class            pixels        share"]
    rows = [*enumerate(report["class_pixels"].items()), ("-", ("(ignored)", report["ignored_pixels"]))]
    for train_id, (name, pixels) in rows:
        share = 100 * pixels / total if total else 0.0
        lines.append(f"{train_id!s:>8}  {name:<15} {pixels:>14,}  {share:6.2f} %")
    problems = report["problems"]
    lines.append(f"{len(problems)} problem(s)" + (":" if problems else ""))
    lines += [f"  {p}" for p in problems]
    return "\n".join(lines)


def main(args) -> int:
    """Run from the CLI's parsed ``data check`` arguments: dataset, root, split, json."""
    report = check(args.dataset, args.root, args.split)
    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(report, root=args.root, split=args.split))
    return 1 if report["problems"] else 0


def add_arguments(parser) -> None:
    parser.add_argument("--dataset", required=True, choices=tuple(folders.LAYOUTS))
    parser.add_argument("--root", required=True, help="the dataset's root folder")
    parser.add_argument("--split", default="train", help="e.g. train, val (default: train)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
