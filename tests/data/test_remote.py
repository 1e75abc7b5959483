"""Remote shards through real loopback servers (tests/_stores.py): HTTP and S3 read like local files; dropped
connections resume at the byte reached; too many drops, a 404 and a stalled server end quickly with an error."""

import time

import pytest

from mmlit.data import ShardError, iter_samples
from mmlit.compat.aiohttp import arrived_before_failure
from mmlit.data import remote
from mmlit.data.shards import open_shard, shard_size

from ..conftest import write_tar


def _samples(n, size=3000):
    return [{"__key__": f"k{i:04d}", "bin": bytes([i % 251]) * size, "json": b'{"i": %d}' % i} for i in range(n)]


def _keys_and_data(samples):
    return [(s["__key__"], s["bin"], s["json"]) for s in samples]


@pytest.fixture
def fast_retries(monkeypatch):
    """Three retries, 10 ms apart at first."""
    monkeypatch.setattr(remote, "RETRIES", 3)
    monkeypatch.setattr(remote, "BACKOFF_S", 0.01)


def test_http_and_s3_give_the_samples_of_the_local_file(http_store, s3_store):
    local = write_tar(http_store.root / "a.tar", _samples(40))
    expected = _keys_and_data(iter_samples(str(local)))
    assert len(expected) == 40
    (url,) = s3_store.upload(http_store.root)
    assert url == f"{s3_store.url}/a.tar"
    assert _keys_and_data(iter_samples(http_store.url + "/a.tar")) == expected
    assert _keys_and_data(iter_samples(url)) == expected  # endpoint and credentials from the fixture's environment
    assert _keys_and_data(iter_samples(url, 5, 9, storage_options=s3_store.storage_options)) == expected[5:9]
    assert _keys_and_data(iter_samples(http_store.url + "/a.tar", 35)) == expected[35:]
    assert [(r.method, r.range) for r in http_store.requests("/a.tar")] == [("GET", None), ("GET", None)]


def test_bytes_read_and_shard_size_everywhere(http_store, s3_store):
    local = write_tar(http_store.root / "a.tar", _samples(20))
    size = local.stat().st_size
    (s3_url,) = s3_store.upload(http_store.root)
    for url in (str(local), "file://" + str(local), http_store.url + "/a.tar", s3_url):
        assert shard_size(url) == size, url
        with open_shard(url) as shard:
            assert shard.bytes_read == 0
            head = shard.read(100)
            assert head == local.read_bytes()[:100] and 100 <= shard.bytes_read <= size, url
            shard.read()
            assert shard.bytes_read == size, url
        with pytest.raises(FileNotFoundError):
            shard_size(url.replace("a.tar", "missing.tar"))
    assert http_store.requests("/missing.tar")[0].method == "HEAD"
    (http_store.root / "a.tar").unlink()  # a shard removed after a listing is missing, not cached
    s3_store.client().delete_object(Bucket=s3_store.bucket, Key="a.tar")
    for url in (str(local), http_store.url + "/a.tar", s3_url):
        with pytest.raises(FileNotFoundError):
            shard_size(url)


def test_a_dropped_connection_resumes_at_the_byte_reached(http_store):
    local = write_tar(http_store.root / "a.tar", _samples(600, size=10_000))  # 7.6 MB
    size = local.stat().st_size
    http_store.drop_after("/a.tar", 3_000_000)
    url = http_store.url + "/a.tar"
    with open_shard(url) as shard:
        assert shard.read() == local.read_bytes() and shard.bytes_read == size
    first, retry = http_store.requests("/a.tar")
    assert first.range is None and first.bytes_sent == 3_000_000
    # every byte that arrived is read (also those aiohttp had buffered when it saw the drop): the retry asks for the rest
    assert retry.status == 206 and retry.range == (3_000_000, None) and retry.bytes_sent == size - 3_000_000
    http_store.drop_after("/a.tar", 1_000_000, times=2)
    assert _keys_and_data(iter_samples(url)) == _keys_and_data(iter_samples(str(local)))
    assert [r.range is not None and r.range[0] > 0 for r in http_store.requests("/a.tar")[2:]] == [False, True, True]


def test_a_late_read_keeps_the_bytes_that_arrived_before_a_drop(http_store):
    """The reader comes for the body after the connection has already failed (the loop thread saw the drop while the
    reader was busy): the bytes that arrived are still read, and the retry asks for the rest."""
    local = write_tar(http_store.root / "a.tar", _samples(100, size=10_000))
    http_store.drop_after("/a.tar", 100_000)
    with open_shard(http_store.url + "/a.tar") as shard:  # (opened: the response's headers have arrived)
        deadline = time.monotonic() + 5
        while sum(r.bytes_sent for r in http_store.requests("/a.tar")) < 100_000 and time.monotonic() < deadline:
            time.sleep(0.01)  # (the server logs a request once its headers are out, maybe after the client has them)
        time.sleep(0.2)  # the last bytes and the end of the connection reach the client before it reads
        assert shard.read() == local.read_bytes()
    assert [r.range for r in http_store.requests("/a.tar")] == [None, (100_000, None)]


def test_more_drops_than_retries_end_with_a_shard_error_quickly(http_store, fast_retries, tmp_path):
    local = write_tar(http_store.root / "a.tar", _samples(600, size=10_000))
    http_store.drop_after("/a.tar", 200_000, times=10)  # less than a MiB between failures: they count in a row
    url = http_store.url + "/a.tar"
    started, read = time.monotonic(), []
    with pytest.raises(ShardError, match=r"a.tar: unreadable after \d+ sample.*ConnectionError.*after 3 retries"):
        read.extend(iter_samples(url))
    assert time.monotonic() - started < 5
    # each try advances by the 200 kB that arrived, however late the reader came for them
    assert [(r.range, r.bytes_sent) for r in http_store.requests("/a.tar")] == [
        (None, 200_000), ((200_000, None), 200_000), ((400_000, None), 200_000), ((600_000, None), 200_000)]
    cut = tmp_path / "cut.tar"  # the samples of those 800 kB, read from a local copy cut there
    cut.write_bytes(local.read_bytes()[:800_000])
    expected = []
    with pytest.raises(ShardError):
        expected.extend(iter_samples(str(cut)))
    # (a local file ends where a connection fails: the last sample before the cut may be told apart by that alone)
    assert _keys_and_data(read) == _keys_and_data(expected[:len(read)]) and len(read) >= len(expected) - 1 >= 60


def test_bytes_that_arrived_before_a_failure_are_read_from_aiohttps_buffer():
    """aiohttp's StreamReader raises on every read once a failure is recorded; the bytes it held come back through
    ``arrived_before_failure`` (the one private access of aiohttp: this fails if it moves)."""
    import asyncio

    import aiohttp
    from aiohttp.base_protocol import BaseProtocol

    async def scenario():
        content = aiohttp.StreamReader(BaseProtocol(asyncio.get_running_loop()), 2 ** 16)
        content.feed_data(b"abcdef")
        assert arrived_before_failure(content, 4) == b""  # no failure: reads return the bytes themselves
        content.set_exception(aiohttp.ClientPayloadError("Response payload is not completed"))
        with pytest.raises(aiohttp.ClientPayloadError):
            await content.read(6)
        return arrived_before_failure(content, 4), arrived_before_failure(content, 4)

    assert asyncio.run(scenario()) == (b"abcd", b"ef")


def test_a_missing_shard_is_not_retried(http_store, fast_retries):
    with pytest.raises(ShardError, match="missing.tar: unreadable after 0 sample.*FileNotFoundError.*404"):
        list(iter_samples(http_store.url + "/missing.tar"))
    assert [(r.method, r.status) for r in http_store.requests()] == [("GET", 404)]


def test_a_stalled_server_ends_with_an_error_within_the_timeout(http_store, monkeypatch):
    write_tar(http_store.root / "a.tar", _samples(600, size=10_000))
    monkeypatch.setattr(remote, "READ_TIMEOUT_S", 2.0)
    monkeypatch.setattr(remote, "RETRIES", 1)
    monkeypatch.setattr(remote, "BACKOFF_S", 0.01)
    http_store.stall("/a.tar", after_bytes=100_000, times=2)  # headers and 100 kB, then silence: twice
    started = time.monotonic()
    with pytest.raises(ShardError, match="a.tar: unreadable after .*gave up after 1 retries"):
        list(iter_samples(http_store.url + "/a.tar"))
    assert 3.5 < time.monotonic() - started < 8  # two reads of 2 s each
    http_store.stall("/a.tar", times=1)  # once: the retry reads the whole shard
    assert len(list(iter_samples(http_store.url + "/a.tar", storage_options={"client_kwargs": {"timeout": 1}}))) == 600
