"""The audio modality: speech and sound clips (``.flac``, ``.wav``, ``.mp3``, ``.ogg``), as log-mel spectrograms.

Decoding (in the DataLoader workers) uses PyAV, the maintained FFmpeg binding that also decodes video, so one decoder
serves both modalities (``torchaudio`` would pin torch 2.9; ``soundfile`` reads no MP3 and does not resample). An
entry is opened only by the demuxer of the format its name says, after its first bytes are checked against that format
(``fLaC``, ``RIFF....WAVE``, an MP3 frame or ID3 tag, ``OggS``), and only with an allow-listed codec. A clip longer
than ``max_seconds`` is a counted skip, found from the container's duration before decoding when it has one, and
otherwise while decoding (nothing past the limit is decoded). Audio is mixed down to mono and resampled to
``sample_rate`` by FFmpeg's resampler (``av.AudioResampler``).

A task's clips go through ``AudioPipeline``: in training, SpecAugment-style augmentation (Park et al. 2019) drawn from
the sample's seeded generators (so a resumed run draws the same masks): a random gain and time shift of the waveform,
then time and frequency masks on the spectrogram; then the log-mel spectrogram that the audio encoder's frontend
names (``n_mels``, ``n_fft``, ``hop_length``), scaled as Whisper does (``log10``, floored 8 below the clip's maximum,
``(x + 4) / 4``). The mel filterbank is torchaudio's (HTK mel scale, no norm), written here in torch: 12 lines
instead of a dependency (``torchaudio`` needs torch 2.9; ``librosa`` brings numba), and tested equal to
``transformers``' ``mel_filter_bank``, which matches torchaudio's and librosa's. ``tools/bench_audio.py`` prints the
cost per second of audio (decoding, resampling and features).
"""

from __future__ import annotations

import functools
import itertools
import math
import random
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from mmlit.data.collate import Padded
from mmlit.modalities.base import Modality
from mmlit.modalities.media import open_stream
from mmlit.registry import register_modality

__all__ = ["AUDIO_EXTENSIONS", "Audio", "AudioModality", "AudioPipeline", "AudioTransform", "decode_audio",
           "log_mel", "mel_filters"]

# extension -> (FFmpeg demuxer, whether the first bytes are that format)
_FORMATS = {
    "flac": ("flac", lambda b: b[:4] == b"fLaC"),
    "wav": ("wav", lambda b: b[:4] in (b"RIFF", b"RF64") and b[8:12] == b"WAVE"),
    "mp3": ("mp3", lambda b: b[:3] == b"ID3" or (len(b) > 1 and b[0] == 0xFF and b[1] & 0xE0 == 0xE0)),
    "ogg": ("ogg", lambda b: b[:4] == b"OggS"),
}
AUDIO_EXTENSIONS = frozenset(_FORMATS)
_CODECS = ("flac", "pcm_", "mp3", "vorbis", "opus")  # allow-listed decoders (names or prefixes)


class Audio(NamedTuple):
    """A decoded clip: mono samples (N,) float32 in [-1, 1] at ``sample_rate``."""

    samples: torch.Tensor
    sample_rate: int

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.sample_rate


def decode_audio(extension: str, data: bytes, sample_rate: int = 16000, max_seconds: float | None = 30.0) -> Audio:
    """An entry's bytes -> mono ``Audio`` at ``sample_rate``; ``ValueError`` for another format than the name says, a
    codec outside the allow-list, no audio, or a clip longer than ``max_seconds``."""
    import av

    with open_stream(extension, data, _FORMATS, "audio", _CODECS) as (container, stream):
        if max_seconds is not None and stream.duration is not None and stream.time_base is not None \
                and float(stream.duration * stream.time_base) > max_seconds + 1e-3:
            raise ValueError(f"it lasts {float(stream.duration * stream.time_base):.2f} s, more than the limit of "
                             f"{max_seconds} s (data.modalities.audio.max_seconds)")
        limit = None if max_seconds is None else math.ceil(max_seconds * sample_rate) + 1
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        chunks, total = [], 0
        for frame in itertools.chain(container.decode(stream), (None,)):  # (None flushes the resampler)
            for out in resampler.resample(frame):
                chunk = out.to_ndarray().reshape(-1)
                chunks.append(chunk)
                total += len(chunk)
            if limit is not None and total > limit:
                raise ValueError(f"it lasts more than the limit of {max_seconds} s "
                                 f"(data.modalities.audio.max_seconds)")
    if total == 0:
        raise ValueError("it holds no audio samples")
    return Audio(torch.from_numpy(np.concatenate(chunks)), sample_rate)


@functools.lru_cache(maxsize=8)
def mel_filters(n_freqs: int, n_mels: int, sample_rate: int, f_min: float = 0.0, f_max: float | None = None
                ) -> torch.Tensor:
    """(n_freqs, n_mels) triangular filters on the HTK mel scale, unnormalised: torchaudio's ``melscale_fbanks``
    (made once per setting in a process: read it, do not modify it)."""
    f_max = sample_rate / 2 if f_max is None else f_max
    freqs = torch.linspace(0, sample_rate // 2, n_freqs, dtype=torch.float64)
    mel_min, mel_max = (2595.0 * math.log10(1.0 + f / 700.0) for f in (f_min, f_max))
    points = 700.0 * (10 ** (torch.linspace(mel_min, mel_max, n_mels + 2, dtype=torch.float64) / 2595.0) - 1.0)
    widths = points[1:] - points[:-1]
    slopes = points[None, :] - freqs[:, None]  # (n_freqs, n_mels + 2)
    down, up = -slopes[:, :-2] / widths[:-1], slopes[:, 2:] / widths[1:]
    return torch.minimum(down, up).clamp(min=0).float()


def log_mel(samples: torch.Tensor, sample_rate: int, n_mels: int = 64, n_fft: int = 400, hop_length: int = 160
            ) -> torch.Tensor:
    """(N,) samples -> (n_mels, 1 + N // hop_length) log-mel spectrogram, scaled as Whisper's."""
    window = torch.hann_window(n_fft)
    pad = n_fft // 2
    if len(samples) <= pad:  # (reflect padding needs more samples than the pad)
        samples = torch.nn.functional.pad(samples, (0, pad + 1 - len(samples)))
    spectrum = torch.stft(samples, n_fft, hop_length, window=window, center=True, pad_mode="reflect",
                          return_complex=True).abs().pow(2)  # (n_fft // 2 + 1, T)
    mel = mel_filters(n_fft // 2 + 1, n_mels, sample_rate).T @ spectrum
    log = mel.clamp(min=1e-10).log10()
    return (torch.maximum(log, log.max() - 8.0) + 4.0) / 4.0


@dataclass
class AudioTransform:
    """A task's audio augmentation (training samples only), SpecAugment-style.

    Args:
        augment: augment training clips at all.
        gain_db: a random gain within +-``gain_db`` decibels.
        shift_seconds: a random time shift of up to this many seconds (silence before the clip, or its start cut).
        time_masks, time_mask_frames: that many masks of up to that many spectrogram frames each.
        freq_masks, freq_mask_bins: that many masks of up to that many mel bins each.
    """

    augment: bool = True
    gain_db: float = 6.0
    shift_seconds: float = 0.1
    time_masks: int = 2
    time_mask_frames: int = 20
    freq_masks: int = 2
    freq_mask_bins: int = 8


class AudioPipeline:
    """A task's clips -> (n_mels, T) log-mel spectrograms for its audio encoder's frontend, at most ``max_frames``
    frames (longer clips keep their start)."""

    def __init__(self, sample_rate: int, n_mels: int, n_fft: int, hop_length: int, max_frames: int | None,
                 settings: AudioTransform | None, key: str):
        self.sample_rate, self.n_mels, self.n_fft, self.hop_length = sample_rate, n_mels, n_fft, hop_length
        self.max_frames, self.settings, self.key = max_frames, settings, key

    def __call__(self, audio: Audio) -> torch.Tensor:
        from mmlit.data.transforms import training_sample

        if audio.sample_rate != self.sample_rate:
            raise ValueError(f"{self.key}: the audio encoder's frontend reads {self.sample_rate} Hz, but the clips are "
                             f"decoded at {audio.sample_rate} Hz; set data.modalities.audio.sample_rate: "
                             f"{self.sample_rate}")
        augment = self.settings is not None and self.settings.augment and training_sample()
        samples = self._wave(audio.samples) if augment else audio.samples
        features = log_mel(samples, self.sample_rate, self.n_mels, self.n_fft, self.hop_length)
        if self.max_frames is not None:
            features = features[:, :self.max_frames]
        return self._mask(features) if augment else features

    def _wave(self, samples: torch.Tensor) -> torch.Tensor:
        s = self.settings
        samples = samples * 10 ** (random.uniform(-s.gain_db, s.gain_db) / 20)
        shift = round(random.uniform(-s.shift_seconds, s.shift_seconds) * self.sample_rate)
        if shift > 0:
            return torch.cat([samples.new_zeros(shift), samples])
        return samples[-shift:] if -shift < len(samples) // 2 else samples

    def _mask(self, features: torch.Tensor) -> torch.Tensor:
        s, features = self.settings, features.clone()
        floor = features.min()
        for count, width, axis in ((s.time_masks, s.time_mask_frames, 1), (s.freq_masks, s.freq_mask_bins, 0)):
            size = features.shape[axis]
            for _ in range(count):
                w = random.randint(0, min(width, size // 4))
                start = random.randint(0, size - w)
                features.narrow(axis, start, w).fill_(floor)
        return features


@register_modality("audio")
class AudioModality(Modality):
    """Audio clips (FLAC, WAV, MP3, Ogg Vorbis/Opus), mono at ``sample_rate``.

    Args:
        sample_rate: the rate clips are resampled to (the audio encoder's frontend must read it).
        max_seconds: a longer clip is skipped (counted); None: no limit.
    """

    extensions = AUDIO_EXTENSIONS
    default_encoder = "mmlit.models.SpectrogramTransformer"

    def __init__(self, sample_rate: int = 16000, max_seconds: float | None = 30.0):
        if sample_rate < 1000:
            raise ValueError(f"data.modalities.audio.sample_rate must be at least 1000 Hz, got {sample_rate}")
        self.sample_rate, self.max_seconds = sample_rate, max_seconds

    def decode(self, extension: str, data: bytes) -> Audio:
        return decode_audio(extension, data, self.sample_rate, self.max_seconds)

    def pipeline(self, encoder: Any, settings: AudioTransform | None, key: str) -> AudioPipeline:
        """Log-mels for the encoder's frontend (its ``sample_rate``, ``n_mels``, ``n_fft``, ``hop_length``,
        ``max_frames``; the defaults without an encoder), augmented by ``settings``."""
        frontend = {"sample_rate": self.sample_rate, "n_mels": 64, "n_fft": 400, "hop_length": 160, "max_frames": None}
        frontend.update({k: getattr(encoder, k) for k in frontend if hasattr(encoder, k)})
        return AudioPipeline(**frontend, settings=settings, key=key)

    def collate(self, values: list) -> Padded:
        """(B, n_mels, T) spectrograms, zero after each clip's end, and their lengths in frames."""
        return Padded.of(values)
