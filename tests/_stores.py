"""Real shard servers on loopback for tests (no mocks): ``HTTPStore`` (ranges, an access log, dropped and stalled
responses on demand) and ``S3Store`` (moto's standalone S3 server), with their pytest fixtures ``http_store`` and
``s3_store``.

    def test_x(http_store):
        write_tar(http_store.root / "a.tar", samples)
        http_store.drop_after("/a.tar", 4096)           # the next GET of /a.tar breaks after 4096 bytes
        list(iter_samples(http_store.url + "/a.tar"))
        assert [r.range for r in http_store.requests("/a.tar")] == [None, (4096, None)]
"""

from __future__ import annotations

import fnmatch
import http.server
import logging
import os
import re
import socket
import sys
import threading
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

_CHUNK = 1 << 16


@dataclass
class Request:
    """One request as the server answers it: ``range`` is the asked ``(start, end inclusive or None)``. It is logged
    before the answer is sent and ``bytes_sent`` grows before each chunk is written, so a client that has read an
    answer always finds it in the log (counted at most one chunk high if the client went away)."""

    path: str
    method: str
    range: tuple[int, int | None] | None
    status: int
    bytes_sent: int


class HTTPStore:
    """A threading HTTP/1.1 server of the files under ``root`` at ``url``, with single ``Range`` requests (206,
    ``Content-Range``, ``Accept-Ranges``), HEAD, an access log, and faults armed per path."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = ""
        self._log: list[Request] = []
        self._faults: dict[str, list[tuple[str, int]]] = {}
        self._lock = threading.Lock()
        self._release = threading.Event()  # stalled responses wait for it (set when the store closes)
        self._server: http.server.ThreadingHTTPServer | None = None

    def __enter__(self) -> HTTPStore:
        store = self

        class Handler(_Handler):
            pass

        Handler.store = store
        self._server = _Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.05,), name="HTTPStore", daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        return self

    def __exit__(self, *exc) -> None:
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def drop_after(self, path: str, n_bytes: int, times: int = 1) -> None:
        """The next ``times`` GETs of ``path`` announce the whole body, send ``n_bytes`` of it, close the socket."""
        self._arm(path, "drop", n_bytes, times)

    def stall(self, path: str, after_bytes: int = 0, times: int = 1) -> None:
        """The next ``times`` GETs of ``path`` send their headers and ``after_bytes``, then nothing (until closing)."""
        self._arm(path, "stall", after_bytes, times)

    def _arm(self, path: str, kind: str, n: int, times: int) -> None:
        with self._lock:
            self._faults.setdefault("/" + path.lstrip("/"), []).extend([(kind, n)] * times)

    def _fault(self, path: str) -> tuple[str, int] | None:
        with self._lock:
            queue = self._faults.get(path)
            return queue.pop(0) if queue else None

    def _record(self, request: Request) -> None:
        with self._lock:
            self._log.append(request)

    def requests(self, path_glob: str | None = None) -> list[Request]:
        """The requests answered so far (of paths matching ``path_glob``, e.g. ``"/a-*.tar"``), oldest first."""
        with self._lock:
            return [r for r in self._log if path_glob is None or fnmatch.fnmatchcase(r.path, path_glob)]

    def bytes_sent(self, path_glob: str | None = None) -> int:
        return sum(r.bytes_sent for r in self.requests(path_glob))


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client killed or gone mid-request: not news
            super().handle_error(request, client_address)


_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers (aiohttp pools connections)
    timeout = 30  # an idle kept-alive connection's thread ends after this
    store: HTTPStore

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        file = (self.store.root / path.lstrip("/")).resolve()
        asked = self.headers.get("Range")
        match = _RANGE.match(asked.strip()) if asked else None
        wanted = (int(match[1]) if match[1] else None, int(match[2]) if match[2] else None) if match else None
        if not file.is_file() or not file.is_relative_to(self.store.root.resolve()):
            return self._status(path, 404, wanted)
        size = file.stat().st_size
        start, end, status = 0, size - 1, 200
        if wanted is not None:
            first, last = wanted
            if first is None:  # bytes=-n: the last n bytes
                start = max(size - (last or 0), 0)
            else:
                start, end = first, min(last if last is not None else size - 1, size - 1)
            if start >= size or start > end:
                return self._status(path, 416, wanted, {"Content-Range": f"bytes */{size}"})
            status = 206
        self.send_response(status)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        fault = self.store._fault(path) if body else None
        limit = end - start + 1 if fault is None else min(fault[1], end - start + 1)
        request = Request(path, self.command, wanted, status, 0)
        self.store._record(request)
        try:
            if body:
                with open(file, "rb") as f:
                    f.seek(start)
                    while request.bytes_sent < limit:
                        data = f.read(min(_CHUNK, limit - request.bytes_sent))
                        with self.store._lock:
                            request.bytes_sent += len(data)
                        self.wfile.write(data)
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            fault = fault or ("client gone", 0)
        if fault is not None:
            if fault[0] == "stall":
                self.store._release.wait(120)
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _status(self, path: str, status: int, wanted, headers: dict | None = None) -> None:
        body = f"{status}\n".encode()
        self.store._record(Request(path, self.command, wanted, status, 0))
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class S3Store:
    """moto's standalone S3 server on a free loopback port with one empty bucket (``s3://{bucket}``).

    ``env`` makes s3fs, boto3 and subprocesses talk to it (botocore reads ``AWS_ENDPOINT_URL_S3``; fsspec reads
    ``FSSPEC_S3_ENDPOINT_URL`` when it is imported, so only in processes started afterwards); ``storage_options``
    says the same explicitly. moto keeps its buckets per process, not per server: each store gets a fresh bucket
    name and resets moto when it closes.
    """

    key, secret, region = "testing", "testing", "us-east-1"

    def __init__(self, bucket: str | None = None):
        self.bucket = bucket or f"shards-{uuid.uuid4().hex[:8]}"
        self.endpoint = ""
        self._server = None

    def __enter__(self) -> S3Store:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.client().create_bucket(Bucket=self.bucket)
        return self

    def __exit__(self, *exc) -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(self.endpoint + "/moto-api/reset", method="POST"), timeout=10)
        finally:
            self._server.stop()
            _forget_s3_filesystems()

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}"

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_DEFAULT_REGION": self.region,
                "AWS_ENDPOINT_URL_S3": self.endpoint, "FSSPEC_S3_ENDPOINT_URL": self.endpoint,
                "AWS_EC2_METADATA_DISABLED": "true"}

    @property
    def storage_options(self) -> dict:
        return {"endpoint_url": self.endpoint, "key": self.key, "secret": self.secret,
                "client_kwargs": {"region_name": self.region}}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.key,
                            aws_secret_access_key=self.secret, region_name=self.region)

    def upload(self, directory: str | os.PathLike, prefix: str = "") -> list[str]:
        """Every file under ``directory`` as ``s3://{bucket}/{prefix}{relative path}``; returns their URLs, sorted."""
        client, urls = self.client(), []
        for path in sorted(Path(directory).rglob("*")):
            if path.is_file():
                key = prefix + path.relative_to(directory).as_posix()
                client.upload_file(str(path), self.bucket, key)
                urls.append(f"{self.url}/{key}")
        return urls


def _forget_s3_filesystems() -> None:
    """fsspec caches filesystems by their options: one made for an earlier store would keep its endpoint."""
    try:
        import s3fs
    except ImportError:
        return
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def http_store(tmp_path):
    """An ``HTTPStore`` serving ``tmp_path / "http"`` (``.root``) at ``.url``."""
    with HTTPStore(tmp_path / "http") as store:
        yield store


@pytest.fixture
def s3_store(monkeypatch):
    """An ``S3Store`` with an empty bucket; its ``env`` is set (for s3fs here and for subprocesses)."""
    with S3Store() as store:
        for name, value in store.env.items():
            monkeypatch.setenv(name, value)
        _forget_s3_filesystems()
        yield store


__all__ = ["HTTPStore", "Request", "S3Store", "http_store", "s3_store"]
