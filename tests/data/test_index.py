"""Shard indexes and planning: index files, img2dataset counts, the scan cache, stale indexes, remote shards without
counts, and resumes whose reads do not grow with the position in the epoch."""

from __future__ import annotations

import itertools
import json
import os

import pytest

from mmlit.data import (
    MultiTaskDataModule, ShardIndex, SourceStream, StaleIndexError, TarSource, TaskStream, load_index, plan_shards,
    sample_field, scan_shards, write_index,
)
from mmlit.data.tools import main as data_main
from mmlit.data import Shards, TaskData

from ..conftest import soc_task, write_tar


class KeyTask(TaskData):
    fields = ("json",)

    def __init__(self, shards, batch_size=32):
        super().__init__(shards, batch_size)
        self.name = "keys"

    def prepare(self, sample, tokenizer):
        yield {"key": sample["__key__"], "i": sample_field(sample, "json.i", self.name)}


class CountingSource(TarSource):
    """The tar source, counting what it is asked to scan and the samples it reads (in this process)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.counted, self.samples = [], 0

    def scan(self, url):
        self.counted.append(url)
        return super().scan(url)

    def read(self, url, start, stop):
        for sample in super().read(url, start, stop):
            self.samples += 1
            yield sample

    def read_spans(self, url, spans, offsets):
        for sample in super().read_spans(url, spans, offsets):
            self.samples += 1
            yield sample


def _shards(root, sizes, prefix="s"):
    root.mkdir(parents=True, exist_ok=True)
    return [str(write_tar(root / f"{prefix}-{i:03d}.tar", [{"__key__": f"{prefix}{i}_{j:03d}", "json": b'{"i": %d}' % j}
                                                        for j in range(n)])) for i, n in enumerate(sizes)]


def test_index_round_trip_relative_urls_and_the_cli(tmp_path):
    urls = _shards(tmp_path / "data", [3, 5, 2])
    assert data_main(["index", str(tmp_path / "data" / "s-{000..002}.tar"), "--out", str(tmp_path / "data" / "i.json")]) == 0
    content = json.loads((tmp_path / "data" / "i.json").read_text())
    assert content["__kind__"] == "wids-shard-index-v1" and content["wids_version"] == 1
    assert [(e["url"], e["nsamples"], e["filesize"]) for e in content["shardlist"]] == [
        (os.path.basename(u), n, os.path.getsize(u)) for u, n in zip(urls, [3, 5, 2])]
    assert all(e["offsets"] for e in content["shardlist"])  # (tests/data/test_offsets.py checks them)
    moved = tmp_path / "moved"
    (tmp_path / "data").rename(moved)  # relative URLs: the folder can move
    index = load_index(str(moved / "i.json"), "k")
    assert index.urls == [str(moved / os.path.basename(u)) for u in urls] and index.counts == [3, 5, 2]
    assert index.sizes == [os.path.getsize(u) for u in index.urls] and index.origin == str(moved / "i.json")


def test_a_fit_on_an_index_reads_what_a_fit_on_the_pattern_reads(soc, tmp_path):
    write_index(soc["shards"]["train"], str(tmp_path / "train.json"), progress=False)
    keys = []
    for train in (str(tmp_path / "train.json"), soc["train"]):
        task = soc_task("vqa", Shards(train=train), batch_size=4)
        module = MultiTaskDataModule(soc["tokenizer"], tasks={"vqa": task}, num_workers=0, steps_per_epoch=6)
        module.tasks["vqa"].name = "vqa"
        module.setup("fit")
        mixture = module.train_dataloader()
        keys.append([b["vqa"]["answers"].tolist() for b in itertools.islice(mixture, 6)])
    assert keys[0] == keys[1]


def test_img2dataset_stats_count_remote_shards_without_opening_one_and_local_shards_are_scanned(
        tmp_path, http_store, monkeypatch):
    monkeypatch.setenv("MMLIT_CACHE", str(tmp_path / "cache"))
    for root in (tmp_path / "local", http_store.root):
        urls = _shards(root, [4, 6])
        for url, n in zip(urls, [4, 6]):
            with open(url[: -len(".tar")] + "_stats.json", "w") as f:
                json.dump({"count": n + 2, "successes": n, "failed_to_download": 2}, f)
    source = CountingSource()
    index = plan_shards(http_store.url + "/s-{000..001}.tar", "k", source=source)
    assert index.counts == [4, 6] and index.offsets is None and source.counted == []
    assert {r.path for r in http_store.requests()} == {"/s-000_stats.json", "/s-001_stats.json"}
    index = plan_shards(str(tmp_path / "local" / "s-{000..001}.tar"), "k", source=source)  # headers only, and cached
    assert index.counts == [4, 6] and len(source.counted) == 2 and len(index.sample_offsets(1)) == 7


def test_local_scans_are_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("MMLIT_CACHE", str(tmp_path / "cache"))
    urls = _shards(tmp_path / "d", [3, 4])
    spec = str(tmp_path / "d" / "s-{000..001}.tar")
    first, second = CountingSource(), CountingSource()
    assert plan_shards(spec, "k", source=first).counts == [3, 4] and sorted(first.counted) == urls
    assert plan_shards(spec, "k", source=second).counts == [3, 4] and second.counted == []
    write_tar(urls[1], [{"__key__": f"n{j}", "json": b"{}"} for j in range(7)])  # rewritten: counted again
    os.utime(urls[1], ns=(1, 1))
    third = CountingSource()
    assert plan_shards(spec, "k", source=third).counts == [3, 7] and third.counted == [urls[1]]


def test_a_stale_index_is_an_error_naming_the_shard_and_the_index(tmp_path):
    urls = _shards(tmp_path, [4, 4])
    write_index(urls, str(tmp_path / "i.json"), progress=False)
    index = load_index(str(tmp_path / "i.json"), "k")
    write_tar(urls[1], [{"__key__": f"n{j}", "json": b'{"i": 0}'} for j in range(60)])  # grew
    stream = TaskStream(KeyTask(Shards()), index, None, batch_size=2, train=False)
    with pytest.raises(StaleIndexError, match=r"s-001\.tar.*i\.json"):
        list(stream)
    os.remove(urls[1])
    with pytest.raises(StaleIndexError, match=r"s-001\.tar: listed in the index .*i\.json.* but missing"):
        list(stream)


def test_a_shard_with_fewer_samples_than_counted_is_an_error(tmp_path):
    urls = _shards(tmp_path, [4])
    stream = TaskStream(KeyTask(Shards()), ShardIndex(urls, [6]), None, batch_size=2, train=False)
    with pytest.raises(StaleIndexError, match="holds 4 sample"):
        list(stream)


def test_remote_shards_without_counts_are_an_error_naming_the_key_and_the_command():
    with pytest.raises(ValueError, match=r"model\.tasks\.t\.init_args\.shards\.train: 10 remote shard\(s\) without sample "
                                         r"counts.*mmlit data index 'https://example\.invalid/s-\{0\.\.9\}\.tar'"):
        plan_shards("https://example.invalid/s-{0..9}.tar", "model.tasks.t.init_args.shards.train")


def _resume_reads(index, workers, fractions, shuffle_buffer):
    """Samples the source reads to deliver the first batch after resuming at each fraction of an epoch."""
    reads = []
    for fraction in fractions:
        stream = TaskStream(KeyTask(Shards()), index, None, batch_size=4, train=True, seed=1, shuffle_buffer=shuffle_buffer,
                            source=CountingSource())
        stream.start_batch = int(fraction * stream.batches_per_epoch)
        next(iter(stream))
        reads.append(stream.source.samples)
    return reads


def test_resume_reads_only_its_batch_wherever_it_starts(tmp_path):
    index = scan_shards(_shards(tmp_path, [25] * 40), "k")  # 1000 samples, windows of 40
    assert _resume_reads(index, 0, [0, 0.1, 0.5, 0.95], shuffle_buffer=40) == [4] * 4  # the batch, nothing before


def test_unshuffled_resume_starts_at_its_sample(tmp_path):
    index = scan_shards(_shards(tmp_path, [25] * 8), "k")
    assert _resume_reads(index, 0, [0.5], shuffle_buffer=0) == [4]  # batch 25 alone


def test_windows_shuffle_across_their_shards(tmp_path):
    index = scan_shards(_shards(tmp_path, [10] * 6), "k")
    stream = TaskStream(KeyTask(Shards()), index, None, batch_size=30, train=True, seed=0, shuffle_buffer=30)
    _, batch, _ = next(iter(stream))
    assert len({key.split("_")[0] for key in batch["key"]}) == 3  # one window of 3 shards, mixed
    assert batch["key"] != sorted(batch["key"])


def test_tasks_on_one_source_read_each_sample_once(tmp_path):
    index = scan_shards(_shards(tmp_path, [6, 6]), "k")
    alone = []
    for name in ("a", "b"):
        task = KeyTask(Shards())
        task.name = name
        alone.append(TaskStream(task, index, None, batch_size=3, train=True, seed=2, shuffle_buffer=4, source=CountingSource()))
    a, b = (KeyTask(Shards()), KeyTask(Shards()))
    a.name, b.name = "a", "b"
    shared = SourceStream([a, b], index, None, batch_size=3, train=True, seed=2, shuffle_buffer=4, source=CountingSource())
    steps = list(itertools.islice(shared, 4))
    assert shared.source.samples == 12  # 4 batches of 3: each sample read once for both tasks
    for stream, name in zip(alone, ("a", "b")):
        assert [batch["key"] for _, batch, _ in itertools.islice(stream, 4)] == [s[0][name]["key"] for s in steps]
    assert sum(s.source.samples for s in alone) == 24


# Over stores on loopback: an HTTP server with an access log, and moto's S3 server.
def test_a_fit_over_500_remote_shards_opens_no_shard_at_setup(tmp_path, http_store):
    from mmlit.cli import main
    from mmlit.data.sort_of_clevr import write_dataset

    from ..conftest import make_soc, tiny_recipe, write_recipe

    soc = make_soc(tmp_path / "soc")
    shards = write_dataset(http_store.root, {"train": 500, "val": 4}, seed=1, shard_size=1)
    write_index(shards["train"], str(http_store.root / "train.json"), progress=False)
    write_index(shards["val"], str(http_store.root / "val.json"), progress=False)
    recipe = tiny_recipe(soc, tmp_path / "run", tasks=["vqa", "image_classification"], logger=False, max_steps=3,
                         num_sanity_val_steps=0)
    for task in recipe["model"]["tasks"].values():
        task["init_args"]["shards"] = {"train": http_store.url + "/train.json", "val": http_store.url + "/val.json"}
    main(["fit", "--config", str(write_recipe(recipe, tmp_path / "r.yaml"))])
    indexes = http_store.requests("/*.json")
    assert sorted(r.path for r in indexes) == ["/train.json", "/val.json"]  # read once each, for both tasks
    read = {r.path for r in http_store.requests("/train-*.tar")}
    # 3 steps of 4 samples for two tasks on one source, in windows of 20 one-sample shards: one window read.
    assert 12 <= len(read) <= 40, len(read)


def _remote_resume_bytes(store, index_url, fractions):
    index = load_index(index_url, "k")
    sent = []
    for fraction in fractions:
        before = store.bytes_sent("/s-*")
        stream = TaskStream(KeyTask(Shards()), index, None, batch_size=4, train=True, seed=1, shuffle_buffer=40)
        stream.start_batch = int(fraction * stream.batches_per_epoch)
        next(iter(stream))
        sent.append(store.bytes_sent("/s-*") - before)
    return sent


def test_a_remote_resume_at_90_percent_reads_what_one_at_10_percent_reads(http_store):
    urls = _shards(http_store.root, [25] * 40)
    write_index(urls, str(http_store.root / "i.json"), progress=False)
    at_10, at_90 = _remote_resume_bytes(http_store, http_store.url + "/i.json", [0.1, 0.9])
    whole = sum(os.path.getsize(u) for u in urls)
    assert 0 < at_90 <= 2 * at_10 and at_10 < whole / 5, (at_10, at_90, whole)


def test_an_index_and_its_shards_on_s3(tmp_path, s3_store):
    urls = _shards(tmp_path / "local", [3, 5])
    write_index(urls, str(tmp_path / "local" / "i.json"), progress=False)
    s3_store.upload(tmp_path / "local", prefix="data/")
    index = load_index(s3_store.url + "/data/i.json", "k")
    assert index.urls == [f"{s3_store.url}/data/{os.path.basename(u)}" for u in urls] and index.counts == [3, 5]
    remote = [b["key"] for _, b, _ in TaskStream(KeyTask(Shards()), index, None, batch_size=2, train=False)]
    local = [b["key"] for _, b, _ in TaskStream(KeyTask(Shards()), load_index(str(tmp_path / "local" / "i.json"), "k"),
                                                None, batch_size=2, train=False)]
    assert remote == local and len(remote) == 4


def test_an_index_beside_its_shards_folder_points_back_into_it(tmp_path, monkeypatch):
    _shards(tmp_path / "data", [2, 3])
    (tmp_path / "indexes").mkdir()
    monkeypatch.chdir(tmp_path)
    write_index(["data/s-000.tar", "data/s-001.tar"], "indexes/train.json", progress=False)
    assert [e["url"] for e in json.loads((tmp_path / "indexes" / "train.json").read_text())["shardlist"]] == [
        "../data/s-000.tar", "../data/s-001.tar"]
    index = load_index("indexes/train.json", "k")
    assert [os.path.normpath(u) for u in index.urls] == ["data/s-000.tar", "data/s-001.tar"]
    assert len(list(TaskStream(KeyTask(Shards()), index, None, batch_size=5, train=False))) == 1


def test_an_index_lists_shards_not_commands(tmp_path, http_store):
    entries = {"shardlist": [{"url": "pipe:curl http://x/a.tar", "nsamples": 1}], "__kind__": "wids-shard-index-v1"}
    (tmp_path / "i.json").write_text(json.dumps(entries))
    with pytest.raises(ValueError, match="a shell command; an index may list shards only"):
        load_index(str(tmp_path / "i.json"), "k")
    entries["shardlist"][0]["url"] = "/etc/passwd"
    (http_store.root / "i.json").write_text(json.dumps(entries))
    with pytest.raises(ValueError, match="the remote index .* lists the local file '/etc/passwd'"):
        load_index(http_store.url + "/i.json", "k")
