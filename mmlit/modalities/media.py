"""Opening an audio or video entry with FFmpeg (PyAV), the part the audio and video modalities share: the entry is
opened only by the demuxer of the format its name says, after its first bytes are checked against that format, and
its first stream of the modality's kind only when its codec is allow-listed; FFmpeg's errors become ``ValueError``
(a counted skip)."""

from __future__ import annotations

import contextlib
import io
from typing import Any, Callable, Iterator, Literal

__all__ = ["open_stream"]


@contextlib.contextmanager
def open_stream(extension: str, data: bytes, formats: dict[str, tuple[str, Callable[[bytes], bool]]],
                kind: Literal["audio", "video"], codecs: tuple[str, ...]) -> Iterator[tuple[Any, Any]]:
    """``(container, stream)`` of an entry: ``formats`` maps an extension to its demuxer and a check of the first
    bytes; ``codecs`` are the allowed decoders' names (or their prefixes: ``pcm_``)."""
    import av

    demuxer, is_format = formats[extension]
    if not is_format(data[:12]):
        raise ValueError(f"the data is not {extension.upper()} (its first bytes are {data[:12]!r})")
    try:
        with av.open(io.BytesIO(data), format=demuxer, mode="r") as container:
            streams = getattr(container.streams, kind)
            if not streams:
                raise ValueError(f"it has no {kind} stream")
            codec = streams[0].codec_context.name
            if not codec.startswith(codecs):
                raise ValueError(f"its codec {codec!r} is not one mmlit decodes ({', '.join(codecs)})")
            yield container, streams[0]
    except av.FFmpegError as err:
        raise ValueError(f"FFmpeg cannot decode it: {err}") from None
