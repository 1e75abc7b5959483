"""``mmlit data convert coco``: COCO captions (``captions_train2017.json`` and its image folder) -> shards.

One sample per image, with all its captions: the image as found, ``.txt`` (its first caption) and ``.json``
(``{"image_id", "file_name", "captions": [...]}``, captions in annotation-id order). Keys are the image ids, zero-padded
to 12 digits (COCO's file-name convention), so predictions name the image. An image without a caption, an annotation
without a caption or for an image the file does not list, and a missing or unreadable image are left out and listed in
the report.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from mmlit.data.converters.writer import Planned, Skipped, check_output, sample_key, write_split

HELP = "COCO captions JSON and its images"
__all__ = ["HELP", "add_arguments", "load_json", "plan_coco", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--annotations", required=True, help="COCO captions JSON (captions_train2017.json)")
    parser.add_argument("--images", required=True, help="the folder of the images the file names")
    parser.add_argument("--split", default="train", help="the split to write (its shards are SPLIT-000000.tar, ...)")


def load_json(path: str | Path, flag: str, *keys: str) -> dict:
    """A JSON object with list entries ``keys``; errors name the flag and the file."""
    path = Path(path)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{flag}: no file '{path}'") from None
    except ValueError as err:
        raise ValueError(f"{flag}: '{path}' is not JSON: {err}") from None
    for key in keys:
        if not isinstance(content, dict) or not isinstance(content.get(key), list):
            raise ValueError(f"{flag}: '{path}' has no list {key!r} (is it the right file?)")
    return content


def plan_coco(annotations: Path, images: Path) -> tuple[list[Planned], list[Skipped]]:
    content = load_json(annotations, "--annotations", "images", "annotations")
    files, skipped = {}, []
    for i, image in enumerate(content["images"]):
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            raise ValueError(f"{annotations}: images[{i}] needs \"id\" and \"file_name\", got {str(image)[:200]}")
        files[image["id"]] = image["file_name"]
    captions: dict = defaultdict(list)
    for i, note in enumerate(sorted(content["annotations"], key=lambda a: a.get("id", 0) if isinstance(a, dict) else 0)):
        where = f"{annotations} annotation {note.get('id', i) if isinstance(note, dict) else i}"
        caption = note.get("caption") if isinstance(note, dict) else None
        if not isinstance(caption, str) or not caption.strip():
            skipped.append(Skipped(where, "no caption"))
        elif note.get("image_id") not in files:
            skipped.append(Skipped(where, f"image_id {note.get('image_id')!r} is not in the file's images"))
        else:
            captions[note["image_id"]].append(" ".join(caption.split()))
    planned = []
    for image_id in sorted(files, key=lambda i: (str(type(i)), i)):
        where = f"{annotations} image {image_id}"
        if not captions[image_id]:
            skipped.append(Skipped(where, "no caption", str(images / files[image_id])))
            continue
        planned.append(Planned(sample_key(image_id), where, str(images / files[image_id]), {
            "txt": captions[image_id][0],
            "json": {"image_id": image_id, "file_name": files[image_id], "captions": captions[image_id]}}))
    return planned, skipped


def run(args: argparse.Namespace) -> list:
    planned, skipped = plan_coco(Path(args.annotations), Path(args.images))
    out = check_output(args.out, [args.split], args.overwrite)
    return [write_split(planned, out, args.split, shard_size=args.shard_size, workers=args.workers,
                        progress=args.progress, skipped=skipped)]
