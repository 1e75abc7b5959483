"""Per-task streams over tar shards, and the mixture that turns them into training steps.

A ``TaskStream`` is one task's ``IterableDataset``. Its readers are the ``ranks x workers`` slots,
and what each reads is planned from the sample counts of ``scan_shards``:

* **epoch mode**: an epoch is one pass over every sample. The shard order is shuffled per epoch
  (the same on every rank), the samples in that order are cut into one contiguous slice per
  reader (sizes differ by at most one, whatever the shard sizes), and every reader cuts its
  slice into the same number of batches, ``ceil(ceil(N / readers) / batch_size)``: full batches
  and then smaller ones. Every sample is read exactly once and every rank yields the same
  number of batches, so no rank waits for another.
* **resampled mode**: each reader draws shards with replacement (seeded by epoch and reader)
  until it has its slice of ``samples_per_epoch``, which is a global number whatever the
  number of ranks and workers.

Raw samples are shuffled in a buffer (seeded by epoch and reader) before decoding, so a stream
can resume at any batch by reading the raw samples before it again without decoding them. The
position is one number per task: the batches the rank's loader has delivered, which is the
same on every rank. A sample that cannot be used is skipped and reported with its batch.
"""

from __future__ import annotations

import collections
import copy
import itertools
import math
import random
from typing import TYPE_CHECKING, Iterator

import webdataset as wds
from torch import nn
from torch.utils.data import IterableDataset, get_worker_info

from mmlit.data.decode import SampleError, UnsafeSampleError, decode_sample, sample_location
from mmlit.data.shards import ShardError, ShardIndex, iter_samples

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from mmlit.data.faults import FaultLog
    from mmlit.data.mixing import TaskSampler
    from mmlit.tasks.base import Task

__all__ = ["Mixture", "Sequential", "TaskStream"]


def _rng(*parts) -> random.Random:
    """A generator seeded by a tuple (string seeds are hashed with SHA-512: no collisions between tuples)."""
    return random.Random(":".join(map(str, ("mmlit", *parts))))


def _slice(total: int, readers: int, reader: int) -> tuple[int, int]:
    return total * reader // readers, total * (reader + 1) // readers


def _batch_sizes(n: int, batches: int, batch_size: int) -> list[int]:
    """``n`` samples in exactly ``batches`` batches: full ones first, then at least one sample in each
    while samples last (empty batches, only when ``n < batches``, come last)."""
    sizes, left = [], n
    for i in range(batches):
        size = min(batch_size, max(left - (batches - i - 1), min(left, 1)))
        sizes.append(size)
        left -= size
    return sizes


def _has_state(module: nn.Module) -> bool:
    return any(True for _ in itertools.chain(module.parameters(), module.buffers()))


def _slot() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class TaskStream(IterableDataset):
    """Batches of one task, as ``(task_name, batch, report)``; the report says what was read and skipped.

    Args:
        task: the task that prepares and collates examples.
        index: the shards and their sample counts.
        batch_size: samples per batch (per rank).
        train: training streams shuffle and never end; evaluation streams read every sample once.
        samples_per_epoch: resampled mode with this many samples per epoch (all ranks together);
            ``None`` is epoch mode.
        start_batch: the number of batches the rank's loader delivered before (a resumed run).
    """

    def __init__(self, task: Task, index: ShardIndex, tokenizer: Tokenizer, *, batch_size: int, train: bool,
                 samples_per_epoch: int | None = None, seed: int = 0, shuffle_buffer: int = 1000, rank: int = 0,
                 world_size: int = 1, allow_pipe: bool = False, start_batch: int = 0):
        super().__init__()
        self.task, self.index, self.tokenizer = task, index, tokenizer
        self.batch_size, self.train, self.samples_per_epoch = batch_size, train, samples_per_epoch
        self.seed, self.shuffle_buffer, self.allow_pipe = seed, shuffle_buffer, allow_pipe
        self.rank, self.world_size, self.start_batch = rank, world_size, start_batch

    def __getstate__(self) -> dict:
        """What a worker started by ``forkserver`` or ``spawn`` receives: the task without its parameters, buffers,
        hooks and the submodules that hold state (its head and metrics: ``prepare`` and ``collate`` need none of
        them, and the head may live on a GPU). Submodules without state (an image transform) and ``training`` stay."""
        state = self.__dict__.copy()
        task = state["task"] = copy.copy(self.task)
        empty = nn.Module().__dict__
        del empty["training"]
        task.__dict__.update(empty)  # no parameters, buffers or hooks
        task.__dict__["_modules"] = {name: module for name, module in self.task._modules.items()
                                     if module is not None and not _has_state(module)}
        return state

    @property
    def epoch_samples(self) -> int:
        return self.index.total if self.samples_per_epoch is None else self.samples_per_epoch

    def reader_batches(self, workers: int) -> int:
        """Batches every reader yields per epoch (a rank's loader yields ``workers`` times that)."""
        readers = self.world_size * max(workers, 1)
        return math.ceil(math.ceil(self.epoch_samples / readers) / self.batch_size)

    # Raw samples (or placeholders for samples lost to an unreadable shard) of one reader and epoch.
    def _read(self, url: str, start: int, stop: int) -> Iterator[dict]:
        read = 0
        try:
            for sample in iter_samples(url, start, stop, allow_pipe=self.allow_pipe):
                read += 1
                yield sample
        except ShardError as err:
            for i in range(start + read, stop):
                yield {"__fault__": err.reason, "__url__": url, "__index__": i}

    def _epoch_source(self, epoch: int, reader: int, readers: int) -> Iterator[dict]:
        order = list(range(len(self.index.urls)))
        if self.train:
            _rng(self.seed, "order", epoch).shuffle(order)
        lo, hi = _slice(self.index.total, readers, reader)
        position = 0
        for i in order:
            count = self.index.counts[i]
            start, stop = max(lo - position, 0), min(hi - position, count)
            position += count
            if start < stop:
                yield from self._read(self.index.urls[i], start, stop)
            if position >= hi:
                return

    def _resampled_source(self, epoch: int, reader: int, readers: int) -> Iterator[dict]:
        lo, hi = _slice(self.epoch_samples, readers, reader)
        rng, need = _rng(self.seed, "resample", epoch, reader), hi - lo
        while need > 0:
            i = rng.randrange(len(self.index.urls))
            take = min(need, self.index.counts[i])
            yield from self._read(self.index.urls[i], 0, take)
            need -= take

    def _prepare(self, raw: list[dict], epoch: int) -> tuple[list[dict], dict]:
        """The examples of a batch's raw samples, and the report of what was read and skipped."""
        examples, faults, keys = [], [], []
        for sample in raw:
            if "__fault__" in sample:
                faults.append({"url": sample["__url__"], "index": sample["__index__"], "error": sample["__fault__"]})
                continue
            keys.append(sample["__key__"])
            try:
                examples.extend(list(self.task.prepare(decode_sample(sample), self.tokenizer)))
            except UnsafeSampleError:
                raise  # a shard that tries to run code stops the run
            except SampleError as err:
                faults.append({"url": sample["__url__"], "key": sample["__key__"], "error": str(err)})
            except Exception as err:
                raise SampleError(f"{sample_location(sample)}: task '{self.task.name}' failed to prepare it: "
                                  f"{err!r}") from err
        return examples, {"samples": len(raw), "faults": faults, "keys": keys, "padded": 0, "epoch": epoch}

    def _reader_epoch(self, epoch: int, reader: int, readers: int, batches: int, skip: int) -> Iterator[tuple]:
        if self.samples_per_epoch is None:
            source, total = self._epoch_source(epoch, reader, readers), self.index.total
        else:
            source, total = self._resampled_source(epoch, reader, readers), self.samples_per_epoch
        lo, hi = _slice(total, readers, reader)
        if self.shuffle_buffer > 1:
            source = wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=_rng(self.seed, "shuffle", epoch, reader))(source)
        chunks = (list(itertools.islice(source, size)) for size in _batch_sizes(hi - lo, batches, self.batch_size))
        ahead: collections.deque = collections.deque()  # chunks read ahead to find a stand-in batch
        last = None  # the last usable batch of this epoch: the stand-in for a batch with no usable sample
        for i in range(batches):
            raw = ahead.popleft() if ahead else next(chunks)
            if i < skip:  # delivered before a resume: read, not decoded (but the last one sets the stand-in)
                if i == skip - 1 and (examples := self._prepare(raw, epoch)[0]):
                    last = self.task.collate(examples)
                continue
            examples, report = self._prepare(raw, epoch)
            if examples:
                last = self.task.collate(examples)
            elif last is None:  # no usable batch yet in this epoch: the next usable one stands in
                for chunk in chunks:
                    ahead.append(chunk)
                    if later := self._prepare(chunk, epoch)[0]:
                        last = self.task.collate(later)
                        break
                if last is None:
                    raise SampleError(f"task '{self.task.name}': no sample of reader {reader}'s share of epoch {epoch} "
                                      f"could be used: {report['faults'][:3]}")
            # Every rank must take a batch of this task in every step: a batch with no usable sample repeats one.
            report["padded"] = int(not examples)
            yield self.task.name, last, report

    def _evaluation(self, reader: int, readers: int) -> Iterator[tuple]:
        source = self._epoch_source(0, reader, readers)
        while raw := list(itertools.islice(source, self.batch_size)):
            examples, report = self._prepare(raw, 0)
            # A batch with no usable sample is None: evaluation skips it, the report still counts what was lost.
            yield self.task.name, self.task.collate(examples) if examples else None, report

    def __iter__(self) -> Iterator[tuple]:
        worker, workers = _slot()
        if not self.train:
            yield from self._evaluation(self.rank * workers + worker, self.world_size * workers)
            return
        # The loader asks its workers for batches in turn, starting with worker 0 on every new iterator;
        # after `start_batch` batches the next one is due from worker `start_batch % workers`.
        logical = (worker + self.start_batch) % workers
        delivered = max(self.start_batch - logical + workers - 1, 0) // workers
        batches = self.reader_batches(workers)
        epoch, skip = divmod(delivered, batches)
        for epoch in itertools.count(epoch):
            yield from self._reader_epoch(epoch, self.rank * workers + logical, self.world_size * workers, batches, skip)
            skip = 0


class Mixture:
    """Training steps: in each, the sampler's tasks each give one batch (``{task_name: batch}``).

    An epoch is ``steps_per_epoch`` steps; the task streams run on across epochs. ``step`` is the
    index of the next step and ``start`` the batch each task's stream starts at (both non-zero
    after a resume).
    """

    def __init__(self, loaders: dict, sampler: TaskSampler, steps_per_epoch: int, faults: FaultLog, *,
                 step: int = 0, start: dict[str, int] | None = None):
        self.loaders, self.sampler, self.steps_per_epoch, self.faults = loaders, sampler, steps_per_epoch, faults
        self.step, self.first_step = step, step
        self.start = {name: (start or {}).get(name, 0) for name in loaders}
        self.pulled = dict.fromkeys(loaders, 0)
        self.recent: dict[int, dict[str, list[str]]] = {}  # step -> sample keys per task, for the last steps
        self._iterators: dict | None = None

    def __len__(self) -> int:
        return self.steps_per_epoch

    def position(self, step: int) -> dict[str, int]:
        """The batch each task's stream is at after ``step`` steps (from the schedule, not from what was pulled)."""
        drawn = self.sampler.counts(step, begin=self.first_step)
        return {name: self.start[name] + drawn[name] for name in self.loaders}

    def __iter__(self) -> Iterator[dict]:
        if self._iterators is None:
            for name, loader in self.loaders.items():
                loader.dataset.start_batch = self.start[name]  # read by the workers when they start
            self._iterators = {name: iter(loader) for name, loader in self.loaders.items()}
        end = (self.step // self.steps_per_epoch + 1) * self.steps_per_epoch
        while self.step < end:
            step, keys = {}, {}
            for name in self.sampler.tasks(self.step):
                _, batch, report = next(self._iterators[name])
                self.faults.add(name, "train", report)
                self.pulled[name] += 1
                step[name], keys[name] = batch, report["keys"]
            self.recent[self.step] = keys
            self.recent.pop(self.step - 16, None)
            self.step += 1
            yield step


class Sequential:
    """Evaluation: every task's loader in turn, as one iterable, so Lightning sees one dataloader
    (and reports each metric once) while each batch still says which task it belongs to."""

    def __init__(self, loaders: list, faults: FaultLog, split: str):
        self.loaders, self.faults, self.split = loaders, faults, split

    def __iter__(self) -> Iterator[dict]:
        for name, batch, report in itertools.chain.from_iterable(self.loaders):
            self.faults.add(name, self.split, report)
            if batch is not None:
                yield {name: batch}
