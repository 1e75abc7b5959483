"""``mmlit data convert folder``: an image folder with one class per subfolder (the ImageNet / torchvision
``ImageFolder`` layout) -> shards.

Each image becomes a sample: the image as found (``.jpg``, ``.png``, ...), ``.cls`` (the class index) and ``.json``
(``{"class": name, "path": path below --images}``). Classes are the subfolders' names in sorted order, written to
``classes.json`` beside the shards (what ``image_classification``'s ``classes`` and zero-shot evaluation read).
``--val-fraction`` holds out that share of every class, chosen by a generator seeded with (``--seed``, class).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from mmlit.data.converters.writer import Planned, check_output, numbered, write_split

HELP = "an image folder, one class per subfolder (ImageNet layout)"
__all__ = ["HELP", "add_arguments", "plan_folder", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, help="the root folder; each subfolder is a class")
    parser.add_argument("--val-fraction", type=float, default=0.0, help="share of each class written as the val split")
    parser.add_argument("--seed", type=int, default=0, help="seed of the val split")


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in
                                                                          p.relative_to(folder).parts))


def plan_folder(images: Path, val_fraction: float, seed: int) -> tuple[list[str], dict[str, list[Planned]]]:
    """The class names and each split's planned samples, in a fixed order (class, then path)."""
    if not images.is_dir():
        raise FileNotFoundError(f"--images: '{images}' is not a folder")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    classes = sorted(p.name for p in images.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"--images: '{images}' has no subfolders; put each class's images in a folder of its own")
    splits: dict[str, list[Planned]] = {"train": [], "val": []}
    for label, name in enumerate(classes):
        files = _files(images / name)
        held = set(random.Random(f"{seed}:{name}").sample(range(len(files)), round(len(files) * val_fraction)))
        for i, path in enumerate(files):
            relative = path.relative_to(images).as_posix()
            splits["val" if i in held else "train"].append(
                Planned("", relative, str(path), {"cls": label, "json": {"class": name, "path": relative}}))
    return classes, {split: numbered(samples) for split, samples in splits.items() if samples}


def run(args: argparse.Namespace) -> list:
    images = Path(args.images)
    classes, splits = plan_folder(images, args.val_fraction, args.seed)
    out = check_output(args.out, ["train", "val"], args.overwrite, extra=("classes.json",))
    (out / "classes.json").write_text(json.dumps(classes, indent=1, ensure_ascii=False) + "\n")
    return [write_split(samples, out, split, shard_size=args.shard_size, workers=args.workers, progress=args.progress)
            for split, samples in splits.items()]
