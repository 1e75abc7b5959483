"""``mmlit data convert librispeech|clotho|msrvtt|video-folder``: real FLAC, WAV and MP4 files (made here with PyAV) in
each data set's layout become shards whose media entries are the source files byte for byte and decode through the
audio and video modalities; transcripts and captions land where they belong; a corrupt file, a missing file and an
annotation without its file are listed in ``{split}-skipped.jsonl``; output is deterministic and never overwritten
without ``--overwrite``."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest

from mmlit.data import decode_sample, iter_samples, load_index, scan_shards
from mmlit.data.tools import main as data_main

av = pytest.importorskip("av")

RATE = 16000


def _audio(path: Path, freq: float = 440.0, seconds: float = 0.2) -> Path:
    """A short mono sine at 16 kHz, FLAC or WAV by the name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = path.suffix[1:]
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream({"flac": "flac", "wav": "pcm_s16le"}[fmt], rate=RATE, layout="mono")
        t = np.arange(round(seconds * RATE)) / RATE
        frame = av.AudioFrame.from_ndarray((np.sin(2 * np.pi * freq * t) * 9000).astype(np.int16)[None],
                                           format="s16", layout="mono")
        frame.sample_rate = RATE
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return path


def _clip(path: Path, shade: int = 0) -> Path:
    """Four 32x32 frames of MPEG-4 part 2 in MP4."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for i in range(4):
            image = np.full((32, 32, 3), (shade + 40 * i) % 256, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def _convert(fmt: str, out: Path, *args: str) -> int:
    return data_main(["convert", fmt, "--out", str(out), "--no-progress", "--shard-size", "2", *args])


def _raw(out: Path, split: str) -> list[dict]:
    """Every sample of a converted split as written (bytes), read through its index."""
    index = load_index(str(out / f"{split}.json"), "k")
    assert scan_shards(index.urls, "k").counts == index.counts, "the index counts what the shards hold"
    return [s for url in index.urls for s in iter_samples(url)]


def _text(sample: dict) -> tuple[str, dict]:
    return sample["txt"].decode("utf-8"), json.loads(sample["json"])


def _skipped(out: Path, split: str) -> dict[str, str]:
    """origin -> reason of what a split left out."""
    path = out / f"{split}-skipped.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return {s["origin"]: s["reason"] for s in map(json.loads, lines)}


def _shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def _rerun_is_identical(fmt: str, out: Path, args: list[str], capsys) -> None:
    """Converting again refuses to replace the output; with --overwrite (and another number of workers) it writes the
    same bytes."""
    before = _shards(out)
    assert _convert(fmt, out, *args) == 2
    assert "exist(s) already; pass --overwrite" in capsys.readouterr().err
    assert _shards(out) == before
    assert _convert(fmt, out, *args, "--overwrite", "--workers", "1") == 0
    assert _shards(out) == before


def test_librispeech_utterances_become_samples_with_their_transcripts(tmp_path, capsys):
    root = tmp_path / "LibriSpeech"
    chapter = root / "dev-clean" / "84" / "121123"
    sources = {u: _audio(chapter / f"{u}.flac", 300 + 50 * i) for i, u in
               enumerate(["84-121123-0000", "84-121123-0001", "84-121123-0002", "84-121123-0010"])}
    (chapter / "84-121123-0002.flac").write_bytes(b"fLaC but not really")  # corrupt
    (chapter / "84-121123.trans.txt").write_text(
        "84-121123-0000 GO DO YOU HEAR\n84-121123-0001 BUT IN LESS THAN FIVE MINUTES THE STAIRCASE GROANED\n"
        "84-121123-0002 A CORRUPT RECORDING\n84-121123-0003 A LINE WITHOUT ITS RECORDING\n"
        "84-121123-0010 TEN COMES AFTER ONE\n")
    other = root / "dev-clean" / "174" / "50561"
    sources["174-50561-0000"] = _audio(other / "174-50561-0000.flac", 700)
    _audio(other / "174-50561-0001.flac", 800)  # no transcript line
    (other / "174-50561.trans.txt").write_text("174-50561-0000 forgotten too the name of gillian\n")
    test = root / "test-clean" / "61" / "70968"
    sources["61-70968-0000"] = _audio(test / "61-70968-0000.wav", 900)  # (converted to WAV: any audio format reads)
    (test / "61-70968.trans.txt").write_text("61-70968-0000 HE BEGAN A CONFUSED COMPLAINT\n")

    out = tmp_path / "out"
    args = ["--root", str(root), "--val", "dev-clean", "--test", "test-clean", "--workers", "2"]
    assert _convert("librispeech", out, *args) == 0
    val, test_samples = _raw(out, "val"), _raw(out, "test")
    assert [s["__key__"] for s in val] == ["84-121123-0000", "84-121123-0001", "84-121123-0010", "174-50561-0000"]
    assert [s["__key__"] for s in test_samples] == ["61-70968-0000"] and "wav" in test_samples[0]
    transcripts = {"84-121123-0000": "GO DO YOU HEAR", "174-50561-0000": "forgotten too the name of gillian"}
    for sample in val:
        assert sample["flac"] == sources[sample["__key__"]].read_bytes()  # the recording as found
        text, info = _text(sample)
        speaker, chapter_id, _ = sample["__key__"].split("-")
        assert info == {"speaker": speaker, "chapter": chapter_id, "utterance": sample["__key__"], "transcript": text}
        assert text == transcripts.get(sample["__key__"], text)  # as written, upper or lower case
        audio = decode_sample(sample, ("audio",))["flac"]
        assert audio.sample_rate == RATE and audio.samples.shape == (round(0.2 * RATE),)
    skipped = _skipped(out, "val")
    assert len(skipped) == 3 and not (out / "test-skipped.jsonl").exists()
    assert skipped["dev-clean/84/121123/84-121123-0002.flac"].startswith("FFmpeg cannot decode it")
    assert skipped["dev-clean/174/50561/174-50561-0001.flac"].startswith("no transcript: no line 174-50561-0001")
    assert skipped[f"{chapter / '84-121123.trans.txt'} line 4"].startswith("no recording of 84-121123-0003")
    assert "val: 4 samples in 3 shard(s)" in capsys.readouterr().out  # (5 planned in shards of 2, one corrupt)
    _rerun_is_identical("librispeech", out, args, capsys)

    subset = tmp_path / "subset"  # one subset's folder as --root: the same shards
    assert _convert("librispeech", subset, "--root", str(root / "dev-clean"), "--split", "val") == 0
    assert _shards(subset) == {k: v for k, v in _shards(out).items() if k.startswith("val")}
    assert _convert("librispeech", tmp_path / "x", "--root", str(root)) == 2
    assert "name its subsets with --train/--val/--test (its folders: dev-clean, test-clean)" in capsys.readouterr().err


def test_clotho_captions_become_one_sample_per_clip(tmp_path, capsys):
    audio = tmp_path / "development"
    sources = {name: _audio(audio / name, 300 + 100 * i) for i, name in
               enumerate(["Birds at dawn.wav", "rain, on a roof.wav", "train.passing.flac"])}
    (audio / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnothing after")  # corrupt
    table = tmp_path / "clotho_captions_development.csv"
    with table.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", *(f"caption_{i}" for i in range(1, 6))])
        for name in [*sources, "broken.wav", "gone.wav"]:
            writer.writerow([name, *(f"{name.split('.')[0]}, caption {i}  with  spaces" for i in range(1, 6))])
    out = tmp_path / "out"
    args = ["--csv", str(table), "--audio", str(audio), "--split", "train", "--workers", "2"]
    assert _convert("clotho", out, *args) == 0
    samples = _raw(out, "train")
    assert [json.loads(s["json"])["file"] for s in samples] == list(sources)
    for sample, (name, path) in zip(samples, sources.items()):
        assert sample[path.suffix[1:]] == path.read_bytes()
        text, info = _text(sample)
        assert info["captions"] == [f"{name.split('.')[0]}, caption {i} with spaces" for i in range(1, 6)]
        assert text == info["captions"][0]
        assert decode_sample(sample, ("audio",))[path.suffix[1:]].samples.shape == (round(0.2 * RATE),)
    skipped = _skipped(out, "train")
    assert len(skipped) == 2
    assert skipped[f"{table} line 5"].startswith("FFmpeg cannot decode it")
    assert skipped[f"{table} line 6"].startswith("cannot read the audio")
    _rerun_is_identical("clotho", out, args, capsys)


def test_audiocaps_rows_are_grouped_by_clip_and_long_clips_are_skipped(tmp_path):
    audio = tmp_path / "audiocaps"
    _audio(audio / "abc123.flac", 500)
    _audio(audio / "long_one.wav", 600, seconds=0.5)
    table = tmp_path / "train.csv"
    table.write_text("audiocap_id,youtube_id,start_time,caption\n"
                     "91,abc123,30,A dog barks\n92,long_one,0,Wind blows\n93,abc123,30,A dog barks twice\n"
                     "94,nowhere,10,Nobody downloaded this one\n")
    out = tmp_path / "out"
    assert _convert("clotho", out, "--csv", str(table), "--audio", str(audio), "--file-column", "youtube_id",
                    "--caption-columns", "caption", "--max-seconds", "0.3") == 0
    (sample,) = _raw(out, "train")
    assert _text(sample) == ("A dog barks", {"file": "abc123.flac", "captions": ["A dog barks", "A dog barks twice"]})
    skipped = _skipped(out, "train")
    assert "more than the limit of 0.3 s" in skipped[f"{table} line 3"]
    assert skipped[f"{table} line 5"].startswith("no file nowhere.{flac,mp3,ogg,wav}")

    pattern = tmp_path / "pattern"  # a file name built from the row's columns
    assert _convert("clotho", pattern, "--csv", str(table), "--audio", str(audio), "--file-pattern", "{youtube_id}.flac",
                    "--caption-columns", "caption") == 0
    assert [s["flac"] for s in _raw(pattern, "train")] == [sample["flac"]]
    assert _skipped(pattern, "train")[f"{table} line 3"].startswith("cannot read the audio")


def _msrvtt(root: Path) -> tuple[Path, dict[str, Path]]:
    videos = root / "TrainValVideo"
    sources = {f"video{i}": _clip(videos / f"video{i}.mp4", 30 * i) for i in (0, 1, 2, 3, 10)}
    (videos / "video4.mp4").write_bytes(b"\x00\x00\x00\x18ftypisomcorrupt")  # corrupt; video5's file is missing
    splits = {0: "train", 1: "train", 2: "validate", 3: "test", 4: "train", 5: "train", 10: "train"}
    sentences = [{"video_id": f"video{i}", "caption": f"clip {i} caption {n}", "sen_id": 100 * i + n}
                 for i in splits for n in (2, 0, 1)]  # (not in sen_id order)
    sentences.append({"video_id": "video99", "caption": "a video the file does not list", "sen_id": 9999})
    annotations = root / "train_val_videodatainfo.json"
    annotations.write_text(json.dumps({
        "info": {}, "sentences": sentences,
        "videos": [{"video_id": f"video{i}", "split": s, "category": i % 3, "id": i} for i, s in splits.items()]}))
    return annotations, sources


def test_msrvtt_clips_are_written_in_their_splits_with_all_captions(tmp_path, capsys):
    annotations, sources = _msrvtt(tmp_path)
    out = tmp_path / "out"
    args = ["--annotations", str(annotations), "--videos", str(tmp_path / "TrainValVideo"), "--workers", "2"]
    assert _convert("msrvtt", out, *args) == 0
    written = {split: _raw(out, split) for split in ("train", "val", "test")}
    assert {split: [s["__key__"] for s in samples] for split, samples in written.items()} == {
        "train": ["video0", "video1", "video10"], "val": ["video2"], "test": ["video3"]}
    for sample in (s for samples in written.values() for s in samples):
        i = int(sample["__key__"][5:])
        assert sample["mp4"] == sources[sample["__key__"]].read_bytes()
        assert _text(sample) == (f"clip {i} caption 0", {"video_id": sample["__key__"], "category": i % 3,
                                                         "captions": [f"clip {i} caption {n}" for n in range(3)]})
        assert decode_sample(sample, ("video",))["mp4"].frames.shape == (4, 32, 32, 3)
    skipped = _skipped(out, "train")
    assert set(skipped) == {f"{annotations} videos[4]", f"{annotations} videos[5]", f"{annotations} sentences[21]"}
    assert "FFmpeg cannot decode it" in skipped[f"{annotations} videos[4]"]
    assert skipped[f"{annotations} videos[5]"].startswith("cannot read the video")
    assert skipped[f"{annotations} sentences[21]"] == "video_id 'video99' is not in the files' videos"
    assert not _skipped(out, "val") and not _skipped(out, "test")
    _rerun_is_identical("msrvtt", out, args, capsys)


def test_a_video_folder_with_a_captions_table_becomes_shards_with_a_seeded_val_split(tmp_path, capsys):
    videos = tmp_path / "clips"
    sources = {name: _clip(videos / name, 50 * i) for i, name in enumerate(["a.mp4", "b.mp4", "sub/c.mp4", "d.mp4"])}
    (videos / "broken.mp4").write_bytes(b"not a video")  # corrupt
    _clip(videos / "uncaptioned.mp4", 200)
    (videos / "notes.txt").write_text("not a clip: ignored")
    table = tmp_path / "captions.tsv"
    table.write_text("file\tcaption\na.mp4\ta red square\nb.mp4\tgrey  frames\nsub/c.mp4\tdark frames\n"
                     "a.mp4\tsomething red\nd.mp4\tlight frames\nbroken.mp4\tbroken\ngone.mp4\tnever downloaded\n"
                     "b.mp4\t\n")
    out = tmp_path / "out"
    args = ["--videos", str(videos), "--captions", str(table), "--val-fraction", "0.3", "--workers", "2"]
    assert _convert("video-folder", out, *args) == 0
    train, val = _raw(out, "train"), _raw(out, "val")
    planned = ["a.mp4", "b.mp4", "broken.mp4", "d.mp4", "gone.mp4", "sub/c.mp4"]  # the captioned clips, in path order
    held = {planned[i] for i in random.Random(0).sample(range(6), round(6 * 0.3))}  # --seed 0's val split
    assert [json.loads(s["json"])["file"] for s in val] == [f for f in planned if f in held and f in sources]
    assert [json.loads(s["json"])["file"] for s in train] == [f for f in planned if f not in held and f in sources]
    captions = {"a.mp4": ["a red square", "something red"], "b.mp4": ["grey frames"], "sub/c.mp4": ["dark frames"],
                "d.mp4": ["light frames"]}
    for sample in train + val:
        text, info = _text(sample)
        assert sample["mp4"] == sources[info["file"]].read_bytes()
        assert info["captions"] == captions[info["file"]] and text == info["captions"][0]
        assert decode_sample(sample, ("video",))["mp4"].frames.shape == (4, 32, 32, 3)
    skipped = {**_skipped(out, "train"), **_skipped(out, "val")}
    assert set(skipped) == {f"{table} line 7", f"{table} line 8", f"{table} line 9", "uncaptioned.mp4"}
    assert "not MP4" in skipped[f"{table} line 7"] and skipped[f"{table} line 8"].startswith("cannot read the video")
    assert skipped[f"{table} line 9"] == "empty 'caption'" and skipped["uncaptioned.mp4"].startswith("no caption")
    _rerun_is_identical("video-folder", out, args, capsys)
