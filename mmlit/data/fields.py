"""Reading the values tasks need from decoded samples and recipes: name lists, class labels, captions, questions.

What several tasks read the same way is written once here (tasks do not import each other)."""

from __future__ import annotations

import json
from pathlib import Path

from mmlit.data.decode import SampleError, sample_field, sample_location
from mmlit.data.transforms import predicting

__all__ = ["captions_of", "class_index", "names_from", "questions_of"]


def names_from(value: str | list[str], key: str) -> list[str]:
    """A list of names (classes, answers) given in the recipe, or read from a JSON file that holds one
    (``classes.json``, ``answers.json``); ``key`` is the recipe key named in errors."""
    if isinstance(value, str):
        path = Path(value)
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{key}: no file '{path}' (give a JSON list of names, or the list itself)") from None
        except ValueError as err:
            raise ValueError(f"{key}: '{path}' is not JSON: {err}") from None
    if not isinstance(value, list) or not value or not all(isinstance(v, (str, int)) for v in value):
        raise ValueError(f"{key}: expected a non-empty list of names, got {str(value)[:100]}")
    names = [str(v) for v in value]
    if len(set(names)) != len(names):
        raise ValueError(f"{key}: names repeat (e.g. {next(n for n in names if names.count(n) > 1)!r})")
    return names


def class_index(value, classes: list[str], index: dict[str, int], sample: dict, key: str) -> int:
    """A label (an index, or a class name) as a class index; outside the classes is a ``SampleError``."""
    if isinstance(value, str) and value in index:
        return index[value]
    if isinstance(value, (int, str)) and not isinstance(value, bool) and str(value).lstrip("-").isdigit():
        number = int(value)
        if 0 <= number < len(classes):
            return number
    raise SampleError(f"{sample_location(sample)}: label {value!r} is not one of the {len(classes)} classes ({key})")


def captions_of(sample: dict, field: str, task: str) -> list[str]:
    """The non-empty caption(s) at ``field``: a text, or a list of texts; none for a sample without any that is
    prepared for ``mmlit predict`` (new images)."""
    try:
        value = sample_field(sample, field, task)
    except SampleError:
        if predicting():
            return []
        raise
    captions = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    captions = [c for c in captions if isinstance(c, str) and c.strip()]
    if not captions and not predicting():
        raise SampleError(f"{sample_location(sample)}: task '{task}' found no caption at '{field}'")
    return captions


def questions_of(sample: dict, field: str, task: str) -> list[tuple[str, str, dict]]:
    """The questions at ``field`` (one ``{question, answer}`` object or a list of them) as (question, answer, the
    object); a sample prepared for ``mmlit predict`` may lack answers (""). Anything else is a ``SampleError``."""
    questions = sample_field(sample, field, task)
    questions = [questions] if isinstance(questions, dict) else questions
    out = []
    for number, q in enumerate(questions if isinstance(questions, list) else [None]):
        answer = q.get("answer", "" if predicting() else None) if isinstance(q, dict) else None
        if not isinstance(q, dict) or not isinstance(q.get("question"), str) or not isinstance(answer, str):
            raise SampleError(f"{sample_location(sample)}: question {number} of '{field}' needs a \"question\" and an "
                              f"\"answer\" text, got {str(q)[:200]}")
        out.append((q["question"], answer, q))
    return out
