"""``mmlit data convert``: an image folder, tables (CSV, TSV, JSONL, parquet), COCO captions and VQAv2 become shards
with their index; bad input is an error naming the file and the row, or a counted skip in the report; output is
deterministic and never overwritten by accident. ``mmlit data answers`` and the tokenizer's ``--fields``."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from mmlit.data import decode_sample, iter_samples, load_index, scan_shards
from mmlit.data import shapes
from mmlit.data.tools import main as data_main
from mmlit.metrics.vqa import normalize_answer
from mmlit.text import load_tokenizer

from ..conftest import write_tar


def _convert(fmt: str, out: Path, *args: str) -> int:
    return data_main(["convert", fmt, "--out", str(out), "--no-progress", "--shard-size", "5", *args])


def _samples(out: Path, split: str) -> list[dict]:
    """Every sample of a converted split, read through its index, decoded."""
    index = load_index(str(out / f"{split}.json"), "k")
    scanned = scan_shards(index.urls, "k")
    assert scanned.counts == index.counts, "the index counts what the shards hold"
    assert index.offsets == scanned.offsets and all(index.offsets), "and gives their samples' byte offsets"
    return [decode_sample(s) for url in index.urls for s in iter_samples(url)]


def _skipped(out: Path, split: str) -> list[dict]:
    path = out / f"{split}-skipped.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = shapes.write_folder(tmp_path_factory.mktemp("folder") / "images", per_class=6)
    (root / "circle" / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "square" / "notes.txt").write_text("not an image")
    (root / "square" / ".DS_Store").write_bytes(b"hidden files are not samples")
    return root


def test_image_folder_becomes_class_shards_with_a_seeded_val_split(folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert _convert("folder", out, "--images", str(folder), "--val-fraction", "0.3", "--workers", "2") == 0
    assert json.loads((out / "classes.json").read_text()) == sorted(shapes.SHAPES)
    train, val = _samples(out, "train"), _samples(out, "val")
    assert len(train) + len(val) == 4 * 6 and len(val) == 4 * 2  # round(7 * 0.3) = 2 of circle's and square's 7 files
    for sample in train + val:
        assert sample["json"]["class"] == sorted(shapes.SHAPES)[sample["cls"]] and "jpg" in sample
    assert {s["json"]["path"] for s in val}.isdisjoint(s["json"]["path"] for s in train)
    reasons = {s["origin"]: s["reason"] for split in ("train", "val") for s in _skipped(out, split)}
    assert set(reasons) == {"circle/broken.jpg", "square/notes.txt"}
    assert "not the JPEG its .jpg name says" in reasons["circle/broken.jpg"] and ".txt" in reasons["square/notes.txt"]
    assert sum(int(n) for n in re.findall(r"(\d+) skipped", capsys.readouterr().out)) == 2

    again = tmp_path / "again"  # the same input gives the same bytes, however many workers write it
    assert _convert("folder", again, "--images", str(folder), "--val-fraction", "0.3", "--workers", "1") == 0
    for shard in sorted(out.glob("*.tar")):
        assert shard.read_bytes() == (again / shard.name).read_bytes(), shard.name


def test_conversion_never_overwrites_without_the_flag(folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert _convert("folder", out, "--images", str(folder)) == 0
    stale = write_tar(out / "train-000099.tar", [{"__key__": "old", "cls": b"0"}])
    before = (out / "train-000000.tar").read_bytes()
    assert _convert("folder", out, "--images", str(folder), "--shard-size", "7") == 2
    assert "exist(s) already; pass --overwrite" in capsys.readouterr().err
    assert (out / "train-000000.tar").read_bytes() == before and stale.exists()
    assert _convert("folder", out, "--images", str(folder), "--shard-size", "7", "--overwrite") == 0
    assert not stale.exists() and len(_samples(out, "train")) == 24  # (shards of 7, not 5)


@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl", "parquet"])
def test_a_table_becomes_shards_and_bad_rows_are_counted(kind, tmp_path):
    table = shapes.write_table(tmp_path / "data", 10, kind="jsonl" if kind == "parquet" else kind)
    rows = [json.loads(line) for line in table.read_text().splitlines()] if table.suffix == ".jsonl" else None
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), table.with_suffix(".parquet"))
        table = table.with_suffix(".parquet")
    (tmp_path / "data" / "images" / "00003.png").unlink()  # a row whose image is missing
    out = tmp_path / "out"
    assert _convert("table", out, "--table", str(table), "--text-column", "caption", "--label-column", "label") == 0
    samples = _samples(out, "train")
    classes = json.loads((out / "classes.json").read_text())
    assert len(samples) == 9 and classes == sorted({s["json"]["class"] for s in samples})
    for sample in samples:
        assert sample["txt"] == sample["json"]["caption"] and classes[sample["cls"]] == sample["json"]["label"]
    skipped = _skipped(out, "train")
    where = {"csv": "line 5", "tsv": "line 5", "jsonl": "line 4", "parquet": "row 4"}[kind]  # (the header is line 1)
    assert len(skipped) == 1 and skipped[0]["origin"].endswith(where) and "cannot read the image" in skipped[0]["reason"]


def test_table_errors_name_the_file_and_the_row(tmp_path, capsys):
    table = shapes.write_table(tmp_path / "data", 4, kind="csv")
    assert _convert("table", tmp_path / "a", "--table", str(table), "--text-column", "text") == 2
    assert f"{table} line 2: no column 'text'" in capsys.readouterr().err
    (tmp_path / "classes.json").write_text(json.dumps(["circle", "square"]))
    labels = [r.split(",")[-1] for r in table.read_text().splitlines()[1:]]
    outside = next(i for i, label in enumerate(labels) if label not in ("circle", "square"))
    assert _convert("table", tmp_path / "b", "--table", str(table), "--label-column", "label",
                    "--classes", str(tmp_path / "classes.json")) == 2
    err = capsys.readouterr().err
    assert f"{table} line {outside + 2}: label '{labels[outside]}' is not in --classes" in err
    with table.open("a") as f:
        f.write("images/00001.png,,circle\n")  # a row without a caption: skipped, listed
    assert _convert("table", tmp_path / "c", "--table", str(table), "--text-column", "caption") == 0
    assert [s["reason"] for s in _skipped(tmp_path / "c", "train")] == ["empty 'caption'"]


def test_coco_captions_become_one_sample_per_image_with_all_captions(tmp_path):
    annotations = shapes.write_coco(tmp_path / "coco", 8)
    content = json.loads(annotations.read_text())
    content["annotations"].append({"id": 900, "image_id": 1001})  # no caption
    content["annotations"].append({"id": 901, "image_id": 5, "caption": "an image the file does not list"})
    content["images"].append({"id": 1100, "file_name": "never_captioned.jpg"})
    annotations.write_text(json.dumps(content))
    (tmp_path / "coco" / "train" / "train_000002.jpg").unlink()
    out = tmp_path / "out"
    assert _convert("coco", out, "--annotations", str(annotations), "--images", str(tmp_path / "coco" / "train")) == 0
    samples = _samples(out, "train")
    assert [s["__key__"] for s in samples] == [f"{1000 + i:012d}" for i in range(8) if i != 2]
    for sample in samples:
        assert len(sample["json"]["captions"]) == 5 and sample["txt"] == sample["json"]["captions"][0]
    reasons = sorted(s["reason"].split(":")[0] for s in _skipped(out, "train"))
    assert reasons == ["cannot read the image", "image_id 5 is not in the file's images", "no caption", "no caption"]


@pytest.fixture(scope="module")
def vqa_files(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("vqa")
    questions, annotations = shapes.write_vqa(root, 8)
    content = json.loads(questions.read_text())
    content["questions"].append({"image_id": 2001, "question": "an unannotated question?", "question_id": 1})
    questions.write_text(json.dumps(content))
    (root / "train2014" / "COCO_train2014_000000002003.jpg").unlink()
    return questions, annotations, root / "train2014"


def test_vqa_questions_and_answers_become_one_sample_per_image(vqa_files, tmp_path):
    questions, annotations, images = vqa_files
    out = tmp_path / "out"
    assert _convert("vqa", out, "--questions", str(questions), "--annotations", str(annotations),
                    "--images", str(images)) == 0
    samples = _samples(out, "train")
    assert len(samples) == 7
    written = {note["question_id"]: note for note in json.loads(annotations.read_text())["annotations"]}
    for sample in samples:
        items = sample["json"]["questions"]
        assert len(items) == 3 and {q["answer_type"] for q in items} == {"other", "number", "yes/no"}
        for q in items:  # as the annotators wrote them ("Yes." among "yes"): the official evaluation needs them so
            note = written[q["question_id"]]
            assert q["answers"] == [a["answer"] for a in note["answers"]] and q["answer"] == note["multiple_choice_answer"]
    assert any(a != normalize_answer(a) for s in samples for q in s["json"]["questions"] for a in q["answers"])
    reasons = sorted(s["reason"] for s in _skipped(out, "train"))
    assert len(reasons) == 2 and reasons[1] == "no annotation for this question"
    assert reasons[0].startswith("cannot read the image")

    vocabulary = tmp_path / "answers.json"
    assert data_main(["answers", "--shards", str(out / "train-*.tar"), "--top", "3", "--out", str(vocabulary)]) == 0
    answers = json.loads(vocabulary.read_text())
    counts = {}
    for sample in samples:
        for q in sample["json"]["questions"]:
            counts[normalize_answer(q["answer"])] = counts.get(normalize_answer(q["answer"]), 0) + 1
    assert answers == sorted(counts, key=lambda a: (-counts[a], a))[:3]


def test_the_tokenizer_learns_only_the_named_text_fields(tmp_path):
    """img2dataset's shards hold URLs and hashes in .json: by default the tokenizer learns the captions only."""
    samples = [{"__key__": f"{i:09d}", "txt": f"a photo of a {w} dog".encode(),
                "json": json.dumps({"url": f"https://example.com/images/{i}.jpg", "sha256": f"{i:064x}",
                                    "caption": f"a photo of a {w} dog"}).encode()}
               for i, w in enumerate(["brown", "white", "black", "small"] * 5)]
    shard = write_tar(tmp_path / "00000.tar", samples)
    default, urls = tmp_path / "default.json", tmp_path / "urls.json"
    assert data_main(["tokenizer", "--shards", str(shard), "--out", str(default)]) == 0
    vocabulary = load_tokenizer(default).get_vocab()
    assert {"photo", "brown", "dog"} <= set(vocabulary) and not {"https", "example", "jpg"} & set(vocabulary)
    assert data_main(["tokenizer", "--shards", str(shard), "--fields", "json.url", "--out", str(urls)]) == 0
    assert {"https", "example"} <= set(load_tokenizer(urls).get_vocab())


def test_a_tokenizer_field_that_holds_no_text_is_an_error_that_keeps_the_tokenizer(tmp_path, capsys):
    shard = write_tar(tmp_path / "00000.tar", [{"__key__": "a", "txt": b"some words"}])
    assert data_main(["tokenizer", "--shards", str(shard), "--out", str(tmp_path / "t.json")]) == 0
    before = (tmp_path / "t.json").read_bytes()
    assert data_main(["tokenizer", "--shards", str(shard), "--fields", "json.caption", "--out",
                      str(tmp_path / "t.json")]) == 2
    assert "--fields: no text in json.caption" in capsys.readouterr().err
    assert (tmp_path / "t.json").read_bytes() == before


def test_shapes_layouts_convert_with_their_defaults(tmp_path):
    """The synthetic data set's files are what the converters expect (the README's runs start from them)."""
    shapes.write_coco(tmp_path / "coco", 3, split="val")
    assert _convert("coco", tmp_path / "out", "--annotations", str(tmp_path / "coco" / "captions_val.json"),
                    "--images", str(tmp_path / "coco" / "val"), "--split", "val") == 0
    assert len(_samples(tmp_path / "out", "val")) == 3
    shutil.rmtree(tmp_path / "coco")
