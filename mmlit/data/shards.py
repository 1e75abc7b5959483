"""Shard URLs and the samples inside them.

``resolve_shards`` turns a recipe's pattern into URLs; ``open_shard`` opens one (a local path; every remote
scheme, ``http(s)://``, ``s3://``, ``gs://`` ..., through ``fsspec``, with read timeouts and retries that resume
at the byte where a connection broke; ``pipe:`` only when allowed) and ``shard_size`` gives its size;
``iter_samples`` reads samples ``[start, stop)`` of a tar shard; ``scan_samples`` counts them and takes each one's
byte offset from the headers (``mmlit/data/index.py`` keeps both to plan epochs); ``read_range`` reads the bytes
between two offsets and ``range_samples`` parses them, so that a batch reads its samples alone
(``mmlit/data/sources.py`` reads both ways for the streams).

mmlit reads tars itself rather than with ``webdataset.tariterators`` (which uses ``tarfile``) for
three reasons: a reader that starts at sample ``start`` must skip the samples before it without
reading their bytes (a seek on local files); a truncated or corrupt tar must end with an error
that says which shard and how many samples were read, so that the loss is counted instead of
the ``warn_and_continue`` silence; and ``tarfile``'s header parsing costs a tenth of the time of
decoding a photo (see ``_tar_files``). Samples are grouped exactly as WebDataset does
(``base_plus_ext``).
"""

from __future__ import annotations

import bz2
import contextlib
import glob
import gzip
import http.client
import io
import lzma
import os
import re
import tarfile
import zlib
from typing import IO, Callable, Iterator
from urllib.parse import urlparse

import braceexpand
from webdataset.tariterators import base_plus_ext

from mmlit.data.remote import REMOTE_BUFFER, Reader, open_remote, remote_size
from mmlit.data.remote import read_range as remote_read_range

__all__ = ["ShardError", "StaleIndexError", "iter_samples", "open_shard", "range_samples", "read_range",
           "resolve_shards", "scan_samples", "shard_size"]

# What a broken tar, a broken gzip stream or a dropped connection raise while reading.
_READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError, UnicodeDecodeError,
                http.client.HTTPException)
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta
_File = tuple[str, int, int, Callable[[], bytes]]  # a tar's regular file: (name, start, end, read), see _tar_files


class StaleIndexError(RuntimeError):
    """An index whose counts or offsets no longer describe its shards (a shard changed or is gone): the epoch plan
    is wrong, so the run stops instead of skipping (``mmlit.data.index`` re-exports it)."""


class ShardError(RuntimeError):
    """A shard that cannot be opened or read to its end; ``read`` samples came out before the error."""

    def __init__(self, url: str, read: int, reason: str):
        super().__init__(f"{url}: unreadable after {read} sample(s): {reason}")
        self.url, self.read, self.reason = url, read, reason

    def __reduce__(self):  # picklable (sent from rank 0 to the other ranks with the shard index)
        return type(self), (self.url, self.read, self.reason)


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


class _CountedFile(io.FileIO):
    """A local file that counts the bytes it returned (``bytes_read``); everything else is ``FileIO``'s, in C."""

    bytes_read = 0

    def readinto(self, buffer) -> int:
        n = super().readinto(buffer)
        self.bytes_read += n or 0
        return n

    def readall(self) -> bytes:
        data = super().readall()
        self.bytes_read += len(data)
        return data

    def read(self, size: int = -1) -> bytes:
        data = super().read(size)
        self.bytes_read += len(data or b"")
        return data


class _Shard(io.BufferedReader):
    """A shard's bytes, buffered; ``bytes_read``: the bytes taken from the source (disk or network) so far."""

    @property
    def bytes_read(self) -> int:
        return self.raw.bytes_read


def open_shard(url: str, *, allow_pipe: bool = False, storage_options: dict | None = None) -> IO[bytes]:
    """A binary stream of the shard's bytes, with ``bytes_read`` (bytes taken from the source so far).

    Local files seek; ``http(s)://`` is streamed (no seeks); other remote schemes use their fsspec file, which
    seeks. Remote reads time out and retry where they broke (``mmlit.data.remote``); ``storage_options`` go to
    ``fsspec`` (``endpoint_url``, ``key``, ``headers``, ``client_kwargs: {timeout: seconds}`` ...).
    """
    if not _is_remote(url) or url.startswith("file://"):
        raw = _CountedFile(url.removeprefix("file://"))
        # the buffer open() would choose. Counting costs 0.7 us per read of the file (2.1 against 1.4 us): iter_samples
        # over a 204 MB shard of 2000 100 KB samples (4502 reads) from the page cache took 56.7 ms instead of 54.3
        # (best of 40; 29.7 against 29.2 ms for headers only), 1.4 us a sample against ~3 ms decoding its photo
        blksize = os.fstat(raw.fileno()).st_blksize
        return _Shard(raw, blksize if blksize > 1 else io.DEFAULT_BUFFER_SIZE)
    if urlparse(url).scheme == "pipe":
        if not allow_pipe:
            raise ValueError(f"'{url}' runs a shell command; set data.allow_pipe: true to allow it")
        from webdataset.gopen import gopen

        return _Shard(Reader(url, lambda offset: gopen(url, "rb"), seekable=False, retry=False), REMOTE_BUFFER)
    return _Shard(open_remote(url, storage_options), REMOTE_BUFFER)


def shard_size(url: str, *, storage_options: dict | None = None) -> int:
    """The shard's size in bytes, asked afresh (no cached listing); ``FileNotFoundError`` if it is missing."""
    if not _is_remote(url) or url.startswith("file://"):
        return os.path.getsize(url.removeprefix("file://"))
    if urlparse(url).scheme == "pipe":
        raise ValueError(f"'{url}': a pipe has no size")
    return remote_size(url, storage_options)


def _octal(field: bytes) -> int:
    field = field.split(b"\0", 1)[0].strip(b" ")
    try:
        return int(field, 8) if field else 0
    except ValueError:
        raise tarfile.ReadError(f"not a tar header (number field {field[:12]!r})") from None


def _byte_sum(block: bytes) -> int:
    """``sum(block)`` of a 512-byte header, 4x faster: adler32's low 16 bits are 1 + the byte sum modulo 65521, exact
    for 256 bytes (at most 65280). ``sum`` took 5 of the 7 us a header costs in a scan of headers."""
    return (zlib.adler32(block[:256]) & 0xFFFF) + (zlib.adler32(block[256:]) & 0xFFFF) - 2


def _pax(records: bytes) -> dict[bytes, bytes]:
    """The records of a PAX extended header (``b"%d key=value\n"`` each)."""
    out = {}
    try:
        while records:
            length = int(records.split(b" ", 1)[0])
            key, _, value = records[:length].split(b" ", 1)[1].partition(b"=")
            out[key], records = value[:-1], records[length:]
    except (ValueError, IndexError):
        raise tarfile.ReadError("corrupt PAX header") from None
    return out


class _Prefixed(io.RawIOBase):
    """A stream whose first bytes were read already (to sniff its compression)."""

    def __init__(self, head: bytes, stream: IO[bytes]):
        self.head, self.stream = head, stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.head[: len(buffer)] if self.head else self.stream.read(len(buffer))
        self.head = self.head[len(data):]
        buffer[: len(data)] = data
        return len(data)


def _decompressed(raw: IO[bytes]) -> tuple[IO[bytes], bool, bool]:
    """The tar stream inside ``raw`` (as is, or through gzip, bzip2 or xz, by magic bytes like ``tarfile``), whether
    it can seek (only a plain local file: decompressors emulate seeks by reading), and whether it is compressed (its
    offsets are then not the shard's)."""
    seekable = raw.seekable() if hasattr(raw, "seekable") else False
    head = raw.read(6)
    if seekable:
        raw.seek(0)
        stream = raw
    else:
        stream = io.BufferedReader(_Prefixed(head, raw), 1 << 16)
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=stream), False, True
    if head.startswith(b"BZh"):
        return bz2.BZ2File(stream), False, True
    if head.startswith(b"\xfd7zXZ"):
        return lzma.LZMAFile(stream), False, True
    return stream, seekable, False


def _tar_files(stream: IO[bytes], seek: bool, *, archive: bool = True) -> Iterator[_File]:
    """``(name, start, end, read)`` for each regular file of a tar (ustar, PAX and GNU long names): ``start`` is the
    offset of its first header block (its PAX or GNU long-name header, where it has one) and ``end`` that of the
    block after its data, both from the stream's first byte; ``read()`` returns its bytes, and a file whose
    ``read`` is not called is skipped with a seek where the stream can seek. ``archive``: the stream is a whole tar,
    which must end with end-of-archive blocks; otherwise it is a run of members (a byte range of a tar), which may
    also end at a member boundary.

    A small header parser instead of ``tarfile``: on shards written by ``webdataset.ShardWriter``
    (a PAX header per member) ``tarfile`` spends about 0.3 ms per sample parsing headers, 10% of
    decoding and cropping a 500x375 JPEG. Every header's checksum is checked, and a tar that ends
    without its end-of-archive blocks is an error (``tarfile`` reads one cut at a member boundary
    as a clean end).
    """
    end = stream.seek(0, os.SEEK_END) if seek else None
    if seek:
        stream.seek(0)
    extended: dict[bytes, bytes] = {}
    position, first = 0, None  # first: where the extended headers of the next member began
    while True:
        header = stream.read(512)
        if len(header) < 512:
            if not header and not archive:
                return  # the end of a range of members
            raise tarfile.ReadError("no end-of-archive blocks: the tar was cut short" if archive else
                                    "a header cut short")
        if header == bytes(512):
            return  # end-of-archive
        stored, checksum = _octal(header[148:156]), _byte_sum(header) - sum(header[148:156]) + 256  # the field as spaces
        if stored != checksum and stored != checksum - 256 * sum(b >= 128 for b in header[:148] + header[156:]):
            raise tarfile.ReadError("bad header checksum: the tar is corrupt")  # (the second sum: writers of signed chars)
        size, kind = _octal(header[124:136]), header[156:157]
        if kind in (b"x", b"L"):  # PAX extended header / GNU long name: applies to the next member
            padded = -(-size // 512) * 512
            payload = stream.read(padded)[:size]
            if len(payload) < size:
                raise tarfile.ReadError("unexpected end of data")
            extended = _pax(payload) if kind == b"x" else {b"path": payload.rstrip(b"\0")}
            first = position if first is None else first
            position += 512 + padded
            continue
        name = extended.get(b"path", b"").decode("utf-8")
        if not name:
            name, prefix = header[:100].split(b"\0", 1)[0].decode("utf-8"), header[345:500].split(b"\0", 1)[0].decode("utf-8")
            name = f"{prefix}/{name}" if prefix else name
        size = int(extended.get(b"size", size))
        extended = {}
        padded = -(-size // 512) * 512
        start, position, first = position if first is None else first, position + 512 + padded, None
        consumed = False

        def read() -> bytes:
            nonlocal consumed
            consumed = True
            content = stream.read(padded)
            if len(content) < padded:
                raise tarfile.ReadError("unexpected end of data")
            return content[:size]

        if kind in (b"0", b"\0", b"7"):  # regular and contiguous files
            yield name, start, position, read
        if consumed:
            continue
        if seek:
            if stream.seek(padded, os.SEEK_CUR) > end:
                raise tarfile.ReadError("unexpected end of data")
        elif len(stream.read(padded)) < padded:
            raise tarfile.ReadError("unexpected end of data")


def _grouped(files: Iterator[_File]) -> Iterator[tuple[int, str, str, int, int, Callable[[], bytes]]]:
    """``(sample, key, ext, start, end, read)`` for each member of a sample, from ``_tar_files``: members grouped into
    samples as WebDataset does (by the name up to the first dot of its last part, extensions lower-cased,
    ``__meta__`` entries and names without an extension skipped), samples numbered from 0. The one grouping of
    reading, counting and offsets, so that they agree."""
    sample, key, exts = -1, None, set()
    for name, start, end, read in files:
        prefix, ext = base_plus_ext(name)
        if prefix is None or _META.search(name):
            continue
        if prefix != key:
            sample, key, exts = sample + 1, prefix, set()
        ext = ext.lower()
        if ext in exts:
            raise tarfile.ReadError(f"sample '{prefix}' has two '.{ext}' entries")
        exts.add(ext)
        yield sample, prefix, ext, start, end, read


@contextlib.contextmanager
def _counting(raw: IO[bytes], counter: dict | None) -> Iterator[None]:
    try:
        yield
    finally:
        if counter is not None:
            counter["bytes"] = counter.get("bytes", 0) + raw.bytes_read


def iter_samples(url: str, start: int = 0, stop: int | None = None, *, allow_pipe: bool = False,
                 data: bool = True, storage_options: dict | None = None, counter: dict | None = None) -> Iterator[dict]:
    """Samples ``start <= i < stop`` of a tar shard (plain, or gzip, bzip2 or xz compressed), as
    ``{"__key__", "__url__", "__index__", ext: bytes}`` (without the ``ext`` entries when ``data`` is false).

    Entries are grouped into samples as WebDataset does: by the name up to the first dot of its
    last part, extensions lower-cased, ``__meta__`` entries skipped. Members outside
    ``[start, stop)`` are skipped without reading their bytes where the stream can seek.
    Raises ``ShardError`` (after the samples read so far) if the tar is cut short or corrupt; a
    sample whose members may have been cut off is not yielded. ``storage_options`` go to ``open_shard``;
    ``counter["bytes"]`` is set to the bytes read from the source when the shard is closed.
    """
    index, sample = -1, {}
    try:
        with open_shard(url, allow_pipe=allow_pipe, storage_options=storage_options) as raw, _counting(raw, counter):
            stream, seek, _ = _decompressed(raw)
            for index, key, ext, _, _, read in _grouped(_tar_files(stream, seek)):
                if index < start:
                    continue
                if sample and index != sample["__index__"]:
                    yield sample
                    sample = {}
                if stop is not None and index >= stop:
                    return
                if not sample:
                    sample = {"__key__": key, "__url__": url, "__index__": index}
                sample[ext] = read() if data else None
    except _READ_ERRORS as err:
        raise ShardError(url, max(index - start, 0), f"{type(err).__name__}: {err}") from err
    if sample:
        yield sample


def scan_samples(url: str, *, allow_pipe: bool = False, storage_options: dict | None = None,
                 counter: dict | None = None) -> tuple[int, list[int] | None]:
    """The number of samples of a tar shard and, for a plain tar that can be read by byte range (not compressed,
    not a ``pipe:``), the offsets of its samples: the offset of each sample's first header block (a PAX header's,
    where its first member has one), then where its last sample's last member ends (``count + 1`` values; sample
    ``k`` is the bytes ``[offsets[k], offsets[k + 1])``). Headers only: a local shard's member data are skipped
    with seeks. ``ShardError`` (with the samples counted before the failure) if the tar is cut short or corrupt."""
    index, offsets, end = -1, [], 0
    try:
        with open_shard(url, allow_pipe=allow_pipe, storage_options=storage_options) as raw, _counting(raw, counter):
            stream, seek, compressed = _decompressed(raw)
            for index, _, _, start, end, _ in _grouped(_tar_files(stream, seek)):
                if index == len(offsets):
                    offsets.append(start)
    except _READ_ERRORS as err:
        raise ShardError(url, max(index, 0), f"{type(err).__name__}: {err}") from err
    if compressed or urlparse(url).scheme == "pipe":
        return len(offsets), None
    return len(offsets), [*offsets, end]


def read_range(url: str, start: int, end: int, *, storage_options: dict | None = None) -> bytes:
    """The bytes ``[start, end)`` of a shard (fewer where it ends before ``end``), in one read: a local file with a
    seek, a remote one in one ranged request, retried like every remote read (``mmlit.data.remote.read_range``)."""
    if end <= start:
        return b""
    if not _is_remote(url) or url.startswith("file://"):
        with open(url.removeprefix("file://"), "rb", buffering=0) as f:
            f.seek(start)
            chunks, left = [], end - start
            while left > 0 and (chunk := f.read(left)):
                chunks.append(chunk)
                left -= len(chunk)
        return b"".join(chunks)
    if urlparse(url).scheme == "pipe":
        raise ValueError(f"'{url}': a pipe cannot be read by byte range")
    return remote_read_range(url, start, end, storage_options)


def range_samples(url: str, data: bytes, first: int, count: int) -> list[dict]:
    """The samples ``first <= i < first + count`` of a tar shard from ``data``, the bytes from the offset of sample
    ``first`` to that of sample ``first + count`` (``scan_samples``' offsets), each as ``iter_samples`` gives it.
    ``StaleIndexError`` if the bytes are not exactly those samples' members (a header fails its checksum, a member
    runs past the range, or the range holds another number of samples): the offsets no longer describe the shard."""
    samples: list[dict] = []
    try:
        for index, key, ext, _, _, read in _grouped(_tar_files(io.BytesIO(data), True, archive=False)):
            if index == len(samples):
                if index == count:
                    raise tarfile.ReadError(f"sample '{key}' follows the {count} expected")
                samples.append({"__key__": key, "__url__": url, "__index__": first + index})
            samples[-1][ext] = read()
        if len(samples) != count:
            raise tarfile.ReadError(f"{len(samples)} sample(s) where {count} were expected")
    except (tarfile.TarError, UnicodeDecodeError, ValueError) as err:
        raise StaleIndexError(
            f"{url}: the {len(data)} bytes at the offset of sample {first} are not samples "
            f"{first}..{first + count - 1} ({err}): the index's offsets no longer describe the shard, which changed "
            f"since the index was made; make the index again (`mmlit data index`)") from None
    return samples
