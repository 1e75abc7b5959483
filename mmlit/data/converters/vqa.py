"""``mmlit data convert vqa``: VQAv2 questions and annotations (Goyal et al. 2017) with their COCO images -> shards;
``mmlit data answers``: the answer vocabulary of converted shards.

One sample per image, with all its questions: the image as found and ``.json``
(``{"image_id", "questions": [{"question_id", "question", "answers": [10 answers], "answer", "answer_type",
"question_type"}, ...]}``). Answers are kept as the annotators wrote them: the official evaluation compares them
as written when all ten agree and normalised otherwise, so the shards must hold what it holds (the VQA task
normalises for its answer vocabulary and targets itself). ``answer`` is the annotators' consensus
(``multiple_choice_answer``). ``mmlit data answers`` counts consensus answers normalised (``normalize_answer``). Without ``--annotations`` (the test-dev
questions) the questions come without answers, for ``mmlit predict``. Image files are found by ``--image-pattern``
(default: VQAv2's ``COCO_{data_subtype}_{image_id:012d}.jpg``). A question without an annotation and a missing or
unreadable image are left out and listed in the report.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

from mmlit.data.converters.coco import load_json
from mmlit.data.converters.writer import Planned, Skipped, check_output, sample_key, write_split
from mmlit.metrics.vqa import normalize_answer

HELP = "VQAv2 questions and annotations and their COCO images"
__all__ = ["HELP", "add_arguments", "answer_vocabulary", "plan_vqa", "run", "write_answers"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--questions", required=True,
                        help="VQAv2 questions JSON (v2_OpenEnded_mscoco_train2014_questions.json)")
    parser.add_argument("--annotations", default=None, help="VQAv2 annotations JSON (none for test questions)")
    parser.add_argument("--images", required=True, help="the folder of the COCO images")
    parser.add_argument("--image-pattern", default="COCO_{data_subtype}_{image_id:012d}.jpg",
                        help="image file name; fields: image_id, data_subtype (the questions file's)")
    parser.add_argument("--split", default="train", help="the split to write (its shards are SPLIT-000000.tar, ...)")


def _annotation(note: dict, where: str) -> dict:
    answers = note.get("answers")
    if not isinstance(answers, list) or not all(isinstance(a, dict) and isinstance(a.get("answer"), str) for a in answers):
        raise ValueError(f"{where}: \"answers\" must be a list of {{\"answer\": str}}")
    consensus = note.get("multiple_choice_answer")
    answers = [a["answer"] for a in answers]
    if not answers and not isinstance(consensus, str):
        raise ValueError(f"{where}: no answer (neither \"answers\" nor \"multiple_choice_answer\")")
    return {"answers": answers,
            "answer": consensus if isinstance(consensus, str) else Counter(answers).most_common(1)[0][0],
            "answer_type": note.get("answer_type", ""), "question_type": note.get("question_type", "")}


def plan_vqa(questions: Path, annotations: Path | None, images: Path, pattern: str) -> tuple[list[Planned], list[Skipped]]:
    content = load_json(questions, "--questions", "questions")
    notes = {}
    if annotations is not None:
        for i, note in enumerate(load_json(annotations, "--annotations", "annotations")["annotations"]):
            if not isinstance(note, dict) or "question_id" not in note:
                raise ValueError(f"{annotations} annotation {i}: needs \"question_id\"")
            notes[note["question_id"]] = _annotation(note, f"{annotations} annotation {i}")
    subtype = content.get("data_subtype", "")
    by_image: dict = defaultdict(list)
    skipped = []
    for i, q in enumerate(content["questions"]):
        where = f"{questions} question {q.get('question_id', i) if isinstance(q, dict) else i}"
        if not isinstance(q, dict) or not {"image_id", "question", "question_id"} <= set(q):
            raise ValueError(f"{where}: needs \"image_id\", \"question\" and \"question_id\", got {str(q)[:200]}")
        item = {"question_id": q["question_id"], "question": q["question"]}
        if annotations is not None:
            if q["question_id"] not in notes:
                skipped.append(Skipped(where, "no annotation for this question"))
                continue
            item.update(notes[q["question_id"]])
        by_image[q["image_id"]].append(item)
    planned = []
    for image_id in sorted(by_image):
        try:
            name = pattern.format(image_id=image_id, data_subtype=subtype)
        except (KeyError, ValueError, IndexError) as err:
            raise ValueError(f"--image-pattern {pattern!r}: {err!r} (fields: image_id, data_subtype)") from None
        items = sorted(by_image[image_id], key=lambda q: q["question_id"])
        planned.append(Planned(sample_key(image_id), f"{questions} image {image_id} ({len(items)} questions)",
                               str(images / name),
                               {"json": {"image_id": image_id, "questions": items}}))
    return planned, skipped


def run(args: argparse.Namespace) -> list:
    planned, skipped = plan_vqa(Path(args.questions), Path(args.annotations) if args.annotations else None,
                                Path(args.images), args.image_pattern)
    out = check_output(args.out, [args.split], args.overwrite)
    return [write_split(planned, out, args.split, shard_size=args.shard_size, workers=args.workers,
                        progress=args.progress, skipped=skipped)]


def answer_vocabulary(questions: list[list[dict]], top: int, normalize: bool = True) -> list[tuple[str, int]]:
    """The ``top`` most frequent answers with their counts: each question's consensus ``answer`` (or, without one,
    each of its ``answers``), normalised as the VQA task compares them (unless ``normalize`` is off, for a task with
    ``normalize: false``); ties in name order."""
    clean = normalize_answer if normalize else str
    counts: Counter = Counter()
    for items in questions:
        for q in items:
            if isinstance(q.get("answer"), str):
                counts[clean(q["answer"])] += 1
            else:
                counts.update(clean(a) for a in q.get("answers", ()) if isinstance(a, str))
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:top]


def write_answers(questions: list[list[dict]], top: int, out: str, normalize: bool = True) -> tuple[list[str], float]:
    """Write the vocabulary as a JSON list; returns it and the share of questions whose answer it holds."""
    vocabulary = answer_vocabulary(questions, top, normalize)
    answers = [a for a, _ in vocabulary]
    known = set(answers)
    clean = normalize_answer if normalize else str
    total = sum(1 for items in questions for _ in items)
    covered = sum(1 for items in questions for q in items if isinstance(q.get("answer"), str) and clean(q["answer"]) in known)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(answers, indent=1, ensure_ascii=False) + "\n")
    return answers, covered / max(total, 1)
