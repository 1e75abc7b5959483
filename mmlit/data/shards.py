"""Shard URLs and the samples inside them.

``resolve_shards`` turns a recipe's pattern into URLs; ``open_shard`` opens one (a local path,
``http(s)://`` through the standard library, any other scheme through ``fsspec``, ``pipe:`` only
when allowed); ``iter_samples`` reads samples ``[start, stop)`` of a tar shard; ``scan_shards``
counts the samples of every shard once at setup, so that epochs can be planned exactly.

mmlit reads tars with ``tarfile`` rather than ``webdataset.tariterators`` for two reasons: a
reader that starts at sample ``start`` must skip the samples before it without reading their
bytes (a seek on local files), and a truncated or corrupt tar must end with an error that says
which shard and how many samples were read, so that the loss is counted instead of the
``warn_and_continue`` silence. Samples are grouped exactly as WebDataset does (``base_plus_ext``).
"""

from __future__ import annotations

import glob
import os
import tarfile
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Iterator
from urllib.parse import urlparse

import braceexpand
from webdataset.tariterators import base_plus_ext

__all__ = ["ShardError", "ShardIndex", "iter_samples", "open_shard", "resolve_shards", "scan_shards"]

# What a broken tar, a broken gzip stream or a dropped connection raise while reading.
_READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


class ShardError(RuntimeError):
    """A shard that cannot be opened or read to its end; ``read`` samples came out before the error."""

    def __init__(self, url: str, read: int, reason: str):
        super().__init__(f"{url}: unreadable after {read} sample(s): {reason}")
        self.url, self.read, self.reason = url, read, reason


def _is_remote(url: str) -> bool:
    scheme = urlparse(url).scheme
    return len(scheme) > 1  # a one-letter scheme is a Windows drive


def resolve_shards(spec: str, key: str, *, allow_pipe: bool = False) -> list[str]:
    """Expand ``{000..009}`` braces and, for local paths, globs; fail naming ``key`` if nothing matches."""
    urls: list[str] = []
    for part in braceexpand.braceexpand(spec):
        if part.startswith("pipe:") and not allow_pipe:
            raise ValueError(f"{key}: '{part}' runs a shell command; set data.allow_pipe: true to allow it")
        if _is_remote(part):
            urls.append(part)
            continue
        matches = sorted(glob.glob(part)) if glob.has_magic(part) else ([part] if os.path.isfile(part) else [])
        if not matches:
            raise FileNotFoundError(f"{key}: no shard matches '{part}' (from '{spec}')")
        urls.extend(matches)
    return urls


def open_shard(url: str, *, allow_pipe: bool = False) -> IO[bytes]:
    """A binary stream of the shard's bytes."""
    scheme = urlparse(url).scheme
    if not _is_remote(url):
        return open(url.removeprefix("file://"), "rb")
    if scheme == "pipe":
        if not allow_pipe:
            raise ValueError(f"'{url}' runs a shell command; set data.allow_pipe: true to allow it")
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    if scheme in ("http", "https"):
        return urllib.request.urlopen(url, timeout=60)  # noqa: S310 (the scheme is checked above)
    import fsspec  # s3://, gs://, hf:// ...: fsspec and its protocol package (s3fs, gcsfs, ...)

    return fsspec.open(url, "rb").open()


def iter_samples(url: str, start: int = 0, stop: int | None = None, *, allow_pipe: bool = False,
                 data: bool = True) -> Iterator[dict]:
    """Samples ``start <= i < stop`` of a tar shard, as ``{"__key__", "__url__", "__index__", ext: bytes}``
    (without the ``ext`` entries when ``data`` is false).

    Members before ``start`` are skipped without reading their bytes where the stream can seek.
    Raises ``ShardError`` (after the samples read so far) if the tar is cut short or corrupt; a
    sample whose members were cut off is not yielded.
    """
    index, key, sample = -1, None, {}
    try:
        with open_shard(url, allow_pipe=allow_pipe) as stream:
            seekable = stream.seekable() if hasattr(stream, "seekable") else False
            with tarfile.open(fileobj=stream, mode="r:*" if seekable else "r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    prefix, ext = base_plus_ext(member.name)
                    if prefix is None or os.path.basename(prefix).startswith("__"):
                        continue  # __meta__ files, names without an extension
                    if prefix != key:
                        if sample and index >= start:
                            yield sample
                        index, key, sample = index + 1, prefix, {}
                        if stop is not None and index >= stop:
                            return
                        if index >= start:
                            sample = {"__key__": prefix, "__url__": url, "__index__": index}
                    if index >= start:
                        sample[ext] = tar.extractfile(member).read() if data else b""
                if seekable and url.endswith(".tar") and stream.seek(0, os.SEEK_END) < tar.offset + 2 * tarfile.BLOCKSIZE:
                    # tarfile reads a file cut at a member boundary as a clean end; a written tar ends in two zero blocks.
                    raise tarfile.ReadError("no end-of-archive blocks: the file was cut short")
    except _READ_ERRORS as err:
        raise ShardError(url, max(index - start, 0), f"{type(err).__name__}: {err}") from err
    if sample:
        yield sample


def _count(url: str, allow_pipe: bool) -> tuple[int, ShardError | None]:
    count = 0
    try:
        for _ in iter_samples(url, allow_pipe=allow_pipe, data=False):
            count += 1
    except ShardError as err:
        return count, err
    return count, None


@dataclass
class ShardIndex:
    """The readable shards of one task and split, with their sample counts."""

    urls: list[str]
    counts: list[int]
    bad: list[ShardError] = field(default_factory=list)  # shards unreadable to the end, found by the scan

    @property
    def total(self) -> int:
        return sum(self.counts)


def scan_shards(urls: list[str], key: str, *, allow_pipe: bool = False, threads: int = 8) -> ShardIndex:
    """Count every shard's samples (headers only, for local files). A shard that fails part way keeps the
    samples before the failure and is listed in ``bad``; an empty tar is an error naming ``key``."""
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(lambda url: _count(url, allow_pipe), urls))
    index = ShardIndex([], [])
    for url, (count, error) in zip(urls, results):
        if error is not None:
            index.bad.append(error)
        elif count == 0:
            raise ValueError(f"{key}: shard '{url}' holds no sample (an empty tar); remove it from the pattern")
        if count:
            index.urls.append(url)
            index.counts.append(count)
    return index
