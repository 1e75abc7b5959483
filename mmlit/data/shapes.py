"""Shapes: a small synthetic world written in the layouts users bring (COCO captions, an image folder, VQAv2, a CSV
table), generated locally, so the converters and the tasks for real data sets can be run end to end without a
download (``mmlit data shapes``, the tests and the converter runs of docs/results.md).

A scene is a plain background with one to three shapes (circle, square, triangle, star), each in a colour, a size and
a place; images are JPEGs of ``size`` pixels. A COCO image has five captions written from different templates; a VQA
image has a colour question, a counting question and a yes/no question, each with ten human answers of which
some disagree (as real annotators do); an image-folder image shows one shape, its class. Every file is a function of
(seed, layout, index).
"""

from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

__all__ = ["COLOURS", "SHAPES", "make_scene", "write_coco", "write_folder", "write_table", "write_vqa"]

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30),
           "purple": (140, 60, 170), "orange": (240, 130, 20)}
_BACKGROUNDS = {"white": (245, 245, 245), "grey": (170, 170, 170), "black": (25, 25, 25), "beige": (225, 210, 180)}
_NUMBERS = ("zero", "one", "two", "three")


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    x: float  # centre, as a share of the width
    y: float
    radius: float  # as a share of the width
    angle: float

    @property
    def size_word(self) -> str:
        return "small" if self.radius < 0.11 else "large" if self.radius > 0.16 else "medium"

    @property
    def place(self) -> str:
        vertical = "top" if self.y < 0.4 else "bottom" if self.y > 0.6 else "middle"
        horizontal = "left" if self.x < 0.4 else "right" if self.x > 0.6 else "centre"
        return "centre" if vertical == "middle" and horizontal == "centre" else f"{vertical} {horizontal}"


def make_scene(rng: random.Random, count: int | None = None, kind: str | None = None,
               radius: tuple[float, float] = (0.08, 0.2)) -> tuple[str, list[Shape]]:
    """A background and ``count`` (default 1-3) shapes that do not overlap, of a radius in ``radius`` (a share of
    the image's side)."""
    background = rng.choice(sorted(_BACKGROUNDS))
    shapes: list[Shape] = []
    low, high = radius
    for _ in range(count or rng.randint(1, 3)):
        for _ in range(100):
            radius = rng.uniform(low, high)
            x, y = rng.uniform(radius, 1 - radius), rng.uniform(radius, 1 - radius)
            if all(math.dist((x, y), (s.x, s.y)) > radius + s.radius + 0.02 for s in shapes):
                shapes.append(Shape(kind or rng.choice(SHAPES), rng.choice(sorted(COLOURS)), x, y, radius,
                                    rng.uniform(0, 360)))
                break
    return background, shapes


def _render(background: str, shapes: list[Shape], size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), _BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    for s in shapes:
        cx, cy, r, colour = s.x * size, s.y * size, s.radius * size, COLOURS[s.colour]
        if s.kind == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        else:
            corners = {"square": 4, "triangle": 3, "star": 10}[s.kind]
            points = []
            for i in range(corners):
                radius = r * (0.45 if s.kind == "star" and i % 2 else 1.0)
                angle = math.radians(s.angle + 360 * i / corners)
                points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
            draw.polygon(points, fill=colour)
    return image


def _captions(rng: random.Random, background: str, shapes: list[Shape]) -> list[str]:
    """Five captions of one scene, each from another template."""
    listed = _join([f"{_a(s.colour)} {s.colour} {s.kind}" for s in shapes])
    kinds = _join([f"{_NUMBERS[n]} {k}s" if n > 1 else f"a {k}" for k in sorted({s.kind for s in shapes})
                   for n in [sum(s.kind == k for s in shapes)]])
    first, others = shapes[0], len(shapes) - 1
    return [
        f"{listed} on a {background} background",
        f"{_NUMBERS[len(shapes)]} shape{'s' if len(shapes) > 1 else ''} on {background}: {listed}",
        f"{_a(first.size_word)} {first.size_word} {first.colour} {first.kind} in the {first.place}"
        + (f" with {_NUMBERS[others]} other shape{'s' if others > 1 else ''}" if others else ""),
        f"a picture with {kinds}",
        f"{rng.choice(['simple', 'flat', 'plain'])} drawing of {listed}",
    ]


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _join(things: list[str]) -> str:
    return things[0] if len(things) == 1 else ", ".join(things[:-1]) + f" and {things[-1]}"


def write_coco(out: str | Path, images: int, *, split: str = "train", seed: int = 0, size: int = 96) -> Path:
    """``out/{split}/*.jpg`` and ``out/captions_{split}.json`` in the COCO captions layout; returns the JSON's path."""
    out, folder = Path(out), Path(out) / split
    folder.mkdir(parents=True, exist_ok=True)
    entries, annotations = [], []
    for i in range(images):
        rng = random.Random(f"{seed}:coco:{split}:{i}")
        background, shapes = make_scene(rng)
        name = f"{split}_{i:06d}.jpg"
        _render(background, shapes, size).save(folder / name, quality=90)
        image_id = 1000 + i
        entries.append({"id": image_id, "file_name": name, "width": size, "height": size})
        for caption in _captions(rng, background, shapes):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "caption": caption})
    path = out / f"captions_{split}.json"
    path.write_text(json.dumps({"info": {"description": "mmlit shapes"}, "images": entries, "annotations": annotations}))
    return path


def write_folder(out: str | Path, per_class: int, *, seed: int = 0, size: int = 96) -> Path:
    """``out/{shape}/*.jpg``: one shape per image, in the image-folder (ImageNet) layout; returns ``out``."""
    out = Path(out)
    for kind in SHAPES:
        (out / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rng = random.Random(f"{seed}:folder:{kind}:{i}")
            background, shapes = make_scene(rng, count=1, kind=kind, radius=(0.18, 0.32))  # one shape, in view
            _render(background, shapes, size).save(out / kind / f"{kind}_{i:05d}.jpg", quality=90)
    return out


def _human(rng: random.Random, truth: str, alternatives: list[str]) -> list[str]:
    """Ten annotators' answers: mostly the truth, some of them another answer (or its spelling)."""
    answers = []
    for _ in range(10):
        roll = rng.random()
        answers.append(truth if roll < 0.75 else truth.capitalize() + "." if roll < 0.85 else rng.choice(alternatives))
    return answers


def write_vqa(out: str | Path, images: int, *, split: str = "train", seed: int = 0, size: int = 96) -> tuple[Path, Path]:
    """COCO-named images ``out/{split}2014/COCO_{split}2014_{id:012d}.jpg`` with VQAv2 questions and annotations
    (``out/questions_{split}.json``, ``out/annotations_{split}.json``); returns the two JSON paths."""
    out, subtype = Path(out), f"{split}2014"
    (out / subtype).mkdir(parents=True, exist_ok=True)
    questions, annotations = [], []
    for i in range(images):
        rng = random.Random(f"{seed}:vqa:{split}:{i}")
        background, shapes = make_scene(rng)
        image_id = 2000 + i
        _render(background, shapes, size).save(out / subtype / f"COCO_{subtype}_{image_id:012d}.jpg", quality=90)
        asked = rng.choice(SHAPES)
        items = [(f"what colour is the {shapes[0].kind}?", shapes[0].colour, "other", "what color is the", list(COLOURS)),
                 ("how many shapes are there?", str(len(shapes)), "number", "how many", ["1", "2", "3", "4"]),
                 (f"is there a {asked}?", "yes" if any(s.kind == asked for s in shapes) else "no", "yes/no", "is there a",
                  ["yes", "no"])]
        for number, (question, truth, answer_type, question_type, alternatives) in enumerate(items):
            qid = image_id * 10 + number
            questions.append({"image_id": image_id, "question": question, "question_id": qid})
            human = _human(rng, truth, alternatives)
            annotations.append({"question_id": qid, "image_id": image_id, "question_type": question_type,
                                "answer_type": answer_type, "multiple_choice_answer": truth,
                                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                                            for k, a in enumerate(human)]})
    q_path, a_path = out / f"questions_{split}.json", out / f"annotations_{split}.json"
    q_path.write_text(json.dumps({"data_subtype": subtype, "questions": questions}))
    a_path.write_text(json.dumps({"data_subtype": subtype, "annotations": annotations}))
    return q_path, a_path


def write_table(out: str | Path, rows: int, *, seed: int = 0, size: int = 96, kind: str = "csv") -> Path:
    """Images ``out/images/*.png`` and a table of (image, caption, label) rows: ``csv``, ``tsv`` or ``jsonl``; the
    label is the first shape's kind. Returns the table's path."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(rows):
        rng = random.Random(f"{seed}:table:{i}")
        background, shapes = make_scene(rng)
        _render(background, shapes, size).save(out / "images" / f"{i:05d}.png")
        records.append({"image": f"images/{i:05d}.png", "caption": _captions(rng, background, shapes)[0],
                        "label": shapes[0].kind})
    path = out / f"table.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["image", "caption", "label"], delimiter="," if kind == "csv" else "\t")
            writer.writeheader()
            writer.writerows(records)
    return path
