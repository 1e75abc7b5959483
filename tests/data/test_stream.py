import io
import itertools
import tarfile

import pytest
import torch
from torch.utils.data import DataLoader

from mmlit.data import SampleError, TaskStream, UnsafeSampleError, decode_sample, resolve_shards
from mmlit.tasks.base import Shards, Task, collate_examples
from mmlit.text import load_tokenizer


class KeyTask(Task):
    """Yields each sample's key and its number of questions, so tests can count what was read."""

    task_name = "keys"

    def prepare(self, sample, tokenizer):
        yield {"key": sample["__key__"], "n": len(sample["json"]["questions"])}


def _keys(stream_kwargs, urls, tokenizer, workers=0, batches=None):
    stream = TaskStream(KeyTask(Shards()), urls, tokenizer, **stream_kwargs)
    loader = DataLoader(stream, batch_size=None, num_workers=workers)
    out = []
    for batch in itertools.islice(loader, batches):
        out.extend(batch["keys"]["key"])
    return out


@pytest.mark.parametrize("world_size,workers", [(1, 0), (1, 2), (2, 0), (2, 2), (3, 1)])
def test_evaluation_reads_every_sample_exactly_once(soc, world_size, workers):
    tokenizer = load_tokenizer(soc["tokenizer"])
    urls = soc["shards"]["train"]  # 4 shards of 10
    seen = []
    for rank in range(world_size):
        seen += _keys(dict(batch_size=3, train=False, rank=rank, world_size=world_size), urls, tokenizer, workers)
    assert sorted(seen) == [f"train{i:07d}" for i in range(40)]


def test_evaluation_with_fewer_shards_than_readers_splits_samples(soc):
    tokenizer = load_tokenizer(soc["tokenizer"])
    seen = []
    for rank in range(2):
        seen += _keys(dict(batch_size=5, train=False, rank=rank, world_size=2), soc["shards"]["val"], tokenizer, 2)
    assert sorted(seen) == [f"val{i:07d}" for i in range(12)]


def test_training_stream_repeats_reshuffles_and_is_seeded(soc):
    tokenizer = load_tokenizer(soc["tokenizer"])
    kwargs = dict(batch_size=4, train=True, seed=7, shuffle_buffer=16)
    first = _keys(kwargs, soc["shards"]["train"], tokenizer, batches=25)  # 100 examples: 2.5 passes
    again = _keys(kwargs, soc["shards"]["train"], tokenizer, batches=25)
    other = _keys(dict(kwargs, seed=8), soc["shards"]["train"], tokenizer, batches=25)
    assert first == again
    assert first != other
    assert len(first) == 100 and len(set(first)) == 40  # the stream went past one pass over 40 keys
    assert first[:40] != sorted(first[:40])


def test_collate_pads_token_lists_and_stacks_tensors():
    batch = collate_examples([{"ids": [5, 6, 7], "x": torch.ones(2), "y": 1, "s": "a"},
                              {"ids": [8], "x": torch.zeros(2), "y": 0, "s": "b"}])
    assert batch["ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["x"].shape == (2, 2) and batch["y"].tolist() == [1, 0] and batch["s"] == ["a", "b"]


@pytest.mark.parametrize("ext", ["pyd", "pickle", "pth", "pt"])
def test_decoder_refuses_formats_that_run_code(ext):
    import pickle

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pwned')",))

    sample = {"__key__": "evil", "__url__": "evil.tar", f"{ext}": pickle.dumps(Boom())}
    with pytest.raises(UnsafeSampleError, match=r"evil.tar: sample 'evil': refusing entry"):
        decode_sample(sample)


def test_malicious_shard_is_refused_by_the_stream(soc, tmp_path):
    import pickle

    path = tmp_path / "evil-000000.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [("k0.json", b'{"questions": []}'), ("k0.pyd", pickle.dumps({"a": 1}))]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(UnsafeSampleError, match="refusing entry 'pyd'"):
        _keys(dict(batch_size=1, train=False), [str(path)], load_tokenizer(soc["tokenizer"]))


def test_missing_field_names_shard_and_sample(soc, tmp_path):
    path = tmp_path / "nojson-000000.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("k7.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(SampleError, match=r"nojson-000000.tar: sample 'k7'.*task 'keys'"):
        _keys(dict(batch_size=1, train=False), [str(path)], load_tokenizer(soc["tokenizer"]))


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
