"""Spoken and moving Sort-of-CLEVR: speech for questions and a caption, and a clip of the scene in motion.

Extends :mod:`mmlit.data.sort_of_clevr` (Santoro et al. 2017, arXiv:1706.01427). Every sample stays a pure function
of ``(seed, split, index)``: speech and motion draw from streams of their own, so ``--spoken`` alone and
``--spoken --video`` say the same words, and the image and questions are those of the plain data set (unless a scene
cannot move: then the clip draws another scene and the sample describes that one).

Speech (``--spoken``), by espeak-ng: each word is synthesised once per (voice, speed, pitch) in the process that
generates (one espeak-ng call says the whole vocabulary, a sentence a word, split at its pauses) and words are joined
with random pauses, so the word boundaries are exact. 32 voices (8 accents x 4 variants), 3 speeds and 3 pitches,
a random tempo (+-6%, by resampling) and gain: a model has to hear words, not recognise a few recordings. 16 kHz
mono FLAC. Entries: ``question0.flac`` ... (the spoken questions, 2 non-relational and 2 relational by default,
taken from the image's 20) and ``flac``: a spoken caption that names three of the six objects,
``red circle top left , blue square bottom right , gray square top right``. Three objects (12 words, about 5 s)
keep the audio small and still tell images apart: another image fits such a caption with probability about 1/512
(shape 1/2, quadrant 1/4 for each named colour), half an image in a 250-image gallery (two objects, 1/64, would
leave four images that fit; six objects would double the audio).

Video (``--video``): ``mp4``, 8 frames (8 fps) of the scene in which four objects move at constant velocities
(clearly along one axis, 7 to 24.5 px over the clip, the fastest 3 px ahead of the next) and two stay still;
objects stay inside the frame and never overlap, at any time of the clip. Frame 0 is the ``png``. H.264 in
yuv444p at the image's 75x75: no chroma subsampling to smear 10-pixel objects' colours, no padding to crop
(yuv420p needs even sizes); PyAV and ffmpeg decode it (browsers do not play 4:4:4). The bytes are reproducible:
RGB to YUV (BT.601, limited range) in numpy (swscale's conversion of a 75-pixel row is not deterministic), one
x264 thread and no macroblock tree (x264's mbtree with its assembly gave two different streams for one clip).
Bytes are the same for the same espeak-ng and FFmpeg (PyAV's wheel); another version of either may change them.

JSON keys added: ``spoken_questions`` (the ``questions`` entries plus audio entry, word times, voice, speed,
pitch, tempo, duration), ``spoken_caption``, ``motion`` (per object: colour, shape, x0, y0, vx, vy in pixels per
frame), ``motion_questions`` (direction, fastest, closest_end) and ``motion_caption``. Answers of the motion
questions: ``MOTION_ANSWERS`` (written as ``motion_answers.json`` beside the shards).

Measured on a 2-core machine shared with other jobs (``--workers 2``): ``--spoken --video`` makes 200 images in 9 s
and 1,000 in 28 s (each process first fills its word cache: 288 voice settings x 31 words, 21 ms of espeak-ng a
setting, about 100 MB). An image is 287 KB: 275 KB of speech (20 s at 14 KB/s: 43 KB a non-relational question,
60 KB a relational one, 68 KB the caption), 9 KB of JSON, 3 KB of mp4, 0.4 KB of png. The ``spoken`` preset (2,500
images): 62 s and 700 MB. ``--video`` alone: 10 KB an image, the quickstart preset (4,500 images) in 23 s, 45 MB.
"""

from __future__ import annotations

import contextlib
import functools
import io
import itertools
import json
import math
import multiprocessing
import re
import shutil
import subprocess
from pathlib import Path
from typing import Callable, Iterator, Literal

import numpy as np

from mmlit.data import sort_of_clevr as soc

__all__ = ["MOTION_ANSWERS", "MOTION_TYPES", "DIRECTIONS", "VOICES", "SPEEDS", "PITCHES", "SAMPLE_RATE", "FRAMES",
           "PRESETS", "require_espeak", "make_av_sample", "write_dataset"]

SAMPLE_RATE = 16_000
_ESPEAK_RATE = 22_050
# "en" is British English: "en-gb+f2" ignores its variant (espeak-ng 1.51).
VOICES = tuple(accent + variant
               for accent in ("en", "en-us", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-us-nyc", "en-gb-x-gbclan",
                              "en-gb-x-gbcwmd")
               for variant in ("", "+m3", "+f2", "+f4"))
SPEEDS = (175, 210, 245)  # espeak-ng words per minute
PITCHES = (35, 50, 65)  # espeak-ng 0-99
_TEMPO = (0.94, 1.06)  # resampling jitter: scales an utterance's tempo and pitch together
_PAUSE = (0.03, 0.15)  # seconds between words
_PHRASE_PAUSE = (0.15, 0.3)  # between the caption's objects
_EDGE = (0.05, 0.15)  # before the first word and after the last
_PEAK_DBFS = (-24.0, -6.0)  # random gain; quieter is also smaller: FLAC spends a bit a sample per 6 dB
_TRIM = 0.03  # a word spans the 5 ms frames louder than 3% of its loudest (-30 dB)
_FADE = 44  # samples (2 ms at 22,050 Hz) faded in and out at a trimmed word's edges
_GAP_FRAMES = 60  # 300 ms of quiet (espeak-ng's level below 50 / 32,768) separate the batch's words
CAPTION_OBJECTS = 3

FRAMES = 8
FPS = 8
_STILL = 2
_TRAVEL = (7.0, 24.5)  # pixels a moving object travels over the clip
_FASTEST_MARGIN = 3.0  # pixels over the clip between the fastest object and the next
_DRIFT = 0.15  # off-axis speed, at most this fraction of the on-axis speed
_END_MARGIN = 2.0  # pixels between the closest object and the next at the last frame
_GAP = 3 * soc.OBJECT_HALF_SIZE  # centre distance that make_scene keeps
DIRECTIONS = ("left", "right", "up", "down", "still")
MOTION_TYPES = ("direction", "fastest", "closest_end")
MOTION_ANSWERS = (*soc.ANSWERS, *soc.COLOURS, "up", "down", "still")  # "left" and "right" are in ANSWERS
_MOTION_TEMPLATES = {
    "direction": "which way does the {c} object move?",
    "fastest": "which object moves fastest?",
    "closest_end": "which object is closest to the {c} object at the end?",
}
_STREAMS = {"speech": 1, "motion": 2}
# Speech is about 0.3 MB an image: fewer training images than the quickstart's 4,000, the same val and test.
PRESETS = {"spoken": {"train": 2000, "val": 250, "test": 250}}


def _stream(seed: int, split: str, index: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, soc.SPLITS.index(split), index, _STREAMS[name]])


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


# Every word the questions and captions use (the generator's own templates); one outside it is synthesised alone.
_VOCABULARY = tuple(sorted({w for template in soc.TEMPLATES.values() for c in soc.COLOURS
                            for w in _words(template.format(c=c))}
                           | {*soc.SHAPES, "top", "bottom", "left", "right"}))


# ---------------------------------------------------------------------------------------------------------- speech

def require_espeak() -> str:
    """The path of espeak-ng, or an error that says how to install it."""
    path = shutil.which("espeak-ng")
    if path is None:
        raise FileNotFoundError("--spoken needs espeak-ng, which is not installed: `apt-get install espeak-ng` "
                                "(or `bash tools/setup.sh` as root)")
    return path


def _espeak(text: str, voice: str, speed: int, pitch: int, ssml: bool = False) -> np.ndarray:
    """espeak-ng's speech for ``text`` (our templates' words only): (N,) float32 at 22,050 Hz."""
    args = [require_espeak(), "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", *(["-m"] if ssml else []),
            text]
    wav = subprocess.run(args, capture_output=True, check=True).stdout  # an argument list: no shell
    rate = int.from_bytes(wav[24:28], "little")
    if wav[:4] != b"RIFF" or rate != _ESPEAK_RATE:
        raise OSError(f"espeak-ng {' '.join(args[1:-1])}: expected a {_ESPEAK_RATE} Hz WAV, got {wav[:4]!r} at {rate}")
    data = wav.index(b"data") + 8  # the sizes in a --stdout header are placeholders: read to the end
    return np.frombuffer(wav[data:len(wav) - (len(wav) - data) % 2], "<i2").astype(np.float32) / 32768


def _frame_rms(x: np.ndarray, frame: int = 110) -> np.ndarray:  # (N,) -> (N // frame,): 5 ms frames
    n = len(x) // frame
    return np.sqrt(np.mean(x[:n * frame].reshape(n, frame) ** 2, axis=1))


def _trim(x: np.ndarray) -> np.ndarray:
    """The word without its leading and trailing silence, faded in and out over 2 ms; int16."""
    rms = _frame_rms(x)
    loud = np.flatnonzero(rms > _TRIM * rms.max())
    word = x[loud[0] * 110:(loud[-1] + 1) * 110].copy()
    fade = np.linspace(0, 1, _FADE, dtype=np.float32)
    word[:_FADE] *= fade
    word[-_FADE:] *= fade[::-1]
    return np.round(word * 32767).astype(np.int16)  # int16 halves the cache


def _split(x: np.ndarray, count: int) -> list[np.ndarray] | None:
    """The ``count`` words of one batch, cut at its long pauses; None when there are not exactly ``count``."""
    loud = np.flatnonzero(_frame_rms(x) >= 50 / 32768)
    if len(loud) == 0:
        return None
    cuts = np.flatnonzero(np.diff(loud) > _GAP_FRAMES)
    starts, ends = loud[np.r_[0, cuts + 1]], loud[np.r_[cuts, len(loud) - 1]]
    return [x[a * 110:(b + 1) * 110] for a, b in zip(starts, ends)] if len(starts) == count else None


@functools.lru_cache(maxsize=None)
def _word_bank(voice: str, speed: int, pitch: int) -> dict[str, np.ndarray]:
    """Every word of the vocabulary in one voice, trimmed, at 22,050 Hz (int16). One espeak-ng call says them all,
    each as a sentence of its own with a pause after it (13x faster than a call per word); if the pauses do not cut
    it into exactly the words, a call per word. Either way a word's audio depends on its voice only, never on
    what this process generated before: samples stay pure functions of their index under any pool."""
    batch = _espeak("".join(f'{w}.<break time="500ms"/>' for w in _VOCABULARY), voice, speed, pitch, ssml=True)
    pieces = _split(batch, len(_VOCABULARY)) or [_espeak(w, voice, speed, pitch) for w in _VOCABULARY]
    return {w: _trim(p) for w, p in zip(_VOCABULARY, pieces)}


@functools.lru_cache(maxsize=None)
def _lone_word(word: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    return _trim(_espeak(word, voice, speed, pitch))


def _resample(x: np.ndarray, rate: int) -> np.ndarray:
    """(N,) float32 at ``rate`` Hz -> 16 kHz, by libswresample (PyAV): 8x faster here than a windowed sinc in numpy."""
    av = _av()
    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    frame = av.AudioFrame.from_ndarray(x[None, :], format="flt", layout="mono")
    frame.sample_rate = rate
    return np.concatenate([f.to_ndarray()[0] for f in (*resampler.resample(frame), *resampler.resample(None))])


def _speak(words: list[str], rng: np.random.Generator, phrase_starts: frozenset[int] = frozenset()) -> tuple:
    """``words`` said by a random voice: 16 kHz int16 samples, the words' times and how it was said."""
    voice, speed, pitch = (VOICES[rng.integers(len(VOICES))], SPEEDS[rng.integers(len(SPEEDS))],
                           PITCHES[rng.integers(len(PITCHES))])
    # espeak-ng's 22,050 Hz samples played at ``rate``: the tempo and the pitch scale together
    rate = round(_ESPEAK_RATE * rng.uniform(*_TEMPO))
    peak = 10 ** (rng.uniform(*_PEAK_DBFS) / 20)
    bank = _word_bank(voice, speed, pitch)
    pieces, times, at = [], [], 0
    for i, word in enumerate(words):
        pause = round(rng.uniform(*(_EDGE if i == 0 else _PHRASE_PAUSE if i in phrase_starts else _PAUSE)) * rate)
        audio = bank[word] if word in bank else _lone_word(word, voice, speed, pitch)
        pieces += [np.zeros(pause, np.int16), audio]
        at += pause
        times.append({"word": word, "start": round(at / rate, 4), "end": round((at + len(audio)) / rate, 4)})
        at += len(audio)
    pieces.append(np.zeros(round(rng.uniform(*_EDGE) * rate), np.int16))
    samples = _resample(np.concatenate(pieces).astype(np.float32) / 32768, rate)
    pcm = np.round(samples * (peak * 32767 / np.abs(samples).max())).astype(np.int16)
    how = {"voice": voice, "speed": int(speed), "pitch": int(pitch), "tempo": round(rate / _ESPEAK_RATE, 4),
           "duration": round(len(pcm) / SAMPLE_RATE, 4)}
    return pcm, times, how


def _av():
    try:
        import av
    except ImportError as err:
        raise ImportError("spoken and moving Sort-of-CLEVR encode with PyAV: `pip install av`") from err
    return av


def _flac(pcm: np.ndarray) -> bytes:
    """16 kHz mono s16 FLAC; bit-exact (no encoder version in the bytes)."""
    av = _av()
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="flac", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("flac", rate=SAMPLE_RATE,
                                      options={"flags": "+bitexact", "compression_level": "8"})
        stream.layout, stream.format = "mono", "s16"
        frame = av.AudioFrame.from_ndarray(pcm[None, :], format="s16", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        for packet in (*stream.encode(frame), *stream.encode(None)):
            container.mux(packet)
    return buffer.getvalue()


def _spoken(annotations: dict, rng: np.random.Generator, count: int) -> tuple[dict, dict]:
    """The spoken questions' and caption's entries, and the JSON that describes them."""
    plain = [q for q in annotations["questions"] if not q["relational"]]
    relational = [q for q in annotations["questions"] if q["relational"]]
    n_plain = (count + 1) // 2
    if n_plain > len(plain) or count - n_plain > len(relational):
        raise ValueError(f"--spoken-questions: at most {2 * min(len(plain), len(relational))}, got {count}")
    chosen = ([plain[i] for i in rng.choice(len(plain), n_plain, replace=False)]
              + [relational[i] for i in rng.choice(len(relational), count - n_plain, replace=False)])
    entries, spoken = {}, []
    for i, question in enumerate(chosen):
        pcm, times, how = _speak(_words(question["question"]), rng)
        entries[f"question{i}.flac"] = _flac(pcm)
        spoken.append({**question, "audio": f"question{i}.flac", "words": times, **how})
    named = sorted(rng.choice(len(annotations["objects"]), CAPTION_OBJECTS, replace=False))
    phrases = [soc.caption_for([soc.SceneObject(**annotations["objects"][i])]) for i in named]
    starts = frozenset(itertools.accumulate(len(phrase.split()) for phrase in phrases[:-1]))  # a longer pause there
    pcm, times, how = _speak(" ".join(phrases).split(), rng, starts)
    entries["flac"] = _flac(pcm)
    caption = {"text": " , ".join(phrases), "audio": "flac", "words": times, **how}
    return entries, {"spoken_questions": spoken, "spoken_caption": caption}


# ---------------------------------------------------------------------------------------------------------- motion

def _apart(a: tuple, b: tuple, span: int) -> bool:
    """Whether two objects ((x, y), (vx, vy)) keep ``_GAP`` between centres all clip long, between frames too."""
    dp = np.subtract(a[0], b[0])
    dv = np.subtract(a[1], b[1])
    speed2 = float(dv @ dv)
    t = 0.0 if speed2 == 0 else float(np.clip(-(dp @ dv) / speed2, 0, span))
    return math.hypot(*(dp + t * dv)) >= _GAP


def _velocities(objects: list[soc.SceneObject], rng: np.random.Generator, frames: int) -> list[tuple] | None:
    """Velocities (px per frame) for the scene: two objects still, the others each along an axis (a little drift),
    inside the frame and apart all clip long, the fastest ahead by a margin; None if 50 tries find none."""
    span, n = frames - 1, len(objects)
    lo, hi = soc.OBJECT_HALF_SIZE, soc.IMAGE_SIZE - soc.OBJECT_HALF_SIZE
    for _ in range(50):
        travel = np.sort(rng.uniform(*_TRAVEL, size=n - _STILL))[::-1]
        if travel[0] - travel[1] < _FASTEST_MARGIN * 1.05:  # (drift changes speeds by up to 1.1%)
            continue
        order = rng.permutation(n)
        velocity = {int(i): (0.0, 0.0) for i in order[n - _STILL:]}
        for i, distance in zip(order[:n - _STILL], travel):
            o, speed = objects[i], distance / span
            for direction in rng.permutation(4):
                along, across = speed * (-1 if direction in (0, 2) else 1), speed * rng.uniform(-_DRIFT, _DRIFT)
                v = (round(along, 3), round(across, 3)) if direction < 2 else (round(across, 3), round(along, 3))
                end = (o.x + v[0] * span, o.y + v[1] * span)
                if lo <= end[0] <= hi and lo <= end[1] <= hi and all(
                        _apart(((o.x, o.y), v), ((objects[j].x, objects[j].y), velocity[j]), span) for j in velocity):
                    velocity[int(i)] = v
                    break
            else:
                break
        else:
            speeds = sorted(math.hypot(*v) for v in velocity.values())
            if (speeds[-1] - speeds[-2]) * span >= _FASTEST_MARGIN:
                return [velocity[i] for i in range(n)]
    return None


def _direction(vx: float, vy: float) -> str:
    if vx == vy == 0:
        return "still"
    if abs(vx) >= abs(vy):
        return "left" if vx < 0 else "right"
    return "up" if vy < 0 else "down"  # image rows grow downwards


def _motion_json(objects: list[soc.SceneObject], velocity: list[tuple], rng: np.random.Generator,
                 frames: int) -> dict:
    """The ``motion`` annotations and six questions: three of direction (a random answer first, then an object that
    has it: the five answers come about equally often), fastest, and two of closest_end (only subjects whose
    closest object at the end leads the next by ``_END_MARGIN`` px; direction questions where fewer)."""
    colours = [o.colour for o in objects]
    directions = [_direction(*v) for v in velocity]
    ends = [(o.x + v[0] * (frames - 1), o.y + v[1] * (frames - 1)) for o, v in zip(objects, velocity)]

    def question(qtype: str, answer: str, subject: str = "") -> dict:
        return {"question": _MOTION_TEMPLATES[qtype].format(c=subject), "answer": answer, "type": qtype,
                "relational": False}

    closest = {}
    for i, c in enumerate(colours):
        dist = sorted((math.dist(ends[i], ends[j]), j) for j in range(len(objects)) if j != i)
        if dist[1][0] - dist[0][0] >= _END_MARGIN:
            closest[c] = colours[dist[0][1]]
    closers = [list(closest)[i] for i in rng.choice(len(closest), min(2, len(closest)), replace=False)]
    questions, asked = [], set()
    for _ in range(3 + 2 - len(closers)):
        target = DIRECTIONS[rng.integers(len(DIRECTIONS))]
        left = [i for i in range(len(objects)) if i not in asked]
        # an answer that no object has: a moving object instead (two objects are always still)
        pool = ([i for i in left if directions[i] == target] or [i for i in left if directions[i] != "still"]
                or left)
        i = pool[rng.integers(len(pool))]
        asked.add(i)
        questions.append(question("direction", directions[i], colours[i]))
    fastest = max(range(len(objects)), key=lambda i: math.hypot(*velocity[i]))
    questions.append(question("fastest", colours[fastest]))
    questions += [question("closest_end", closest[c], c) for c in closers]
    return {
        "motion": [{"colour": o.colour, "shape": o.shape, "x0": o.x, "y0": o.y, "vx": v[0], "vy": v[1]}
                   for o, v in zip(objects, velocity)],
        "motion_questions": questions,
        "motion_caption": " , ".join(f"{c} is still" if d == "still" else f"{c} moves {d}"
                                     for c, d in zip(colours, directions)),
    }


def _clip(objects: list[soc.SceneObject], velocity: list[tuple], frames: int) -> np.ndarray:  # (T, H, W, 3) uint8
    return np.stack([np.asarray(soc.render([soc.SceneObject(o.colour, o.shape, o.x + v[0] * t, o.y + v[1] * t)
                                            for o, v in zip(objects, velocity)])) for t in range(frames)])


_YUV = np.array([[65.481, 128.553, 24.966], [-37.797, -74.203, 112.0], [112.0, -93.786, -18.214]]) / 255


def _mp4(clip: np.ndarray, crf: int = 18) -> bytes:
    """H.264 (libx264, yuv444p, ``crf``) in MP4 at ``FPS``; the same clip gives the same bytes."""
    av = _av()
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("libx264", rate=FPS, options={
            "crf": str(crf), "preset": "medium", "threads": "1", "x264-params": "mbtree=0", "flags": "+bitexact"})
        stream.height, stream.width = clip.shape[1:3]
        stream.pix_fmt = "yuv444p"
        for t, rgb in enumerate(clip):
            yuv = np.einsum("hwc,kc->khw", rgb.astype(np.float64), _YUV) + np.array([16, 128, 128])[:, None, None]
            frame = av.VideoFrame(clip.shape[2], clip.shape[1], "yuv444p")
            for plane, values in zip(frame.planes, np.clip(np.round(yuv), 0, 255).astype(np.uint8)):
                # every byte of the row, its padding too: nothing uninitialised reaches the encoder
                plane.update(np.pad(values, ((0, 0), (0, plane.line_size - values.shape[1])), mode="edge").tobytes())
            frame.pts = t
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------- samples

def make_av_sample(seed: int, split: str, index: int, *, spoken: bool = True, video: bool = True,
                   spoken_questions: int = 4, frames: int = FRAMES,
                   image_format: Literal["png", "jpg"] = "png") -> dict:
    """``sort_of_clevr.make_sample``'s sample with speech (``question{i}.flac``, ``flac``) and a clip (``mp4``)."""
    sample = soc.make_sample(seed, split, index, image_format)
    annotations = json.loads(sample["json"])
    if video:
        rng = _stream(seed, split, index, "motion")
        objects = [soc.SceneObject(**o) for o in annotations["objects"]]
        while (velocity := _velocities(objects, rng, frames)) is None:  # too crowded to move: another scene
            objects = soc.make_scene(rng)
            sample = soc.make_sample(seed, split, index, image_format, objects=objects)
            annotations = json.loads(sample["json"])
        annotations.update(_motion_json(objects, velocity, rng, frames))
        sample["mp4"] = _mp4(_clip(objects, velocity, frames))
    if spoken:
        entries, described = _spoken(annotations, _stream(seed, split, index, "speech"), spoken_questions)
        sample.update(entries)
        annotations.update(described)
    sample["json"] = json.dumps(annotations).encode()
    return sample


@contextlib.contextmanager
def _mapper(workers: int) -> Iterator[Callable]:
    """``map`` in order, over ``workers`` processes (each with its own word cache) when more than one."""
    if workers <= 1:
        yield map
        return
    with multiprocessing.get_context().Pool(workers) as pool:
        yield functools.partial(pool.imap, chunksize=4)


def write_dataset(out: str | Path, sizes: dict[str, int], *, seed: int = 0, shard_size: int = 500,
                  image_format: Literal["png", "jpg"] = "png", spoken: bool = True, video: bool = True,
                  spoken_questions: int = 4, frames: int = FRAMES, workers: int = 1) -> dict[str, list[str]]:
    """Every split in ``sizes`` with speech and/or video, samples made by ``workers`` processes (the bytes do not
    depend on how many); with video, ``{out}/motion_answers.json`` too."""
    if spoken:
        require_espeak()
    _av()
    if not 1 <= spoken_questions <= 20:
        raise ValueError(f"--spoken-questions: between 1 and 20 (the image's questions), got {spoken_questions}")
    if frames < 2:
        raise ValueError(f"--frames: at least 2, got {frames}")
    options = dict(spoken=spoken, video=video, spoken_questions=spoken_questions, frames=frames,
                   image_format=image_format)
    with _mapper(workers) as imap:
        shards = {split: soc.write_split(out, split, n, seed=seed, shard_size=shard_size, image_format=image_format,
                                         samples=imap(functools.partial(make_av_sample, seed, split, **options),
                                                      range(n)))
                  for split, n in sizes.items()}
    if video:
        (Path(out) / "motion_answers.json").write_text(json.dumps(list(MOTION_ANSWERS)) + "\n")
    return shards
