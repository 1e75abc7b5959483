"""Sources of samples: one class per shard format, the only place that knows how a format is laid out.

A source counts the samples of a shard and reads the samples ``[start, stop)`` of a shard whose count is known,
as raw samples ``{"__key__", "__url__", "__index__", entry: bytes}``, and counts the bytes it read. Everything
else (the epoch plan, shuffling, resume, decoding, the fault budget) works on any source, so a new storage format
(a parquet table of images, MosaicML's MDS) is one file with a registered ``Source`` subclass, chosen in the recipe
by ``data.shard_format`` (``register_source``; entry-point group ``mmlit.sources``).
"""

from __future__ import annotations

from typing import ClassVar, Iterator

from mmlit.data.shards import ShardError, iter_samples, shard_size
from mmlit.registry import get_source as _get_source
from mmlit.registry import list_sources, register_source

__all__ = ["Source", "TarSource", "get_source", "list_sources", "register_source"]


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

    def read(self, url: str, start: int, stop: int) -> Iterator[dict]:
        """Samples ``start <= i < stop`` of the shard, in order; ``ShardError`` after the samples it could read."""
        raise NotImplementedError

    def size(self, url: str) -> int:
        """The shard's size in bytes (``FileNotFoundError`` if it is gone): an index's shards are checked against it."""
        return shard_size(url, storage_options=self.storage_options)


@register_source("tar")
class TarSource(Source):
    """WebDataset tar shards (plain or gzip, bzip2, xz compressed); see ``mmlit/data/shards.py``."""

    def count(self, url: str) -> int:
        count = 0
        try:
            for _ in iter_samples(url, allow_pipe=self.allow_pipe, data=False, storage_options=self.storage_options):
                count += 1
        except ShardError as err:
            err.read = count
            raise
        return count

    def read(self, url: str, start: int, stop: int) -> Iterator[dict]:
        counter: dict = {}
        try:
            yield from iter_samples(url, start, stop, allow_pipe=self.allow_pipe, storage_options=self.storage_options,
                                    counter=counter)
        finally:
            self.bytes_read += counter.get("bytes", 0)
