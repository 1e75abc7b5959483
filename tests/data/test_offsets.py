"""Reads by sample: the byte offsets of a shard's samples (taken from the tar headers, kept in indexes and the scan
cache) and ``Source.read_spans``, which reads exactly the bytes of its spans, locally, over HTTP and on S3."""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import tarfile

import pytest
import webdataset as wds

from mmlit.data import (
    ShardError, ShardIndex, StaleIndexError, TarSource, iter_samples, load_index, plan_shards, scan_shards,
)
from mmlit.data import index as index_module
from mmlit.data import sources
from mmlit.data.index import save_index, write_index
from mmlit.data.shards import scan_samples
from mmlit.data.sources import Source

from ..conftest import write_tar


def _sample(key: str, i: int) -> dict:
    return {"__key__": key, "jpg": bytes([i % 251]) * (100 + 397 * (i % 7)), "json": b'{"i": %d}' % i}


def _tarfile_shard(path, fmt: int, n: int = 12):
    """A shard written by ``tarfile`` in ``fmt``: a directory entry, long names (GNU or PAX headers), a PAX header per
    member (a float mtime), a name without an extension inside a sample and a ``__meta__`` entry between two."""
    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size, info.mtime = len(data), 1.5e9 + 0.25 if fmt == tarfile.PAX_FORMAT else 1_500_000_000
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(path, "w", format=fmt) as tar:
        directory = tarfile.TarInfo("d")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
        for i in range(n):
            sample = _sample(f"d/{'x' * (90 if i % 3 == 0 else 4)}{i:03d}", i)
            add(tar, f"{sample['__key__']}.jpg", sample["jpg"])
            if i == 4:
                add(tar, "d/README", b"not a sample's entry")
            add(tar, f"{sample['__key__']}.json", sample["json"])
            if i == 6:
                add(tar, "__meta__/about.json", b"{}")
    return path


def _tarfile_offsets(path) -> list[int]:
    """Each sample's first header (a member's ``TarInfo.offset``: where its PAX or GNU header starts) and the end of
    the last member, by ``tarfile``, independently of mmlit's parser: samples are the keys of the files, in order."""
    with tarfile.open(path) as tar:
        files = [m for m in tar.getmembers()
                 if m.isfile() and "__meta__" not in m.name and "." in m.name.rsplit("/")[-1]]
    offsets, key = [], None
    for member in files:
        if member.name.split(".")[0] != key:
            key = member.name.split(".")[0]
            offsets.append(member.offset)
    return offsets + [files[-1].offset_data + -(-files[-1].size // 512) * 512]


def _shardwriter_shards(root, n=45, per_shard=20) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(root / "w-%06d.tar"), maxcount=per_shard, encoder=False, verbose=0) as sink:
        for i in range(n):
            sink.write(_sample(f"w{i:04d}", i))
    return sorted(str(p) for p in root.glob("w-*.tar"))


@pytest.mark.parametrize("writer", ["shardwriter", "pax", "gnu", "ustar"])
def test_offsets_are_where_tarfile_finds_each_samples_first_header(tmp_path, writer):
    if writer == "shardwriter":
        paths = _shardwriter_shards(tmp_path)
        assert len(paths) == 3
    else:
        fmt = {"pax": tarfile.PAX_FORMAT, "gnu": tarfile.GNU_FORMAT, "ustar": tarfile.USTAR_FORMAT}[writer]
        paths = [str(_tarfile_shard(tmp_path / "t.tar", fmt))]
    for path in paths:
        count, offsets = TarSource().scan(path)
        assert count == len(list(iter_samples(path))) and offsets == _tarfile_offsets(path), path
        assert count == TarSource().count(path)


def test_the_scan_reads_headers_only_and_takes_no_offsets_of_a_compressed_tar(tmp_path):
    big = write_tar(tmp_path / "big.tar", [{"__key__": f"k{i}", "bin": os.urandom(1 << 20)} for i in range(5)])
    counter = {}
    assert scan_samples(str(big), counter=counter)[0] == 5
    assert counter["bytes"] < os.path.getsize(big) / 50  # each member's data skipped with a seek
    with tarfile.open(tmp_path / "c.tar.gz", "w:gz") as tar, tarfile.open(big) as plain:
        for member in plain:
            tar.addfile(member, plain.extractfile(member))
    assert TarSource().scan(str(tmp_path / "c.tar.gz")) == (5, None)
    gz_spans = list(TarSource().read_spans(str(tmp_path / "c.tar.gz"), [(3, 5), (0, 1)], None))  # read from the start
    assert [s["__key__"] for s in gz_spans] == ["k3", "k4", "k0"]


def _spans(count: int, seed: int) -> list[tuple[int, int]]:
    """Random spans in a random order, two of them meeting (read as one)."""
    rng = random.Random(seed)
    spans = [(a, min(a + rng.randint(1, 3), count)) for a in rng.sample(range(count), 6)]
    return spans + [(1, 3), (3, 4), (count - 1, count)]


def _joined_bytes(spans, offsets) -> list[tuple[int, int]]:
    """The byte ranges of ``spans``, meeting spans joined, as ``read_spans`` reads them."""
    ranges = []
    for a, b in spans:
        if ranges and ranges[-1][1] == offsets[a]:
            ranges[-1] = (ranges[-1][0], offsets[b])
        else:
            ranges.append((offsets[a], offsets[b]))
    return ranges


def _expected(path, spans):
    every = list(iter_samples(path))
    return [s for a, b in spans for s in every[a:b]]


@pytest.mark.parametrize("where", ["local", "http", "s3"])
def test_read_spans_reads_each_span_alone_and_gives_iter_samples_samples(http_store, s3_store, where):
    local = str(_tarfile_shard(http_store.root / "t.tar", tarfile.PAX_FORMAT, n=30))
    count, offsets = TarSource().scan(local)
    spans = _spans(count, seed=3)
    expected = _expected(local, spans)
    url = {"local": local, "http": http_store.url + "/t.tar", "s3": f"{s3_store.url}/t.tar"}[where]
    if where == "s3":
        s3_store.upload(http_store.root)
    source = TarSource(storage_options=s3_store.storage_options if where == "s3" else None)
    assert source.scan(url) == (count, offsets)  # (streamed over HTTP: offsets counted as the bytes go by)
    got = list(source.read_spans(url, spans, offsets))
    expected = [{**s, "__url__": url} for s in expected]
    assert got == expected and len(got) == sum(b - a for a, b in spans)
    ranges = _joined_bytes(spans, offsets)
    assert source.bytes_read == sum(end - start for start, end in ranges) < os.path.getsize(local)
    if where == "http":  # one GET per joined span, of exactly its bytes (after the scan's GET of the whole shard)
        assert [(r.method, r.range, r.bytes_sent) for r in http_store.requests("/t.tar")[1:]] == [
            ("GET", (start, end - 1), end - start) for start, end in ranges]


def test_a_span_larger_than_a_read_is_read_in_pieces_at_sample_boundaries(http_store, monkeypatch):
    local = str(write_tar(http_store.root / "a.tar", [_sample(f"k{i:03d}", i) for i in range(20)]))
    count, offsets = TarSource().scan(local)
    monkeypatch.setattr(sources, "RANGE_READ_BYTES", 6000)
    source = TarSource()
    assert list(source.read_spans(http_store.url + "/a.tar", [(2, 19)], offsets)) == [
        {**s, "__url__": http_store.url + "/a.tar"} for s in list(iter_samples(local))[2:19]]
    requests = http_store.requests("/a.tar")
    assert len(requests) > 3 and requests[0].range[0] == offsets[2] and requests[-1].range[1] == offsets[19] - 1
    for start, end in ((r.range[0], r.range[1] + 1) for r in requests):  # at most 6000 bytes, or a sample alone
        assert end - start <= 6000 or offsets.index(end) == offsets.index(start) + 1
    assert [r.range[0] for r in requests[1:]] == [r.range[1] + 1 for r in requests[:-1]]
    assert source.bytes_read == offsets[19] - offsets[2]


def _rewritten(path, sizes):
    return write_tar(path, [{"__key__": f"k{i:03d}", "bin": b"\x01" * size} for i, size in enumerate(sizes)])


@pytest.mark.parametrize("change", ["same size, moved samples", "shorter", "longer"])
def test_a_shard_rewritten_after_its_index_is_a_stale_index_error_not_garbage(http_store, s3_store, change):
    sizes = [1000, 3000, 500, 2000, 700, 1900, 3000, 3000]
    path = _rewritten(http_store.root / "a.tar", sizes)
    count, offsets = TarSource().scan(str(path))
    size = os.path.getsize(path)
    _rewritten(path, {"same size, moved samples": [3000, 1000, 500, 2000, 1900, 700, 3000, 3000], "shorter": sizes[:3],
                      "longer": [1700] + sizes[1:] + [40] * 3}[change])
    assert os.path.getsize(path) == size or change != "same size, moved samples"
    s3_store.upload(http_store.root)
    new_count, new_offsets = TarSource().scan(str(path))
    new = list(iter_samples(str(path)))
    stale = 0
    for url in (str(path), http_store.url + "/a.tar", s3_store.url + "/a.tar"):
        for a, b in [(a, a + 1) for a in range(count)] + [(0, count), (1, 4), (4, 6)]:
            if b <= new_count and offsets[a] == new_offsets[a] and offsets[b] == new_offsets[b]:
                # the span's bytes are still samples a..b-1 (of the new shard): they are read as they are now
                assert list(TarSource().read_spans(url, [(a, b)], offsets)) == [{**s, "__url__": url} for s in new[a:b]]
                continue
            with pytest.raises(StaleIndexError, match=r"a\.tar: .*(index's offsets|the index was made).*make the index "
                                                      r"again \(`mmlit data index`\)"):
                list(TarSource().read_spans(url, [(a, b)], offsets))
            stale += 1
    assert stale >= 3 * 3


def test_an_index_round_trips_offsets_and_pickles_them_encoded(tmp_path):
    paths = _shardwriter_shards(tmp_path / "d")
    with tarfile.open(tmp_path / "d" / "z.tar.gz", "w:gz") as tar:
        for member_path in paths[:1]:
            with tarfile.open(member_path) as plain:
                for member in plain:
                    tar.addfile(member, plain.extractfile(member))
    paths.append(str(tmp_path / "d" / "z.tar.gz"))
    content = write_index(paths, str(tmp_path / "d" / "i.json"), progress=False)
    assert [bool(e["offsets"]) for e in content["shardlist"]] == [True, True, True, False]
    index = load_index(str(tmp_path / "d" / "i.json"), "k")
    scans = [TarSource().scan(p) for p in paths]
    assert [list(index.sample_offsets(i)) for i in range(3)] == [o for _, o in scans[:3]] and scans[3][1] is None
    assert index.sample_offsets(3) is None and isinstance(index.sample_offsets(1)[0], int)
    again = pickle.loads(pickle.dumps(index))  # (to the loader's workers): the encoded offsets, not what was decoded
    assert again == index and again._decoded == {} and len(pickle.dumps(again)) == len(pickle.dumps(index))
    assert [again.sample_offsets(i) for i in range(4)] == [index.sample_offsets(i) for i in range(4)]
    # save_index (what the converters call) takes the offsets of local shards from their headers, or as given
    save_index([(p, n, os.path.getsize(p)) for p, (n, _) in zip(paths, scans)], str(tmp_path / "d" / "j.json"))
    assert load_index(str(tmp_path / "d" / "j.json"), "k").offsets == index.offsets
    given = [[0] * (scans[0][0] + 1), None, None, None]
    save_index([(p, n, 1) for p, (n, _) in zip(paths, scans)], str(tmp_path / "d" / "g.json"), offsets=given)
    assert list(load_index(str(tmp_path / "d" / "g.json"), "k").sample_offsets(0)) == given[0]
    with pytest.raises(ValueError, match=r"w-000001\.tar' holds 20 sample\(s\), not 21"):
        save_index([(paths[1], 21, 1)], str(tmp_path / "d" / "bad.json"))


def test_decoded_offsets_are_kept_for_a_few_shards_only(tmp_path, monkeypatch):
    monkeypatch.setattr(index_module, "DECODED_OFFSETS", 4)
    path = str(write_tar(tmp_path / "a.tar", [_sample(f"k{i}", i) for i in range(3)]))
    offsets = TarSource().scan(path)[1]
    index = ShardIndex([path] * 50, [3] * 50, offsets=[index_module.encode_offsets(offsets)] * 50)
    for i in range(50):
        assert list(index.sample_offsets(i)) == offsets
    assert sorted(index._decoded) == [46, 47, 48, 49]


def test_an_index_without_offsets_loads_and_reads_from_the_shard(tmp_path):
    """webdataset's own wids index files have no offsets: read_spans falls back to ``read``."""
    path = str(write_tar(tmp_path / "a.tar", [_sample(f"k{i}", i) for i in range(8)]))
    (tmp_path / "wids.json").write_text(json.dumps({"__kind__": "wids-shard-index-v1", "wids_version": 1, "shardlist": [
        {"url": "a.tar", "nsamples": 8, "filesize": os.path.getsize(path)}]}))
    index = load_index(str(tmp_path / "wids.json"), "k")
    assert index.offsets is None and index.sample_offsets(0) is None
    spans = [(5, 7), (0, 2), (2, 3)]
    expected = _expected(path, spans)
    assert list(TarSource().read_spans(index.urls[0], spans, index.sample_offsets(0))) == expected
    (tmp_path / "bad.json").write_text(json.dumps({"__kind__": "wids-shard-index-v1", "shardlist": [
        {"url": "a.tar", "nsamples": 8, "offsets": "AAAA"}]}))
    with pytest.raises(ValueError, match=r"k: .*bad\.json.*\"offsets\" is not the base64 of 9 uint64"):
        load_index(str(tmp_path / "bad.json"), "k")


class _Counting(Source):
    """A source of another format: it counts and reads, and has no byte ranges."""

    def count(self, url):
        return 4

    def read(self, url, start, stop):
        for i in range(start, stop):
            yield {"__key__": f"s{i}", "__url__": url, "__index__": i}


def test_a_source_without_ranges_scans_counts_and_reads_spans_through_read():
    assert _Counting().scan("x") == (4, None)
    assert [s["__index__"] for s in _Counting().read_spans("x", [(2, 4), (0, 1)], None)] == [2, 3, 0]


def test_the_scan_cache_keeps_offsets_and_ignores_another_format(tmp_path, monkeypatch):
    monkeypatch.setenv("MMLIT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "shard-scans.json").write_text(json.dumps({os.path.abspath(tmp_path / "a.tar"): 3}))
    paths = [str(write_tar(tmp_path / f"{c}.tar", [_sample(f"{c}{i}", i) for i in range(n)]))
             for c, n in [("a", 5), ("b", 7)]]
    first = plan_shards(str(tmp_path / "{a,b}.tar"), "k")
    scanned = []
    monkeypatch.setattr(TarSource, "scan", lambda self, url: scanned.append(url))
    second = plan_shards(str(tmp_path / "{a,b}.tar"), "k")
    assert scanned == [] and second.counts == first.counts == [5, 7] and second.offsets == first.offsets
    assert [list(second.sample_offsets(i)) for i in range(2)] == [scan_samples(p)[1] for p in paths]


def test_a_missing_shard_is_a_shard_error_and_a_span_outside_the_shard_an_index_error(tmp_path):
    path = str(write_tar(tmp_path / "a.tar", [_sample(f"k{i}", i) for i in range(3)]))
    offsets = scan_shards([path], "k").sample_offsets(0)
    with pytest.raises(IndexError, match=r"a\.tar: the span \(2, 4\) is outside the shard's 3 samples"):
        list(TarSource().read_spans(path, [(2, 4)], offsets))
    os.remove(path)
    with pytest.raises(ShardError, match=r"a\.tar: unreadable after 0 sample.*FileNotFoundError"):
        list(TarSource().read_spans(path, [(0, 1)], offsets))
