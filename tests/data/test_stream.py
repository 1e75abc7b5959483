"""Task streams: exact epochs over uneven shards for any ranks x workers, resampling, resume, faults, safety."""

import io
import itertools
import pickle

import pytest
import torch
from PIL import Image

from mmlit.data import SampleError, TaskStream, UnsafeSampleError, decode_sample, sample_field, scan_shards
from mmlit.data.workers import task_loader
from mmlit.data import Shards, TaskData
from mmlit.data.collate import collate_examples
from mmlit.data.reading import Plan

from ..conftest import write_tar


class KeyTask(TaskData):
    """Yields each sample's key (and reads its ``json.i``), so tests can count what was read."""

    def __init__(self, shards, batch_size=32):
        super().__init__(shards, batch_size)
        self.name = "keys"

    def prepare(self, sample, tokenizer):
        yield {"key": sample["__key__"], "i": sample_field(sample, "json.i", self.name)}


def _samples(n, prefix):
    return [{"__key__": f"{prefix}{i:03d}", "json": b'{"i": %d}' % i} for i in range(n)]


@pytest.fixture
def uneven(tmp_path):
    """3 shards of 10, 50 and 7 samples."""
    urls = [str(write_tar(tmp_path / f"u-{s}.tar", _samples(n, f"u{s}_"))) for s, n in enumerate((10, 50, 7))]
    return scan_shards(urls, "k")


def _stream(index, **kwargs):
    kwargs.setdefault("shuffle_buffer", 8)
    return TaskStream(KeyTask(Shards()), index, None, **kwargs)


def _take(stream, workers, n):
    return list(itertools.islice(task_loader(stream, workers=workers), n))  # workers get the stream as in a run


@pytest.mark.parametrize("world,workers", [(1, 0), (1, 2), (2, 0), (2, 2), (3, 1)])
def test_epoch_mode_reads_every_sample_once_with_equal_steps_per_rank(uneven, world, workers):
    keys, steps = [], set()
    for rank in range(world):
        stream = _stream(uneven, batch_size=4, train=True, rank=rank, world_size=world, seed=3)
        per_epoch = stream.batches_per_epoch
        items = _take(stream, workers, per_epoch + 1)
        assert [r["epoch"] for _, _, r in items] == [0] * per_epoch + [1]
        keys += [k for _, batch, _ in items[:per_epoch] for k in batch["key"]]
        steps.add(per_epoch)
        assert all(len(batch["key"]) >= 1 for _, batch, _ in items)
    assert len(steps) == 1  # every rank the same number of batches
    assert sorted(keys) == sorted(f"u{s}_{i:03d}" for s, n in enumerate((10, 50, 7)) for i in range(n))


@pytest.mark.parametrize("workers", [0, 2])
def test_uneven_accounting_two_ranks(uneven, workers):
    """67 samples over 2 ranks in global batches of 8: 9 batches each, the last global batch's 3 samples split 1 + 2;
    the same batches whatever the number of workers."""
    sizes = []
    for rank in range(2):
        items = _take(_stream(uneven, batch_size=4, train=True, rank=rank, world_size=2), workers, 10)
        sizes.append([len(batch["key"]) for _, batch, _ in items])
    assert sizes == [[4] * 8 + [1, 4], [4] * 8 + [2, 4]]


def test_epochs_reshuffle_and_are_seeded(uneven):
    def epochs(seed):
        items = _take(_stream(uneven, batch_size=5, train=True, seed=seed), 0, 2 * 14)
        keys = [k for _, batch, _ in items for k in batch["key"]]
        return keys[:67], keys[67:]

    first, second = epochs(0)
    assert sorted(first) == sorted(second) and first != second
    assert epochs(0) == (first, second) and epochs(1)[0] != first


def test_resampled_mode_has_a_global_sample_count(uneven):
    seen = {}
    for world, workers in [(1, 0), (2, 2)]:
        keys = []
        for rank in range(world):
            stream = _stream(uneven, batch_size=4, train=True, rank=rank, world_size=world, samples_per_epoch=30)
            per_epoch = stream.batches_per_epoch
            keys += [k for _, b, r in _take(stream, workers, per_epoch) for k in b["key"]]
        seen[(world, workers)] = keys
        assert len(keys) == 30  # whatever the number of readers
    again = _take(_stream(uneven, batch_size=4, train=True, samples_per_epoch=30), 0, 8)
    assert [k for _, b, _ in again for k in b["key"]] == seen[(1, 0)]  # seeded


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("start", [1, 6, 17])
def test_a_stream_started_at_batch_k_continues_the_uninterrupted_one(uneven, workers, start):
    full = _take(_stream(uneven, batch_size=4, train=True, rank=1, world_size=2), workers, 30)
    resumed = _take(_stream(uneven, batch_size=4, train=True, rank=1, world_size=2, start_batch=start), workers, 30 - start)
    assert [b["key"] for _, b, _ in resumed] == [b["key"] for _, b, _ in full[start:]]


@pytest.mark.parametrize("world,workers", [(1, 0), (1, 2), (2, 2), (3, 1)])
def test_evaluation_reads_every_sample_exactly_once(uneven, world, workers):
    keys = []
    for rank in range(world):
        keys += [k for _, b, _ in _take(_stream(uneven, batch_size=3, train=False, rank=rank, world_size=world), workers, None)
                 for k in b["key"]]
    assert len(keys) == 67 and len(set(keys)) == 67


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_samples_and_cut_shards_are_skipped_and_reported(tmp_path):
    good = _samples(6, "g")
    good[1]["png"] = b"not a png"  # undecodable image
    good[2] = {"__key__": "g002", "txt": b"no json"}  # missing field
    good[3]["png"] = _png()
    whole = write_tar(tmp_path / "a.tar", good)
    data = write_tar(tmp_path / "b.tar", _samples(8, "b")).read_bytes()
    cut = tmp_path / "b.tar"
    index = scan_shards([str(whole), str(cut)], "k")
    cut.write_bytes(data[: len(data) // 2])  # cut after the scan, as if a disk or a network failed while reading
    items = _take(_stream(index, batch_size=3, train=False), 0, None)
    faults = [f for _, _, report in items for f in report["faults"]]
    assert sum(report["samples"] for _, _, report in items) == 14
    assert {f.get("key") for f in faults} >= {"g001", "g002"}
    assert any("cannot decode entry 'png'" in f["error"] for f in faults)
    assert any("needs the entry '.json'" in f["error"] for f in faults)
    lost = [f for f in faults if "index" in f]
    assert lost and all(f["url"] == str(cut) for f in lost)
    used = [k for _, b, _ in items if b is not None for k in b["key"]]
    assert len(used) + len(faults) == 14 and "g003" in used


def test_training_batch_with_no_usable_sample_repeats_the_last_good_one(tmp_path):
    samples = _samples(4, "a") + [{"__key__": f"z{i}", "txt": b"x"} for i in range(4)]
    index = scan_shards([str(write_tar(tmp_path / "a.tar", samples))], "k")
    items = _take(_stream(index, batch_size=4, train=True, shuffle_buffer=0), 0, 2)
    assert items[1][2]["padded"] == 1 and len(items[1][2]["faults"]) == 4
    assert items[1][1]["key"] == items[0][1]["key"]


def test_collate_pads_token_lists_and_stacks_tensors():
    batch = collate_examples([{"ids": [5, 6, 7], "x": torch.ones(2), "y": 1, "s": "a"},
                              {"ids": [8], "x": torch.zeros(2), "y": 0, "s": "b"}])
    assert batch["ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["x"].shape == (2, 2) and batch["y"].tolist() == [1, 0] and batch["s"] == ["a", "b"]


class _Boom:
    def __reduce__(self):
        return (exec, ("raise SystemExit('pwned')",))


@pytest.mark.parametrize("ext", ["pyd", "pickle", "pth", "pt"])
def test_decoder_refuses_formats_that_run_code(ext):
    sample = {"__key__": "evil", "__url__": "evil.tar", f"{ext}": pickle.dumps(_Boom())}
    with pytest.raises(UnsafeSampleError, match=r"evil.tar: sample 'evil': refusing entry"):
        decode_sample(sample)


def test_malicious_shard_is_refused_by_the_stream_not_skipped(tmp_path):
    path = write_tar(tmp_path / "evil-000000.tar", [{"__key__": "k0", "json": b'{"i": 0}', "pyd": pickle.dumps(_Boom())}])
    with pytest.raises(UnsafeSampleError, match="refusing entry 'pyd'"):
        _take(_stream(scan_shards([str(path)], "k"), batch_size=1, train=False), 0, None)


def test_prepare_bug_is_an_error_naming_the_sample(tmp_path):
    class Broken(KeyTask):
        def prepare(self, sample, tokenizer):
            raise ZeroDivisionError("oops")
            yield

    index = scan_shards([str(write_tar(tmp_path / "a.tar", _samples(2, "a")))], "k")
    with pytest.raises(SampleError, match=r"a.tar: sample 'a000': task 'keys' failed to prepare it: ZeroDivisionError"):
        _take(TaskStream(Broken(Shards()), index, None, batch_size=2, train=False), 0, None)


def test_unusable_batches_get_a_stand_in_that_a_resumed_stream_repeats_too(tmp_path):
    bad = [{"__key__": f"z{i}", "txt": b"x"} for i in range(8)]
    good = _samples(8, "a")
    index = scan_shards([str(write_tar(tmp_path / "a.tar", bad[:4] + good[:4] + bad[4:] + good[4:]))], "k")
    whole = _take(_stream(index, batch_size=4, train=True, shuffle_buffer=0), 0, 4)
    keys = [b["key"] for _, b, _ in whole]
    assert keys[0] == keys[1] == [f"a{i:03d}" for i in range(4)]  # the first usable batch stands in for batch 0
    assert keys[2] == keys[1] and keys[3] == [f"a{i:03d}" for i in range(4, 8)]
    assert [r["padded"] for _, _, r in whole] == [1, 0, 1, 0]
    for start in (1, 2, 3):
        resumed = _take(_stream(index, batch_size=4, train=True, shuffle_buffer=0, start_batch=start), 0, 4 - start)
        assert [b["key"] for _, b, _ in resumed] == keys[start:]


def test_plan_locates_each_ranks_share_of_the_global_batches():
    plan = Plan(10, rank=2, world_size=3, batch_size=2)  # global batches of 6: [0, 6) and [6, 10)
    assert plan.batches_per_epoch == 2
    assert [plan.locate(k) for k in range(3)] == [(0, 4, 6), (0, 8, 10), (1, 4, 6)]
    assert Plan(10, rank=0, world_size=3, batch_size=2).locate(1) == (0, 6, 7)  # 4 left: 1 + 1 + 2
    assert [plan.advance(k) for k in range(4)] == [(0, 0), (0, 6), (1, 0), (1, 6)]
    resumed = Plan(10, rank=0, world_size=1, batch_size=4, start=(3, 7))  # 3 left in epoch 3
    assert resumed.first_batches == 1 and resumed.locate(0) == (3, 7, 10) and resumed.locate(1) == (4, 0, 4)
    assert list(resumed.neighbours(0)) == [(3, 7), (0, 3)]  # earlier batches of the epoch, down to its start


def _epoch_keys(index, world, workers, start=(0, 0), batches=None, **kwargs):
    """The keys each rank reads from ``start`` to the end of that epoch (or its first ``batches`` batches), and the
    position after them."""
    keys, position = [], None
    for rank in range(world):
        stream = _stream(index, train=True, rank=rank, world_size=world, seed=5, start=start, **kwargs)
        n = stream.plan.first_batches if batches is None else batches
        keys += [k for _, b, r in _take(stream, workers, n) if not r["padded"] for k in b["key"]]
        position = stream.plan.advance(n)
    return keys, position


@pytest.mark.parametrize("before,after", [((2, 2), (1, 0)), ((1, 0), (2, 2)), ((2, 2), (2, 0)), ((2, 0), (3, 1))],
                         ids=["2-to-1-rank", "1-to-2-ranks", "2-to-0-workers", "2-to-3-ranks"])
def test_a_run_resumed_on_other_ranks_or_workers_reads_every_sample_of_the_epoch_once(uneven, before, after):
    first, position = _epoch_keys(uneven, *before, batches=3, batch_size=4)
    assert position == (0, 3 * 4 * before[0])
    rest, end = _epoch_keys(uneven, *after, start=position, batch_size=3)  # (another batch size too)
    assert end[1] == 67 or end == (1, 0)
    assert sorted(first + rest) == sorted(f"u{s}_{i:03d}" for s, n in enumerate((10, 50, 7)) for i in range(n))
    whole, _ = _epoch_keys(uneven, 1, 0, batch_size=1)
    assert first + rest != sorted(first + rest) and len(whole) == 67  # shuffled, yet every sample once


def test_a_batch_reads_only_its_own_samples(tmp_path):
    """One shard of 200 samples and a window of 100: a batch of 4 reads 4 samples' bytes, not the window's."""
    index = scan_shards([str(write_tar(tmp_path / "big.tar", _samples(200, "b")))], "k")
    stream = _stream(index, batch_size=4, train=True, shuffle_buffer=100, start_batch=30)
    _take(stream, 0, 1)
    sample = (index.sample_offsets(0)[1] - index.sample_offsets(0)[0]) if index.sample_offsets(0) is not None else None
    assert sample is not None and stream.reading.source.bytes_read <= 4 * sample
