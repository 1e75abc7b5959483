"""Shard URLs, reading samples from a tar (with skipping), scanning counts, and broken or remote shards."""

import pytest

from mmlit.data import ShardError, iter_samples, resolve_shards, scan_shards

from .._stores import HTTPStore
from ..conftest import write_tar


def _samples(n, prefix="k"):
    return [{"__key__": f"{prefix}{i:03d}", "json": b'{"i": %d}' % i, "txt": b"t"} for i in range(n)]


def test_resolve_shards(soc, tmp_path):
    assert resolve_shards(soc["train"], "k") == soc["shards"]["train"]
    assert resolve_shards(str(soc["root"] / "train-*.tar"), "k") == soc["shards"]["train"]
    with pytest.raises(FileNotFoundError, match=r"model.tasks.vqa.init_args.shards.train: no shard matches"):
        resolve_shards(str(tmp_path / "x-{000..002}.tar"), "model.tasks.vqa.init_args.shards.train")
    with pytest.raises(ValueError, match="runs a shell command"):
        resolve_shards("pipe:curl http://example.com/a.tar", "k")
    assert resolve_shards("pipe:cat a.tar", "k", allow_pipe=True) == ["pipe:cat a.tar"]
    assert resolve_shards("https://example.com/a-{0..1}.tar", "k") == ["https://example.com/a-0.tar",
                                                                         "https://example.com/a-1.tar"]


def test_iter_samples_groups_members_and_reads_a_range(tmp_path):
    path = str(write_tar(tmp_path / "a.tar", _samples(7)))
    every = list(iter_samples(path))
    assert [s["__key__"] for s in every] == [f"k{i:03d}" for i in range(7)]
    assert every[3]["json"] == b'{"i": 3}' and every[3]["txt"] == b"t" and every[3]["__index__"] == 3
    assert [s["__key__"] for s in iter_samples(path, 2, 5)] == ["k002", "k003", "k004"]
    assert [s["__index__"] for s in iter_samples(path, 5)] == [5, 6]


def test_truncated_and_corrupt_shards_raise_after_what_was_readable(tmp_path):
    path = write_tar(tmp_path / "a.tar", _samples(6))
    data = path.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2 + 100])  # inside a member: the tar ends mid-file
    read = []
    with pytest.raises(ShardError, match=r"cut.tar: unreadable after \d sample"):
        read.extend(s["__key__"] for s in iter_samples(str(cut)))
    assert 0 < len(read) < 6 and read == [f"k{i:03d}" for i in range(len(read))]
    boundary = tmp_path / "boundary.tar"
    boundary.write_bytes(data[:512 * 6])  # cut exactly between members: tarfile alone sees a clean end
    with pytest.raises(ShardError, match="no end-of-archive blocks"):
        list(iter_samples(str(boundary)))
    flipped = bytearray(data)
    flipped[512 * 4 + 1] ^= 0x01  # the second sample's first header: the first sample may lack members, so it is not kept either
    (tmp_path / "flipped.tar").write_bytes(bytes(flipped))
    with pytest.raises(ShardError, match="unreadable after 0 sample.*bad header checksum"):
        list(iter_samples(str(tmp_path / "flipped.tar")))
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"this is not a tar file" * 100)
    with pytest.raises(ShardError, match="unreadable after 0 sample"):
        list(iter_samples(str(garbage)))


def test_scan_counts_samples_keeps_readable_part_and_refuses_empty_tar(tmp_path):
    good = str(write_tar(tmp_path / "good.tar", _samples(5)))
    data = (tmp_path / "good.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2 + 100])
    (tmp_path / "junk.tar").write_bytes(b"junk" * 300)
    index = scan_shards([good, str(tmp_path / "cut.tar"), str(tmp_path / "junk.tar")], "key")
    assert index.urls[0] == good and index.counts[0] == 5
    assert str(tmp_path / "junk.tar") not in index.urls  # nothing readable: left out
    for cut_at in range(256, 5 * 2 * 1024, 256):  # wherever the members are cut, the scan counts what a reader gets
        (tmp_path / "cut2.tar").write_bytes(data[:cut_at])
        readable = []
        with pytest.raises(ShardError):
            readable.extend(iter_samples(str(tmp_path / "cut2.tar")))
        assert scan_shards([str(tmp_path / "cut2.tar")], "k").counts in ([len(readable)], []), cut_at
    assert sorted(e.url for e in index.bad) == [str(tmp_path / "cut.tar"), str(tmp_path / "junk.tar")]
    empty = str(write_tar(tmp_path / "empty.tar", []))
    with pytest.raises(ValueError, match=r"model.tasks.x.init_args.shards.train: shard '.*empty.tar' holds no sample"):
        scan_shards([good, empty], "model.tasks.x.init_args.shards.train")


@pytest.fixture
def http_root(tmp_path):
    """Serves ``tmp_path`` on a local port (``tests/_stores.HTTPStore``); yields the base URL."""
    with HTTPStore(tmp_path) as store:
        yield store.url


def test_remote_shards_go_through_the_same_reader(tmp_path, http_root):
    for s in range(2):
        write_tar(tmp_path / f"r-{s}.tar", _samples(4, prefix=f"s{s}_"))
    urls = resolve_shards(http_root + "/r-{0..1}.tar", "k")
    index = scan_shards(urls, "k")
    assert index.counts == [4, 4] and not index.bad
    assert [s["__key__"] for s in iter_samples(urls[1], 1, 3)] == ["s1_001", "s1_002"]
    with pytest.raises(ShardError, match="FileNotFoundError.*HTTP 404"):
        list(iter_samples(http_root + "/missing.tar"))


@pytest.mark.parametrize("fmt,suffix", [("pax", ".tar"), ("gnu", ".tar"), ("ustar", ".tar"), ("pax", ".tar.gz"),
                                        ("gnu", ".tar.bz2"), ("pax", ".tar.xz")])
def test_reader_agrees_with_tarfile_on_every_header_kind(tmp_path, fmt, suffix):
    """PAX headers (webdataset's float mtimes, long paths), GNU long names, plain ustar, gzip."""
    import io
    import tarfile

    path = tmp_path / f"h{suffix}"
    names = [f"k{i}.json" for i in range(3)] + ["d/" + "x" * 120 + ".txt", "d/" + "y" * 90 + "/z.jpg"]
    with tarfile.open(path, "w:" + {".tar": "", ".tar.gz": "gz", ".tar.bz2": "bz2", ".tar.xz": "xz"}[suffix],
                      format={"pax": tarfile.PAX_FORMAT, "gnu": tarfile.GNU_FORMAT, "ustar": tarfile.USTAR_FORMAT}[fmt]) as tar:
        directory = tarfile.TarInfo("d")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)  # a directory entry is not a sample
        for i, name in enumerate(names):
            if fmt == "ustar" and len(name) > 100:
                continue
            info = tarfile.TarInfo(name)
            info.size, info.mtime = i + 3, 1.5e9 + 0.25  # a float mtime makes a PAX header per member
            tar.addfile(info, io.BytesIO(bytes([65 + i]) * (i + 3)))
    with tarfile.open(path) as tar:
        expected = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    got = {f"{s['__key__']}.{ext}": v for s in iter_samples(str(path)) for ext, v in s.items() if not ext.startswith("__")}
    assert got == expected and len(got) >= 4
    assert [s["__index__"] for s in iter_samples(str(path), 1, 3)] == [1, 2]
