"""Remote shards through real loopback servers (tests/_stores.py): HTTP and S3 read like local files; dropped
connections resume at the byte reached; too many drops, a 404 and a stalled server end quickly with an error."""

import time

import pytest

from mmlit.data import ShardError, iter_samples
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
    # the retry asks for the rest from the byte the reader had taken (aiohttp drops what it buffered, at most a few
    # hundred KiB, when the connection fails), never from 0
    assert retry.status == 206 and 2_000_000 < retry.range[0] <= 3_000_000 and retry.range[1] is None
    assert retry.bytes_sent == size - retry.range[0]
    http_store.drop_after("/a.tar", 1_000_000, times=2)
    assert _keys_and_data(iter_samples(url)) == _keys_and_data(iter_samples(str(local)))
    assert [r.range is not None and r.range[0] > 0 for r in http_store.requests("/a.tar")[2:]] == [False, True, True]


def test_more_drops_than_retries_end_with_a_shard_error_quickly(http_store, fast_retries):
    write_tar(http_store.root / "a.tar", _samples(600, size=10_000))
    http_store.drop_after("/a.tar", 200_000, times=10)  # less than a MiB between failures: they count in a row
    url = http_store.url + "/a.tar"
    started, read = time.monotonic(), []
    with pytest.raises(ShardError, match=r"a.tar: unreadable after \d+ sample.*ConnectionError.*after 3 retries"):
        read.extend(iter_samples(url))
    assert time.monotonic() - started < 5
    assert len(http_store.requests("/a.tar")) == 4 and 0 < len(read) < 600


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
