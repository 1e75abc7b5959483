import io
import json
import math
import shutil

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from mmlit.cli import main
from mmlit.data import sort_of_clevr as soc
from mmlit.data import sort_of_clevr_av as sav

av = pytest.importorskip("av")
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
PALETTE = np.array([(255, 255, 255), *soc.COLOURS.values()])  # white first


@pytest.fixture(scope="module")
def sample():
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    return sav.make_av_sample(0, "val", 3)


def _annotations(sample: dict) -> dict:
    return json.loads(sample["json"])


def _decode_audio(data: bytes) -> tuple[np.ndarray, int, int]:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        samples = np.concatenate([f.to_ndarray() for f in container.decode(stream)], axis=1)
        return samples, stream.rate, stream.codec_context.channels


def _decode_video(data: bytes) -> np.ndarray:  # (T, H, W, 3)
    with av.open(io.BytesIO(data)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@needs_espeak
def test_bytes_are_a_pure_function_of_the_index_whatever_the_cache_holds(sample):
    sav._word_bank.cache_clear()
    fresh = sav.make_av_sample(0, "val", 3)
    assert fresh == sample
    assert sav.make_av_sample(0, "val", 4) != sample


@needs_espeak
def test_the_plain_sample_is_kept(sample):
    plain = soc.make_sample(0, "val", 3)
    annotations, original = _annotations(sample), json.loads(plain["json"])
    assert sample["png"] == plain["png"]
    assert {k: annotations[k] for k in original} == original
    assert set(sample) == {"__key__", "png", "json", "mp4", "flac", *(f"question{i}.flac" for i in range(4))}


@needs_espeak
def test_speech_decodes_to_16khz_mono_with_exact_word_times(sample):
    annotations = _annotations(sample)
    spoken = annotations["spoken_questions"]
    assert [q["relational"] for q in spoken] == [False, False, True, True]
    for q in spoken:  # the VQA task reads these as it reads json.questions
        assert {k: q[k] for k in ("question", "answer", "type", "relational")} in annotations["questions"]
        assert q["answer"] in soc.ANSWERS
    for entry in [*spoken, annotations["spoken_caption"]]:
        audio, rate, channels = _decode_audio(sample[entry["audio"]])
        assert (rate, channels, audio.shape[0]) == (sav.SAMPLE_RATE, 1, 1)
        audio = audio[0].astype(np.float64)
        assert abs(len(audio) / rate - entry["duration"]) < 1e-4
        text = entry.get("question", entry.get("text"))
        assert [w["word"] for w in entry["words"]] == sav._words(text)
        times = [t for w in entry["words"] for t in (w["start"], w["end"])]
        assert times == sorted(times) and 0 < times[0] and times[-1] < entry["duration"]
        assert entry["voice"] in sav.VOICES and entry["speed"] in sav.SPEEDS and entry["pitch"] in sav.PITCHES

        def rms(a: float, b: float) -> float:
            return float(np.sqrt(np.mean(audio[round(a * rate):round(b * rate)] ** 2)))

        loud = [rms(w["start"], w["end"]) for w in entry["words"]]
        pauses = [rms(a["end"] + 0.005, b["start"] - 0.005) for a, b in zip(entry["words"], entry["words"][1:])]
        assert min(loud) > 100 * max(pauses) and min(loud) > 50


@needs_espeak
def test_a_voice_whose_batch_does_not_split_is_said_word_by_word(monkeypatch):
    batch = sav._word_bank.__wrapped__("en-029+m3", 210, 50)
    monkeypatch.setattr(sav, "_split", lambda x, count: None)
    alone = sav._word_bank.__wrapped__("en-029+m3", 210, 50)
    assert list(alone) == list(batch) == list(sav._VOCABULARY)
    for word in ("red", "closest", "the"):
        assert 0.5 < len(alone[word]) / len(batch[word]) < 2  # the same words, said apart
        assert 0.05 < len(batch[word]) / 22050 < 0.7


@needs_espeak
def test_spoken_caption_names_three_objects(sample):
    annotations = _annotations(sample)
    phrases = annotations["spoken_caption"]["text"].split(" , ")
    assert len(phrases) == sav.CAPTION_OBJECTS
    assert set(phrases) <= set(annotations["caption"].split(" , "))


def _centroids(frame: np.ndarray) -> dict[str, tuple[float, float]]:
    nearest = np.argmin(((frame[:, :, None, :].astype(int) - PALETTE) ** 2).sum(-1), axis=-1)  # (H, W)
    ys, xs = np.mgrid[:frame.shape[0], :frame.shape[1]]
    return {c: (xs[nearest == k + 1].mean(), ys[nearest == k + 1].mean()) for k, c in enumerate(soc.COLOURS)}


@needs_espeak
def test_clip_follows_the_annotated_velocities(sample):
    annotations = _annotations(sample)
    clip = _decode_video(sample["mp4"])
    assert clip.shape == (sav.FRAMES, soc.IMAGE_SIZE, soc.IMAGE_SIZE, 3)
    first = np.asarray(Image.open(io.BytesIO(sample["png"])), dtype=int)
    assert np.abs(clip[0].astype(int) - first).mean() < 1.5  # frame 0 is the image, through H.264 at crf 18
    for t, frame in enumerate(clip):
        centroids = _centroids(frame)
        for m in annotations["motion"]:
            expected = (m["x0"] + m["vx"] * t, m["y0"] + m["vy"] * t)
            assert math.dist(centroids[m["colour"]], expected) < 1.0, (t, m)


def _motion_sample(index: int) -> dict:
    return _annotations(sav.make_av_sample(1, "train", index, spoken=False))


@pytest.mark.parametrize("index", range(6))
def test_objects_stay_inside_and_apart_and_the_answers_follow(index):
    annotations = _motion_sample(index)
    motion = {m["colour"]: m for m in annotations["motion"]}
    assert [(o["x"], o["y"]) for o in annotations["objects"]] == [(m["x0"], m["y0"]) for m in motion.values()]
    for t in np.linspace(0, sav.FRAMES - 1, 57):
        at = {c: np.array([m["x0"] + m["vx"] * t, m["y0"] + m["vy"] * t]) for c, m in motion.items()}
        assert all(soc.OBJECT_HALF_SIZE <= v <= soc.IMAGE_SIZE - soc.OBJECT_HALF_SIZE for p in at.values() for v in p)
        assert min(math.dist(at[a], at[b]) for a in at for b in at if a < b) >= 3 * soc.OBJECT_HALF_SIZE - 1e-9
    assert sum(m["vx"] == m["vy"] == 0 for m in motion.values()) == 2
    speeds = sorted(((math.hypot(m["vx"], m["vy"]), c) for c, m in motion.items()), reverse=True)
    assert (speeds[0][0] - speeds[1][0]) * (sav.FRAMES - 1) >= 3.0
    end = {c: np.array([m["x0"], m["y0"]]) + (sav.FRAMES - 1) * np.array([m["vx"], m["vy"]]) for c, m in motion.items()}
    questions = annotations["motion_questions"]
    assert len(questions) == 6 and {q["type"] for q in questions} <= set(sav.MOTION_TYPES)
    for q in questions:
        assert q["answer"] in sav.MOTION_ANSWERS and not q["relational"]
        subject = next((c for c in soc.COLOURS if f" {c} " in q["question"]), None)
        if q["type"] == "direction":
            m = motion[subject]
            expected = ("still" if m["vx"] == m["vy"] == 0 else
                        ("left" if m["vx"] < 0 else "right") if abs(m["vx"]) > 5 * abs(m["vy"]) else
                        ("up" if m["vy"] < 0 else "down") if abs(m["vy"]) > 5 * abs(m["vx"]) else None)
        elif q["type"] == "fastest":
            expected = speeds[0][1]
        else:
            dist = sorted((math.dist(end[subject], end[c]), c) for c in motion if c != subject)
            assert dist[1][0] - dist[0][0] >= 2.0
            expected = dist[0][1]
        assert q["answer"] == expected, q
    assert annotations["motion_caption"].split(" , ")[0] in ("red is still", *(f"red moves {d}" for d in sav.DIRECTIONS))


def test_a_scene_that_cannot_move_is_replaced(monkeypatch):
    velocities, calls = sav._velocities, []

    def fail_once(objects, rng, frames):
        calls.append(1)
        return None if len(calls) == 1 else velocities(objects, rng, frames)

    monkeypatch.setattr(sav, "_velocities", fail_once)
    sample = sav.make_av_sample(0, "train", 0, spoken=False)
    annotations = _annotations(sample)
    assert len(calls) == 2 and sample["png"] != soc.make_sample(0, "train", 0)["png"]
    objects = [soc.SceneObject(**o) for o in annotations["objects"]]
    assert sample["png"] == soc.make_sample(0, "train", 0, objects=objects)["png"]
    assert [(m["x0"], m["y0"]) for m in annotations["motion"]] == [(o.x, o.y) for o in objects]
    frame0 = _decode_video(sample["mp4"])[0].astype(int)
    assert np.abs(frame0 - np.asarray(soc.render(objects), dtype=int)).mean() < 1.5


@needs_espeak
def test_cli_writes_the_same_shards_with_any_number_of_workers(tmp_path, capsys):
    sizes = ["--train", "3", "--val", "2", "--test", "1", "--shard-size", "2"]
    for workers in ("1", "2"):
        argv = ["data", "sort-of-clevr", "--out", str(tmp_path / workers), *sizes, "--spoken", "--video",
                "--spoken-questions", "2", "--workers", workers]
        assert main(argv) == 0
    assert "motion_answers.json" in capsys.readouterr().out
    shards = sorted(p.name for p in (tmp_path / "1").glob("*.tar"))
    assert shards == ["test-000000.tar", "train-000000.tar", "train-000001.tar", "val-000000.tar"]
    assert all((tmp_path / "1" / s).read_bytes() == (tmp_path / "2" / s).read_bytes() for s in shards)
    assert json.loads((tmp_path / "1" / "motion_answers.json").read_text()) == list(sav.MOTION_ANSWERS)
    samples = list(wds.tarfile_samples([{"url": str(tmp_path / "1" / "train-000000.tar")}]))
    assert [s["__key__"] for s in samples] == ["train0000000", "train0000001"]
    assert set(samples[0]) - {"__key__", "__url__"} == {"png", "json", "mp4", "flac", "question0.flac",
                                                         "question1.flac"}
    assert samples[0]["mp4"] == sav.make_av_sample(0, "train", 0, spoken_questions=2)["mp4"]


def test_cli_says_how_to_install_espeak(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sav.shutil, "which", lambda name: None)
    assert main(["data", "sort-of-clevr", "--out", str(tmp_path), "--train", "1", "--spoken"]) == 2
    assert "apt-get install espeak-ng" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.tar"))
