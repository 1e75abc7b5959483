"""The video modality: clips (``.mp4``, the WebVid / video2dataset convention, and ``.webm``, ``.mkv``, ``.mov``,
``.avi``), as a few frames sampled per clip.

Decoding (in the DataLoader workers) uses PyAV, the maintained FFmpeg binding that also decodes mmlit's audio:
``torchcodec`` decodes on the GPU as well, but pins torch releases and needs a system FFmpeg, where PyAV's wheels carry
their own. An entry is opened only by the demuxer of the format its name says, after its first bytes are checked
against that format (an ISO-BMFF ``ftyp`` box, the EBML magic of Matroska/WebM, ``RIFF....AVI``), and only with an
allow-listed video codec (H.264, HEVC, VP8, VP9, AV1, MPEG-4 part 2). Limits, checked before the pixels are decoded:
``max_pixels`` per frame (and again on each frame: a stream can change size) and ``max_frames`` per clip; a clip
past either is a counted skip. Of a long clip, only
``keep_frames`` evenly spaced frames are kept as RGB (64 of a 30 s clip at 30 fps: 15 MB at 320x240, not 207 MB).

A task's clips go through ``VideoPipeline``: ``frames`` frames sampled per clip (TSN's segments, Wang et al. 2016: the
clip cut into ``frames`` equal segments, a random frame of each in training, drawn from the sample's seeded generators
so a resumed run draws the same; each segment's middle frame otherwise), then each frame through the image
modality's pipeline at the video encoder's frame size, with ONE draw of the augmentation for the whole clip (a crop
that jumped between frames would be motion that is not there).
"""

from __future__ import annotations

import random
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from mmlit.data.collate import stack_tensors
from mmlit.data.transforms import ImageTransform, training_sample
from mmlit.modalities.base import Modality
from mmlit.modalities.media import open_stream
from mmlit.registry import get_modality, register_modality

__all__ = ["VIDEO_EXTENSIONS", "Clip", "VideoModality", "VideoPipeline", "decode_video", "sample_frames"]

_MATROSKA = b"\x1a\x45\xdf\xa3"
# extension -> (FFmpeg demuxer, whether the first bytes are that format)
_FORMATS = {
    "mp4": ("mp4", lambda b: b[4:8] == b"ftyp"),
    "mov": ("mov", lambda b: b[4:8] in (b"ftyp", b"moov", b"mdat", b"wide", b"free")),
    "webm": ("webm", lambda b: b[:4] == _MATROSKA),
    "mkv": ("matroska", lambda b: b[:4] == _MATROSKA),
    "avi": ("avi", lambda b: b[:4] == b"RIFF" and b[8:11] == b"AVI"),
}
VIDEO_EXTENSIONS = frozenset(_FORMATS)
_CODECS = ("h264", "hevc", "vp8", "vp9", "av1", "libdav1d", "mpeg4")


class Clip(NamedTuple):
    """A decoded clip: its frames (T, H, W, 3) uint8 RGB, and frames per second (0 when the file does not say)."""

    frames: np.ndarray
    fps: float


def decode_video(extension: str, data: bytes, max_frames: int | None = 1800, max_pixels: int | None = 1920 * 1080,
                 keep_frames: int = 64) -> Clip:
    """An entry's bytes -> its frames: at most ``keep_frames``, evenly spaced (or, when the file does not say how
    many it has, every 2^k-th as they come): what frame sampling chooses from, without holding every frame of a long
    clip as RGB. ``ValueError`` for another format than the name says, a codec outside the allow-list, a frame of
    more than ``max_pixels`` pixels, or more than ``max_frames`` frames."""
    with open_stream(extension, data, _FORMATS, "video", _CODECS) as (container, stream):
        width, height = stream.codec_context.width, stream.codec_context.height
        if max_pixels is not None and width * height > max_pixels:
            raise ValueError(f"its frames are {width}x{height}, more than the limit of {max_pixels} pixels "
                             f"(data.modalities.video.max_pixels)")
        if max_frames is not None and stream.frames > max_frames:
            raise ValueError(f"it has {stream.frames} frames, more than the limit of {max_frames} "
                             f"(data.modalities.video.max_frames)")
        total, frames, stride = stream.frames, [], 1
        kept = set(np.linspace(0, total - 1, keep_frames).round().astype(int).tolist()) if total > keep_frames else None
        for i, frame in enumerate(container.decode(stream)):
            if max_frames is not None and i == max_frames:
                raise ValueError(f"it has more than the limit of {max_frames} frames "
                                 f"(data.modalities.video.max_frames)")
            if max_pixels is not None and frame.width * frame.height > max_pixels:  # (a stream can change size)
                raise ValueError(f"a frame is {frame.width}x{frame.height}, more than the limit of {max_pixels} "
                                 f"pixels (data.modalities.video.max_pixels)")
            if kept is not None and i not in kept or kept is None and i % stride:
                continue
            frames.append(frame.to_ndarray(format="rgb24"))
            if kept is None and len(frames) > keep_frames:  # a count the file does not say: thin as they come
                frames, stride = frames[::2], 2 * stride
        fps = float(stream.average_rate or 0)
    if not frames:
        raise ValueError("it holds no frames")
    return Clip(np.stack(frames), fps)


def sample_frames(total: int, count: int, train: bool) -> list[int]:
    """Indices of ``count`` frames of a clip of ``total``: one per equal segment, random within it when ``train``
    (``random``, seeded per sample), its middle otherwise. A clip shorter than ``count`` repeats frames."""
    bounds = np.linspace(0, total, count + 1)
    if train:
        return [min(int(random.uniform(lo, hi)), total - 1) for lo, hi in zip(bounds[:-1], bounds[1:])]
    return [min(int((lo + hi) / 2), total - 1) for lo, hi in zip(bounds[:-1], bounds[1:])]


class VideoPipeline:
    """A task's clips -> (frames, 3, S, S) uint8: sampled frames, each through ``image`` (the image modality's
    pipeline at the frame encoder's size) with one augmentation draw for the whole clip."""

    def __init__(self, frames: int, image: Any):
        self.frames, self.image = frames, image

    def __call__(self, clip: Clip) -> torch.Tensor:
        indices = sample_frames(len(clip.frames), self.frames, training_sample())
        seed = random.getrandbits(63)
        out = []
        for i in indices:
            with _seeded(seed):  # the same crop and flip for every frame
                out.append(self.image(Image.fromarray(clip.frames[i])))
        return torch.stack([t.contiguous() for t in out])


class _seeded:
    """Run with the standard generators (``random``, NumPy's, torch's CPU generator: what timm's transforms draw
    from) seeded by ``seed``, their states restored afterwards."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self) -> None:
        self.saved = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
        random.seed(self.seed)
        np.random.seed(self.seed % 2**32)
        torch.default_generator.manual_seed(self.seed)

    def __exit__(self, *exc: Any) -> None:
        random.setstate(self.saved[0])
        np.random.set_state(self.saved[1])
        torch.default_generator.set_state(self.saved[2])


@register_modality("video")
class VideoModality(Modality):
    """Video clips (MP4, WebM, Matroska, QuickTime, AVI with an allow-listed codec).

    Args:
        max_frames: a clip with more frames is skipped (counted); 1,800 is a minute at 30 fps.
        max_pixels: a clip whose frames have more pixels (width x height) is skipped (counted).
        keep_frames: the frames kept of a longer clip (evenly spaced), which frame sampling chooses from.
    """

    extensions = VIDEO_EXTENSIONS
    default_encoder = "mmlit.models.VideoEncoder"

    def __init__(self, max_frames: int | None = 1800, max_pixels: int | None = 1920 * 1080, keep_frames: int = 64):
        if keep_frames < 1:
            raise ValueError(f"data.modalities.video.keep_frames must be at least 1, got {keep_frames}")
        self.max_frames, self.max_pixels, self.keep_frames = max_frames, max_pixels, keep_frames

    def decode(self, extension: str, data: bytes) -> Clip:
        return decode_video(extension, data, self.max_frames, self.max_pixels, self.keep_frames)

    def pipeline(self, encoder: Any, settings: ImageTransform | None, key: str) -> VideoPipeline:
        """``frames`` frames (the encoder's, 8 without one) through the image pipeline of its frame encoder
        (``encoder.frame_encoder``), with the task's image ``settings``."""
        image = get_modality("image")().pipeline(getattr(encoder, "frame_encoder", None), settings, key)
        return VideoPipeline(getattr(encoder, "frames", 8), image)

    def collate(self, values: list) -> torch.Tensor:
        """(B, frames, 3, S, S) uint8."""
        return stack_tensors(values)
