"""Sort-of-CLEVR, generated locally and written as WebDataset shards.

The data set of Santoro et al. 2017, "A simple neural network module for relational reasoning"
(arXiv:1706.01427): 75x75 images of six objects, one per colour, each a square or a circle, with
ten non-relational and ten relational questions per image. mmlit adds a caption that names every
object (colour, shape, position) and labels for image-only and text-only tasks.

Every image is a pure function of ``(seed, split, index)``, so a small set is the prefix of a large
one and train/val/test never share an image.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw

__all__ = [
    "COLOURS", "ANSWERS", "QUESTION_TYPES", "RELATIONAL", "SPLITS", "PRESETS", "TEMPLATES",
    "make_scene", "make_sample", "render", "questions_for", "caption_for", "write_split", "write_dataset",
]

IMAGE_SIZE = 75
OBJECT_HALF_SIZE = 5  # objects are 10x10 pixels, as in the paper's generator
COLOURS = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
    "orange": (255, 156, 0), "gray": (128, 128, 128), "yellow": (255, 255, 0),
}
SHAPES = ("circle", "square")
ANSWERS = ("circle", "square", "left", "right", "top", "bottom", "1", "2", "3", "4", "5", "6")
QUESTION_TYPES = ("shape", "horizontal", "vertical", "closest", "furthest", "count")
RELATIONAL = frozenset({"closest", "furthest", "count"})
TEMPLATES = {  # the questions of each type, about the object of colour {c}
    "shape": "what is the shape of the {c} object?",
    "horizontal": "is the {c} object on the left or the right?",
    "vertical": "is the {c} object at the top or the bottom?",
    "closest": "what is the shape of the object closest to the {c} object?",
    "furthest": "what is the shape of the object furthest from the {c} object?",
    "count": "how many objects have the same shape as the {c} object?",
}
SPLITS = ("train", "val", "test")
# The paper uses 9,800 training and 200 test images; "full" keeps 10,000 images in all.
PRESETS = {"quickstart": {"train": 4000, "val": 250, "test": 250}, "full": {"train": 9600, "val": 200, "test": 200}}


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    x: float
    y: float

    @property
    def horizontal(self) -> str:
        return "left" if self.x < IMAGE_SIZE / 2 else "right"

    @property
    def vertical(self) -> str:
        return "top" if self.y < IMAGE_SIZE / 2 else "bottom"


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), index])


def make_scene(rng: np.random.Generator) -> list[SceneObject]:
    """Six objects, one per colour, centres far enough apart that no two overlap."""
    objects: list[SceneObject] = []
    lo, hi = OBJECT_HALF_SIZE, IMAGE_SIZE - OBJECT_HALF_SIZE
    for colour in COLOURS:
        while True:
            x, y = rng.uniform(lo, hi, size=2)
            if all(math.dist((x, y), (o.x, o.y)) >= 3 * OBJECT_HALF_SIZE for o in objects):
                break
        objects.append(SceneObject(colour, SHAPES[rng.integers(2)], float(x), float(y)))
    return objects


def render(objects: list[SceneObject]) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    s = OBJECT_HALF_SIZE
    for o in objects:
        box = (round(o.x - s), round(o.y - s), round(o.x + s), round(o.y + s))
        (draw.ellipse if o.shape == "circle" else draw.rectangle)(box, fill=COLOURS[o.colour])
    return image


def _answer(objects: list[SceneObject], subject: SceneObject, qtype: str) -> str:
    if qtype in ("shape", "horizontal", "vertical"):
        return getattr(subject, qtype)
    if qtype == "count":
        return str(sum(o.shape == subject.shape for o in objects))
    others = [o for o in objects if o is not subject]
    distance = [math.dist((subject.x, subject.y), (o.x, o.y)) for o in others]
    pick = min if qtype == "closest" else max
    return others[distance.index(pick(distance))].shape


def questions_for(objects: list[SceneObject], rng: np.random.Generator, per_kind: int = 10) -> list[dict]:
    """``per_kind`` non-relational then ``per_kind`` relational questions, each about a random colour."""
    questions = []
    for kinds in (("shape", "horizontal", "vertical"), ("closest", "furthest", "count")):
        for _ in range(per_kind):
            subject = objects[rng.integers(len(objects))]
            qtype = kinds[rng.integers(3)]
            questions.append({
                "question": TEMPLATES[qtype].format(c=subject.colour),
                "answer": _answer(objects, subject, qtype),
                "type": qtype,
                "relational": qtype in RELATIONAL,
            })
    return questions


def caption_for(objects: list[SceneObject]) -> str:
    """Every object in the fixed colour order: ``red circle top left , green square ...``."""
    return " , ".join(f"{o.colour} {o.shape} {o.vertical} {o.horizontal}" for o in objects)


def make_sample(seed: int, split: str, index: int, image_format: Literal["png", "jpg"] = "png",
                objects: list[SceneObject] | None = None) -> dict:
    """One WebDataset sample: the encoded image and its JSON annotations. ``objects`` replaces the scene drawn for
    the index (an extension that had to draw another, e.g. ``sort_of_clevr_av`` for a scene that cannot move)."""
    rng = _rng(seed, split, index)
    drawn = make_scene(rng)  # drawn even when replaced: the questions come from the same point of the stream
    objects = drawn if objects is None else objects
    buffer = io.BytesIO()
    render(objects).save(buffer, format="PNG" if image_format == "png" else "JPEG", quality=95)
    annotations = {
        "questions": questions_for(objects, rng),
        "caption": caption_for(objects),
        "labels": {"n_circles": sum(o.shape == "circle" for o in objects),
                   "objects": [f"{o.colour} {o.shape}" for o in objects]},
        "objects": [o.__dict__ for o in objects],
    }
    return {"__key__": f"{split}{index:07d}", image_format: buffer.getvalue(), "json": json.dumps(annotations).encode()}


def write_split(out: str | Path, split: str, count: int, *, seed: int = 0, shard_size: int = 500,
                image_format: Literal["png", "jpg"] = "png", samples: Iterable[dict] | None = None) -> list[str]:
    """Write ``count`` samples of ``split`` as ``{out}/{split}-000000.tar, ...``; returns the shard paths.

    ``samples``: the ``count`` samples to write, in index order, instead of ``make_sample``'s (an extension's, e.g.
    ``sort_of_clevr_av``'s with speech and video, made by a pool of processes)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(f"{split}-*.tar"):
        stale.unlink()
    # A fixed integer mtime makes shards byte-for-byte reproducible and spares readers a PAX header per file.
    with wds.ShardWriter(str(out / f"{split}-%06d.tar"), maxcount=shard_size, verbose=0, mtime=0) as sink:
        for sample in (make_sample(seed, split, i, image_format) for i in range(count)) if samples is None else samples:
            sink.write(sample)
    return sorted(str(p) for p in out.glob(f"{split}-*.tar"))


def write_dataset(out: str | Path, sizes: dict[str, int], *, seed: int = 0, shard_size: int = 500,
                  image_format: Literal["png", "jpg"] = "png") -> dict[str, list[str]]:
    """Write every split in ``sizes`` (e.g. ``PRESETS["full"]``)."""
    return {split: write_split(out, split, n, seed=seed, shard_size=shard_size, image_format=image_format)
            for split, n in sizes.items()}
