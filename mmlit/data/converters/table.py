"""``mmlit data convert table``: a table of image paths with texts and/or labels (CSV, TSV, JSONL; parquet where
pyarrow is installed) -> shards.

Each row becomes a sample: the image as found, ``.txt`` (``--text-column``), ``.cls`` (``--label-column``: the
label's index among the classes) and ``.json`` (the row's values, plus ``"class"``: the label). Image paths are
relative to the table's folder (or absolute). The classes are ``--classes`` (a ``classes.json``; a label outside it is
an error naming the row) or else the labels found, sorted (numerically when they are all integers), and written to
``classes.json`` beside the shards. A row whose image is missing or unreadable, or whose text or label is empty, is
left out and listed in the report; a column that does not exist is an error naming the file and the row.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any, Iterator

from mmlit.data.converters.writer import Planned, Skipped, check_output, hold_out, numbered, write_split
from mmlit.data.fields import names_from

HELP = "a CSV, TSV, JSONL or parquet table of image paths, texts and labels"
__all__ = ["HELP", "add_arguments", "plan_table", "read_table", "run"]

_FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--table", required=True, help="a .csv, .tsv, .jsonl or .parquet file, one row per sample")
    parser.add_argument("--image-column", default="image", help="the column of image paths (relative to the table)")
    parser.add_argument("--text-column", default=None, help="the column of texts (captions), written as .txt")
    parser.add_argument("--label-column", default=None, help="the column of class labels, written as .cls")
    parser.add_argument("--classes", default=None, help="a classes.json (a JSON list) that the labels must be in")
    parser.add_argument("--split", default="train", help="the split to write (its shards are SPLIT-000000.tar, ...)")
    parser.add_argument("--val-fraction", type=float, default=0.0, help="share of rows written as the val split")
    parser.add_argument("--seed", type=int, default=0, help="seed of the val split")


def read_table(path: Path, flag: str = "--table") -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) for every row: ``where`` names the file and line (CSV, TSV, JSONL) or row (parquet); errors about
    the file name ``flag``."""
    kind = _FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{flag}: '{path}' is not a table mmlit reads (by extension: {', '.join(sorted(_FORMATS))})")
    if not path.is_file():
        raise FileNotFoundError(f"{flag}: no file '{path}'")
    if kind == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"{flag}: reading '{path}' needs pyarrow (`pip install pyarrow`)") from None
        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path} row {i + 1}", row
    elif kind == "jsonl":
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as err:
                    raise ValueError(f"{path} line {number}: not a JSON object: {err}") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path} line {number}: not a JSON object but {type(row).__name__}")
                yield f"{path} line {number}", row
    else:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="," if kind == "csv" else "\t")
            for row in reader:
                yield f"{path} line {reader.line_num}", row


def _class_order(labels: set[str]) -> list[str]:
    if all(label.lstrip("-").isdigit() for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def plan_table(path: Path, image_column: str, text_column: str | None, label_column: str | None,
               classes: list[str] | None) -> tuple[list[Planned], list[Skipped], list[str] | None]:
    """The rows as planned samples (keys are set by the caller), the rows left out, and the classes."""
    flags = {c: f for c, f in ((label_column, "--label-column"), (text_column, "--text-column"),
                               (image_column, "--image-column")) if c}
    columns = list(flags)
    rows, skipped = [], []
    for where, row in read_table(path):
        missing = [c for c in columns if c not in row]
        if missing:
            raise ValueError(f"{where}: no column {missing[0]!r} (the row has: {', '.join(map(str, row))}); "
                             f"set {flags[missing[0]]} to one of them")
        empty = [c for c in columns if row[c] is None or str(row[c]).strip() == ""]
        if empty:
            skipped.append(Skipped(where, f"empty {empty[0]!r}"))
            continue
        rows.append((where, row))
    labels = {str(row[label_column]).strip() for _, row in rows} if label_column else set()
    if classes is not None and label_column:
        known = set(classes)
        for where, row in rows:
            if str(row[label_column]).strip() not in known:
                raise ValueError(f"{where}: label {str(row[label_column]).strip()!r} is not in --classes "
                                 f"({len(classes)} classes: {', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})")
    elif label_column:
        classes = _class_order(labels)
    index = {name: i for i, name in enumerate(classes or [])}
    planned = []
    for where, row in rows:
        image = Path(str(row[image_column]).strip())
        image = image if image.is_absolute() else path.parent / image
        values = {k: v for k, v in row.items() if isinstance(v, (str, int, float, bool, list, dict)) or v is None}
        entries: dict[str, Any] = {}
        if text_column:
            entries["txt"] = str(row[text_column]).strip()
        if label_column:
            name = str(row[label_column]).strip()
            entries["cls"], values["class"] = index[name], name
        entries["json"] = values
        planned.append(Planned("", where, str(image), entries))
    return planned, skipped, classes if label_column else None


def run(args: argparse.Namespace) -> list:
    table = Path(args.table)
    given = names_from(args.classes, "--classes") if args.classes else None
    planned, skipped, classes = plan_table(table, args.image_column, args.text_column, args.label_column, given)
    splits = hold_out(planned, args.split, args.val_fraction, args.seed)
    out = check_output(args.out, [args.split, "val"], args.overwrite, extra=("classes.json",))
    if classes:
        (out / "classes.json").write_text(json.dumps(classes, indent=1, ensure_ascii=False) + "\n")
    return [write_split(numbered(samples), out, split, shard_size=args.shard_size, workers=args.workers,
                        progress=args.progress, skipped=skipped if split == args.split else None)
            for split, samples in splits.items()]
