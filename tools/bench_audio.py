"""What audio costs in a DataLoader worker, per second of audio: decoding (FLAC and WAV, by PyAV), resampling
(44.1 kHz -> 16 kHz, FFmpeg's resampler) and the log-mel features (``torch.stft`` and the mel filterbank), on one
thread, and the video modality's decoding per clip.

    python tools/bench_audio.py [--seconds 10] [--repeat 20]
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmlit.modalities.audio import AudioModality, AudioTransform, decode_audio, log_mel  # noqa: E402
from mmlit.modalities.video import decode_video  # noqa: E402


def _audio(seconds: float, rate: int, fmt: str) -> bytes:
    import av

    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * rate)) / rate
    samples = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + 0.01 * rng.standard_normal(len(t))
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=fmt) as container:
        stream = container.add_stream("flac" if fmt == "flac" else "pcm_s16le", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray((samples * 32767).astype(np.int16)[None], format="s16", layout="mono")
        frame.sample_rate = rate
        for packet in (*stream.encode(frame), *stream.encode(None)):
            container.mux(packet)
    return buffer.getvalue()


def _video(frames: int, size: int) -> bytes:
    import av

    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for _ in range(frames):
            image = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def _ms(fn, repeat: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    s, n = args.seconds, args.repeat
    print(f"per second of audio, one thread ({s:g} s clips, {n} repeats):")
    for fmt, rate in (("flac", 16000), ("wav", 16000), ("flac", 44100)):
        data = _audio(s, rate, fmt)
        ms = _ms(lambda: decode_audio(fmt, data, 16000, None), n) / s
        print(f"  decode {fmt} {rate / 1000:g} kHz -> 16 kHz mono: {ms:.3f} ms")
    samples = decode_audio("flac", _audio(s, 16000, "flac"), 16000, None).samples
    print(f"  log-mel (64 mels, 25 ms window, 10 ms hop): {_ms(lambda: log_mel(samples, 16000), n) / s:.3f} ms")
    pipeline = AudioModality().pipeline(None, AudioTransform(), "k")
    audio = decode_audio("flac", _audio(s, 16000, "flac"), 16000, None)
    from mmlit.data.transforms import sample_context

    def augmented():
        with sample_context((0, 0, 0, "k"), train=True):
            pipeline(audio)

    print(f"  log-mel with augmentation (gain, shift, 2+2 masks): {_ms(augmented, n) / s:.3f} ms")
    for frames, size in ((8, 76), (250, 224)):
        data = _video(frames, size)
        print(f"video: decode {frames} frames of {size}x{size} H.264 (64 kept): "
              f"{_ms(lambda: decode_video('mp4', data), max(2, n // 4)):.2f} ms per clip")


if __name__ == "__main__":
    main()
