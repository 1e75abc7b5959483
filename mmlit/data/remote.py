"""Remote shards' bytes: fsspec filesystems with read timeouts, and a reader that retries a read where its
connection broke.

fsspec's HTTP filesystem reads without retries (fsspec 2026.9) and aiohttp ends every request after 5 minutes by
default; s3fs retries some errors itself, and ``Reader`` is harmless on top. ``open_remote`` and ``remote_size`` are
what ``mmlit.data.shards.open_shard`` and ``shard_size`` use for every remote scheme.
"""

from __future__ import annotations

import http.client
import io
import os
import sys
import time
from typing import IO, Any, Callable, Protocol
from urllib.parse import urlparse

from mmlit.compat.aiohttp import arrived_before_failure

# Remote reads (module settings, read at each open: tests shorten them). A read that fails with a transient
# error (a dropped or reset connection, a timeout, HTTP 5xx or 429) reopens the shard at the byte it had reached,
# after BACKOFF_S, 2 * BACKOFF_S, 4 * BACKOFF_S ... (7.5 s in all for 4 retries); RETRIES failures in a row
# (without _PROGRESS bytes read in between) end the read with a ConnectionError naming the shard.
RETRIES = 4
BACKOFF_S = 0.5
READ_TIMEOUT_S = 60.0  # HTTP: connecting, or a socket silent this long, is a transient error (a stalled server)
_PROGRESS = 1 << 20
# Remote reads are buffered in 1 MiB pieces: each read of an HTTP response is a hop to fsspec's event-loop thread
# (78 us here), which 64 KiB reads would pay 16 times per MiB.
REMOTE_BUFFER = 1 << 20


class _HTTPStatusError(OSError):
    """An HTTP error status other than 404 (``FileNotFoundError``) and 401/403 (``PermissionError``)."""

    def __init__(self, url: str, status: int, reason: str | None):
        super().__init__(f"{url}: HTTP {status} {reason or ''}".rstrip())
        self.status = status


def _status_error(url: str, status: int, reason: str | None) -> OSError:
    if status in (404, 410):
        return FileNotFoundError(f"{url}: HTTP {status} {reason or ''}".rstrip())
    if status in (401, 403):
        return PermissionError(f"{url}: HTTP {status} {reason or ''}".rstrip())
    return _HTTPStatusError(url, status, reason)


def _transient(err: BaseException) -> bool:
    """Whether reopening may cure ``err``: a dropped, reset or timed-out connection, HTTP 5xx or 429."""
    if isinstance(err, _HTTPStatusError):
        return err.status >= 500 or err.status == 429
    if isinstance(err, (FileNotFoundError, PermissionError)):
        return False
    if isinstance(err, (ConnectionError, TimeoutError, http.client.IncompleteRead)):
        return True  # TimeoutError: also asyncio's, aiohttp's socket timeouts and fsspec's FSTimeoutError
    aiohttp, botocore = sys.modules.get("aiohttp"), sys.modules.get("botocore.exceptions")
    if aiohttp is not None and isinstance(err, (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError)):
        return True
    if aiohttp is not None and isinstance(err, aiohttp.ClientResponseError):
        return err.status >= 500 or err.status == 429
    return botocore is not None and isinstance(err, botocore.HTTPClientError)


class _Backoff:
    """Retry bookkeeping of one shard: ``failed(err)`` waits before the next try, or raises when it is no use."""

    def __init__(self, url: str):
        self.url, self.failures, self.started = url, 0, time.monotonic()

    def failed(self, err: Exception) -> None:
        if not _transient(err):
            if isinstance(err, OSError):
                raise err
            raise OSError(f"{self.url}: {type(err).__name__}: {err}") from err  # iter_samples counts OSErrors
        self.failures += 1
        if self.failures > RETRIES:
            raise ConnectionError(f"{self.url}: {type(err).__name__}: {err} (gave up after {RETRIES} retries, "
                                  f"{time.monotonic() - self.started:.1f} s)") from err
        time.sleep(BACKOFF_S * 2 ** (self.failures - 1))


class Source(Protocol):
    """One connection to a shard: ``read(n)`` returns up to ``n`` bytes (``b""`` at the end)."""

    def read(self, n: int) -> bytes: ...

    def close(self) -> None: ...


class _HTTPStream:
    """One GET of an HTTP(S) shard from byte ``offset`` on (to byte ``end``, where given), read front to back.

    A shard is read front to back, so it is streamed in one request (reopened with ``Range`` only after a
    failure) rather than through fsspec's ``HTTPFile``, which makes a request per block (5 MiB) with a round trip
    between blocks and seeks only to skip members, which in WebDataset shards are mostly smaller than a block.
    The session, its options and its event-loop thread are the fsspec filesystem's.
    """

    def __init__(self, fs: Any, url: str, offset: int, end: int | None = None):
        from fsspec.asyn import sync

        self._fs, self._sync, self.url, self._end = fs, sync, url, False
        self._response = sync(fs.loop, self._get, offset, end)

    async def _get(self, offset: int, end: int | None):
        options = dict(self._fs.kwargs)
        headers = {**options.pop("headers", {}), "Accept-Encoding": "identity"}  # byte offsets of the file itself
        ranged = bool(offset) or end is not None
        if ranged:
            headers["Range"] = f"bytes={offset}-{'' if end is None else end - 1}"
        session = await self._fs.set_session()
        response = await session.get(self._fs.encode_url(self.url), headers=headers, **options)
        try:
            total = response.headers.get("Content-Range", "").rpartition("*/")[2]
            if response.status == 416 and ranged and total.isdigit() and int(total) <= offset:
                self._end = True  # nothing at or after offset (the connection broke after the last byte)
                return response
            if response.status >= 400:
                raise _status_error(self.url, response.status, response.reason)
            if ranged and response.status == 206:
                if not response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
                    raise OSError(f"{self.url}: asked for bytes {offset}-, got {response.headers.get('Content-Range')}")
            elif offset:  # a server without ranges sends the whole shard again: skip what was read
                skipped = 0
                while skipped < offset:
                    chunk = await response.content.read(min(offset - skipped, REMOTE_BUFFER))
                    if not chunk:
                        raise OSError(f"{self.url}: the shard is shorter than on the first request")
                    skipped += len(chunk)
        except BaseException:
            response.close()
            raise
        return response

    async def _read(self, n: int) -> bytes:
        if self._end:
            return b""
        content, chunks, got = self._response.content, [], 0
        while got < n:  # aiohttp returns what has arrived: fill n bytes in one hop to the loop thread
            try:
                chunk = await content.read(n - got)
            except Exception:
                chunk = arrived_before_failure(content, n - got)  # every byte that arrived is returned first
                if not chunk and not chunks:
                    raise  # (then the retry asks for the bytes after them)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def read(self, n: int) -> bytes:
        return self._sync(self._fs.loop, self._read, n)

    def close(self) -> None:
        if not self._fs.loop.is_closed():  # (at interpreter exit)
            self._fs.loop.call_soon_threadsafe(self._response.close)  # aiohttp objects belong to the loop's thread


def _fsspec_file(fs: Any, path: str, offset: int) -> IO[bytes]:
    """The filesystem's own file (``s3fs.S3File``, ``gcsfs.GCSFile``: ranged GETs of a block with readahead,
    cheap seeks), at ``offset``."""
    file = fs.open(path, "rb")
    if offset:
        file.seek(offset)
    return file


class Reader(io.RawIOBase):
    """A remote shard's bytes through ``connect(offset) -> Source``, which it calls again at the byte reached when
    a read fails with a transient error (see ``RETRIES``); seekable where the source is (seeks are the source's).
    ``bytes_read`` counts the bytes returned (bytes read again after a retry are not counted)."""

    def __init__(self, url: str, connect: Callable[[int], Source], *, seekable: bool, retry: bool = True):
        self.name, self._connect, self._seekable, self._retry = url, connect, seekable, retry
        self._source: Source | None = None
        self._backoff, self._position, self._progress, self.bytes_read = _Backoff(url), 0, 0, 0
        self._call(lambda source: None)  # open now: a missing shard fails here

    def _call(self, action: Callable[[Source], Any]) -> Any:
        while True:
            try:
                if self._source is None:
                    self._source, self._progress = self._connect(self._position), 0
                return action(self._source)
            except Exception as err:
                if not self._retry:
                    raise
                if self._progress >= _PROGRESS:
                    self._backoff.failures = 0
                self._discard()
                self._backoff.failed(err)

    def _discard(self) -> None:
        source, self._source = self._source, None
        try:
            if source is not None:
                source.close()
        except Exception:  # noqa: S110 (a broken connection may fail to close; a new one is opened)
            pass

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._seekable

    def readinto(self, buffer) -> int:
        data = self._call(lambda source: source.read(len(buffer)))
        n = len(data)
        buffer[:n] = data
        self._position, self._progress, self.bytes_read = self._position + n, self._progress + n, self.bytes_read + n
        return n

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if not self._seekable:
            raise io.UnsupportedOperation(f"{self.name}: a streamed shard cannot seek")
        self._position = self._call(lambda source: source.seek(offset, whence))
        return self._position

    def tell(self) -> int:
        return self._position

    def close(self) -> None:
        if not self.closed:
            try:
                if self._source is not None:
                    self._source.close()  # a pipe's exit status is checked here
            finally:
                self._source = None
                super().close()


def _filesystem(url: str, storage_options: dict | None) -> tuple[Any, str]:
    """fsspec's filesystem for ``url`` and the path in it. HTTP(S) gets read and connect timeouts (``READ_TIMEOUT_S``,
    or ``client_kwargs: {timeout: seconds}``) and no total limit: aiohttp's default ends every request after 5 min,
    and a streamed shard is one request."""
    import fsspec

    options = dict(storage_options or {})
    if urlparse(url).scheme in ("http", "https"):
        import aiohttp

        client = dict(options.get("client_kwargs") or {})
        timeout = client.get("timeout", READ_TIMEOUT_S)
        if isinstance(timeout, (int, float)):
            client["timeout"] = aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)
        options["client_kwargs"] = client
    return fsspec.core.url_to_fs(url, **options)


async def _http_size(fs: Any, url: str) -> int:
    """HEAD (or, where HEAD is refused or gives no length, a GET of byte 0): fsspec's ``info`` reports any failure
    of its GET as ``FileNotFoundError``, which would call a shard missing when its server is down."""
    session = await fs.set_session()
    options = dict(fs.kwargs)
    headers = {**options.pop("headers", {}), "Accept-Encoding": "identity"}
    async with session.head(fs.encode_url(url), headers=headers, allow_redirects=True, **options) as response:
        if response.status < 400 and "Content-Length" in response.headers:
            return int(response.headers["Content-Length"])
        if response.status not in (405, 501) and response.status >= 400:
            raise _status_error(url, response.status, response.reason)
    headers["Range"] = "bytes=0-0"
    async with session.get(fs.encode_url(url), headers=headers, **options) as response:
        if response.status >= 400:
            raise _status_error(url, response.status, response.reason)
        total = response.headers.get("Content-Range", "").rpartition("/")[2]
        if response.status == 206 and total.isdigit():
            return int(total)
        if response.status == 200 and "Content-Length" in response.headers:
            return int(response.headers["Content-Length"])
    raise OSError(f"{url}: the server gives no size")


def open_remote(url: str, storage_options: dict | None = None) -> Reader:
    """``http(s)://`` streamed (not seekable); any other scheme through its fsspec file (seekable)."""
    fs, path = _filesystem(url, storage_options)
    if urlparse(url).scheme in ("http", "https"):
        return Reader(url, lambda offset: _HTTPStream(fs, url, offset), seekable=False)
    return Reader(url, lambda offset: _fsspec_file(fs, path, offset), seekable=True)


def remote_size(url: str, storage_options: dict | None = None) -> int:
    """The size in bytes, asked afresh (no cached listing); ``FileNotFoundError`` if it is missing."""
    fs, path = _filesystem(url, storage_options)
    backoff = _Backoff(url)
    while True:
        try:
            if urlparse(url).scheme in ("http", "https"):
                from fsspec.asyn import sync

                return sync(fs.loop, _http_size, fs, url)
            fs.invalidate_cache(path)
            return int(fs.info(path)["size"])
        except Exception as err:
            backoff.failed(err)


def read_range(url: str, start: int, end: int, storage_options: dict | None = None) -> bytes:
    """The bytes ``[start, end)`` of a remote shard (fewer where it ends before ``end``) in one ranged request, retried
    like a shard's reads. HTTP(S) through ``_HTTPStream`` (fsspec's ``cat_file`` neither retries nor checks that the
    answer is the range asked for, and lets the server compress it), retried from the byte reached; other schemes
    through ``cat_file`` (one GET; their file objects would read ahead a whole block for one sample), retried from
    ``start``."""
    fs, path = _filesystem(url, storage_options)
    if urlparse(url).scheme in ("http", "https"):
        with Reader(url, lambda offset: _HTTPStream(fs, url, start + offset, end), seekable=False) as reader:
            chunks, left = [], end - start
            while left > 0 and (chunk := reader.read(left)):
                chunks.append(chunk)
                left -= len(chunk)
            return b"".join(chunks)
    backoff = _Backoff(url)
    while True:
        try:
            return fs.cat_file(path, start=start, end=end)
        except Exception as err:
            if not _transient(err) and _ends_before(fs, path, start):
                return b""  # (S3 refuses a range that starts past the end: the shard is shorter than asked)
            backoff.failed(err)


def _ends_before(fs: Any, path: str, offset: int) -> bool:
    try:
        fs.invalidate_cache(path)
        return int(fs.info(path)["size"]) <= offset
    except Exception:
        return False
