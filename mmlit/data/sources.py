"""Sources of samples: one class per shard format, the only place that knows how a format is laid out.

A source counts the samples of a shard (``scan``: with their byte offsets, where its format can be read by byte
range) and reads the samples ``[start, stop)`` of a shard whose count is known (``read``) or the samples of several
spans of one shard (``read_spans``: each span's own bytes alone, where the shard's offsets are known), as raw samples
``{"__key__", "__url__", "__index__", entry: bytes}``, and counts the bytes it read. Everything
else (the epoch plan, shuffling, resume, decoding, the fault budget) works on any source, so a new storage format
(a parquet table of images, MosaicML's MDS) is one file with a registered ``Source`` subclass, chosen in the recipe
by ``data.shard_format`` (``register_source``; entry-point group ``mmlit.sources``).
"""

from __future__ import annotations

import bisect
from typing import ClassVar, Iterator, Sequence

from mmlit.data.shards import (
    _READ_ERRORS, ShardError, StaleIndexError, iter_samples, range_samples, read_range, scan_samples, shard_size,
)
from mmlit.registry import get_source as _get_source
from mmlit.registry import list_sources, register_source

__all__ = ["RANGE_READ_BYTES", "Source", "TarSource", "get_source", "list_sources", "register_source"]

# A span is read in one piece of bytes unless it holds more than this: then it is cut at sample boundaries into
# reads of at most this many bytes (a larger sample is read alone), so that a whole shard read as one span is not
# held in memory at once.
RANGE_READ_BYTES = 64 << 20


def get_source(name: str, key: str = "data.shard_format") -> type[Source]:
    """The registered source class ``name`` (``mmlit.registry``); an unknown name is an error naming ``key``."""
    try:
        return _get_source(name)
    except KeyError as err:
        raise ValueError(f"{key}: {err.args[0]}") from None


class Source:
    """How the shards of one format are counted and read. Subclasses implement ``count`` and ``read``.

    Args:
        allow_pipe: accept ``pipe:`` URLs, which run a shell command.
        storage_options: passed to fsspec for remote shards (``endpoint_url``, credentials, ...).
    """

    format: ClassVar[str]

    def __init__(self, *, allow_pipe: bool = False, storage_options: dict | None = None):
        self.allow_pipe, self.storage_options = allow_pipe, storage_options
        self.bytes_read = 0  # in this process, since the source was made

    def count(self, url: str) -> int:
        """The number of samples in the shard; ``ShardError`` (with the samples counted) if it is unreadable."""
        raise NotImplementedError

    def scan(self, url: str) -> tuple[int, list[int] | None]:
        """The number of samples in the shard and, where the shard can be read by byte range, their byte offsets:
        ``count + 1`` values, sample ``k`` being the bytes ``[offsets[k], offsets[k + 1])`` (None otherwise, as
        here: a source that only counts). ``ShardError`` (with the samples counted) if it is unreadable."""
        return self.count(url), None

    def read(self, url: str, start: int, stop: int) -> Iterator[dict]:
        """Samples ``start <= i < stop`` of the shard, in order; ``ShardError`` after the samples it could read."""
        raise NotImplementedError

    def read_spans(self, url: str, spans: list[tuple[int, int]], offsets: Sequence[int] | None) -> Iterator[dict]:
        """The samples of each span ``(start, stop)`` of the shard (``start <= i < stop``), spans in the order given,
        each sample as ``read`` gives it. ``offsets``: the shard's from ``scan`` (``ShardIndex.sample_offsets``), or
        None. A source that reads by byte range reads the bytes of each span alone; this default, for shards without
        offsets and sources without ranges, reads each span with ``read`` (spans that meet joined into one).
        ``ShardError`` after the samples it could read (its ``read``: those this call yielded)."""
        for start, stop in _joined(spans):
            yield from self.read(url, start, stop)

    def size(self, url: str) -> int:
        """The shard's size in bytes (``FileNotFoundError`` if it is gone): an index's shards are checked against it."""
        return shard_size(url, storage_options=self.storage_options)


@register_source("tar")
class TarSource(Source):
    """WebDataset tar shards (plain or gzip, bzip2, xz compressed); see ``mmlit/data/shards.py``."""

    def count(self, url: str) -> int:
        return self.scan(url)[0]

    def scan(self, url: str) -> tuple[int, list[int] | None]:
        """Headers only; offsets for plain tars (not gzip, bzip2 or xz compressed, not ``pipe:``)."""
        return scan_samples(url, allow_pipe=self.allow_pipe, storage_options=self.storage_options)

    def read(self, url: str, start: int, stop: int) -> Iterator[dict]:
        counter: dict = {}
        try:
            yield from iter_samples(url, start, stop, allow_pipe=self.allow_pipe, storage_options=self.storage_options,
                                    counter=counter)
        finally:
            self.bytes_read += counter.get("bytes", 0)

    def read_spans(self, url: str, spans: list[tuple[int, int]], offsets: Sequence[int] | None) -> Iterator[dict]:
        """With offsets, one read of the bytes ``[offsets[start], offsets[stop])`` per span (spans that meet joined; see
        ``RANGE_READ_BYTES``): a seek and a read locally, one ranged request remotely. ``StaleIndexError`` where those
        bytes are not the span's samples (the shard changed since its offsets were taken)."""
        if offsets is None:
            yield from super().read_spans(url, spans, offsets)
            return
        yielded = 0
        for first, stop in _pieces(url, spans, offsets):
            begin, end = offsets[first], offsets[stop]
            try:
                data = read_range(url, begin, end, storage_options=self.storage_options)
            except _READ_ERRORS as err:
                raise ShardError(url, yielded, f"{type(err).__name__}: {err}") from err
            self.bytes_read += len(data)
            if len(data) < end - begin:
                raise StaleIndexError(f"{url}: the index's offsets put samples {first}..{stop - 1} at bytes "
                                      f"[{begin}, {end}), but the shard holds only {len(data)} of those bytes: it changed "
                                      f"since the index was made; make the index again (`mmlit data index`)")
            for sample in range_samples(url, data, first, stop - first):
                yielded += 1
                yield sample


def _joined(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``spans`` in order, each span that starts where the one before it stops joined to it, empty ones dropped."""
    out: list[tuple[int, int]] = []
    for start, stop in spans:
        if start > stop:
            raise ValueError(f"the span ({start}, {stop}) ends before it starts")
        if start == stop:
            continue
        if out and out[-1][1] == start:
            out[-1] = (out[-1][0], stop)
        else:
            out.append((start, stop))
    return out


def _pieces(url: str, spans: list[tuple[int, int]], offsets: Sequence[int]) -> Iterator[tuple[int, int]]:
    """The joined spans, each cut at sample boundaries into pieces of at most ``RANGE_READ_BYTES`` (or one sample)."""
    count = len(offsets) - 1
    for start, stop in _joined(spans):
        if start < 0 or stop > count:
            raise IndexError(f"{url}: the span ({start}, {stop}) is outside the shard's {count} samples")
        while start < stop:
            cut = bisect.bisect_right(offsets, offsets[start] + RANGE_READ_BYTES, start + 1, stop + 1) - 1
            cut = max(cut, start + 1)
            yield start, cut
            start = cut
