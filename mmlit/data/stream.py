"""Streams over a source's shards, and the mixture that turns them into training steps.

A ``SourceStream`` is the ``IterableDataset`` of one source (shards with known sample counts) and the tasks that
read it (their data sides, ``TaskData``, which pickle to the workers as they are): each sample is read and decoded
once (only the entries the tasks declare in ``fields``), and every task prepares its own examples from it. A ``TaskStream`` is the stream of one task. Its readers are the
``ranks x workers`` slots, and what each reads is planned from the index's sample counts alone:

* **epoch mode**: an epoch is one pass over every sample. The shard order is shuffled per epoch
  (the same on every rank), the samples in that order are cut into one contiguous slice per
  reader (sizes differ by at most one, whatever the shard sizes), and every reader cuts its
  slice into the same number of batches, ``ceil(ceil(N / readers) / batch_size)``: full batches
  and then smaller ones. Every sample is read exactly once and every rank yields the same
  number of batches, so no rank waits for another.
* **resampled mode**: each reader draws shards with replacement (seeded by epoch and reader)
  until it has its slice of ``samples_per_epoch``, which is a global number whatever the
  number of ranks and workers.

Training samples are shuffled inside **windows**: a reader's slice, in shard order, is cut at shard boundaries
into windows of at least ``shuffle_buffer`` samples, and each window is permuted by a generator seeded with
(seed, epoch, reader, window). The order of an epoch is thus a pure function of those numbers, and a stream that
resumes at any batch reads only the window that batch starts in (and the batch before it again, only if a stand-in
batch is needed): a bounded amount, never the part of the epoch already trained on. Windows end at shard boundaries so that a resumed
reader starts reading at the start of a shard (a remote shard cannot seek to a sample); a window holds
``max(shuffle_buffer, one shard)`` raw samples in memory. The position is one number per source: the batches the
rank's loader has delivered, which is the same on every rank. A sample that cannot be used is skipped and reported
with its batch.
"""

from __future__ import annotations

import collections
import itertools
import math
from typing import TYPE_CHECKING, Any, Iterator, Literal, Mapping, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from mmlit.data.collate import Padded
from mmlit.data.decode import SampleError, UnsafeSampleError, decode_sample, sample_location
from mmlit.data.device_images import EncodedImages
from mmlit.data.index import ShardIndex
from mmlit.data.reading import Reading
from mmlit.data.sources import Source, TarSource
from mmlit.data.task_data import TaskData, data_side
from mmlit.data.transforms import random_state_kept, sample_context

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from mmlit.data.faults import FaultLog
    from mmlit.data.mixing import TaskSampler

__all__ = ["Mixture", "Sequential", "SourceStream", "TaskStream"]

def _batch_sizes(n: int, batches: int, batch_size: int) -> list[int]:
    """``n`` samples in exactly ``batches`` batches: full ones first, then at least one sample in each
    while samples last (empty batches, only when ``n < batches``, come last)."""
    sizes, left = [], n
    for i in range(batches):
        size = min(batch_size, max(left - (batches - i - 1), min(left, 1)))
        sizes.append(size)
        left -= size
    return sizes


def _share_equal(batches: dict[str, dict]) -> dict[str, dict]:
    """Tasks' batches with every tensor that equals one of an earlier task (under any key: the images of tasks that
    prepared them from the same samples alike, a clip that one task reads as ``audio`` and another as its ``caption``)
    replaced by that one: the same tensor reaches the training process once and the backbone encodes it once
    (``Backbone.shared_pass``)."""
    seen: list = []
    for batch in batches.values():
        for key, value in batch.items():
            if isinstance(value, EncodedImages):
                same = next((t for t in seen if isinstance(t, EncodedImages) and t == value), None)
            elif isinstance(value, (torch.Tensor, Padded)):
                same = next((t for t in seen if _equal(t, value)), None)
            else:
                continue
            if same is None:
                seen.append(value)
            else:
                batch[key] = same
    return batches


def _equal(a: Any, b: Any) -> bool:
    """Whether two batch values are the same tensors (or padded sequences: values and lengths)."""
    if isinstance(a, Padded) and isinstance(b, Padded):
        return all(map(_equal, a, b))
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype \
        and torch.equal(a, b)


def _slot() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class SourceStream(IterableDataset):
    """Batches of the tasks that read one source, as ``({task_name: batch}, {task_name: report})``; a report says
    what was read and skipped.

    Args:
        tasks: the tasks' data sides that prepare and collate examples from each sample (one read and decode for
            all), by name (a sequence: by their ``name``).
        index: the shards and their sample counts.
        batch_size: samples per batch (per rank), the same for every task of the source.
        train: training streams shuffle and never end; evaluation streams read every sample once.
        samples_per_epoch: resampled mode with this many samples per epoch (all ranks together);
            ``None`` is epoch mode.
        source: how the shards are read (their format and store); default tar shards.
        max_image_pixels: images with more pixels are skipped (see ``decode_sample``).
        decode_images: ``worker``: images are decoded here; ``device``: JPEGs are checked here and decoded on the
            training device (``mmlit/data/device_images.py``).
        modalities: the modality objects that decode the entries a task's field names by modality (with the
            recipe's limits); default: each modality's own defaults.
        start_batch: the number of batches the rank's loader delivered before (a resumed run).
        predict: the stream feeds ``mmlit predict``: tasks take samples without labels (``predicting()``).
    """

    def __init__(self, tasks: Mapping[str, TaskData] | Sequence[TaskData], index: ShardIndex, tokenizer: Tokenizer, *,
                 batch_size: int, train: bool, samples_per_epoch: int | None = None, seed: int = 0,
                 shuffle_buffer: int = 1000, rank: int = 0, world_size: int = 1, source: Source | None = None,
                 max_image_pixels: int | None = None, decode_images: Literal["worker", "device"] = "worker",
                 start_batch: int = 0, predict: bool = False, modalities: Mapping[str, Any] | None = None):
        super().__init__()
        named = {name: data_side(t) for name, t in tasks.items()} if isinstance(tasks, Mapping) else \
            {data_side(t).name: data_side(t) for t in tasks}
        self.names, self.tasks, self.index, self.tokenizer = list(named), list(named.values()), index, tokenizer
        self.batch_size, self.train, self.samples_per_epoch = batch_size, train, samples_per_epoch
        self.seed, self.shuffle_buffer, self.source = seed, shuffle_buffer, source or TarSource()
        self.rank, self.world_size, self.start_batch, self.predict = rank, world_size, start_batch, predict
        self.max_image_pixels, self.decode_images, self.modalities = max_image_pixels, decode_images, modalities
        fields = [task.fields for task in self.tasks]
        self.fields = None if not all(fields) else tuple(dict.fromkeys(f for fs in fields for f in fs))

    @property
    def reading(self) -> Reading:
        return Reading(self.index, self.source, self.seed, self.train, self.shuffle_buffer, self.samples_per_epoch)

    @property
    def epoch_samples(self) -> int:
        return self.index.total if self.samples_per_epoch is None else self.samples_per_epoch

    def reader_batches(self, workers: int) -> int:
        """Batches every reader yields per epoch (a rank's loader yields ``workers`` times that)."""
        readers = self.world_size * max(workers, 1)
        return math.ceil(math.ceil(self.epoch_samples / readers) / self.batch_size)

    def _decode(self, sample: dict, fields: tuple[str, ...] | None) -> dict:
        return decode_sample(sample, fields, modalities=self.modalities, max_image_pixels=self.max_image_pixels,
                             jpeg_on_device=self.decode_images == "device")

    def _prepare(self, raw: list[dict], epoch: int) -> tuple[dict[str, list], dict[str, dict]]:
        """Each task's examples of a batch's raw samples, and its report of what was read and skipped."""
        with random_state_kept():
            return self._prepare_samples(raw, epoch)

    def _prepare_samples(self, raw: list[dict], epoch: int) -> tuple[dict[str, list], dict[str, dict]]:
        examples: dict[str, list] = {name: [] for name in self.names}
        faults: dict[str, list] = {name: [] for name in self.names}
        keys = []
        for sample in raw:
            if "__fault__" in sample:
                for name in faults:
                    faults[name].append({"url": sample["__url__"], "index": sample["__index__"], "error": sample["__fault__"]})
                continue
            keys.append(sample["__key__"])
            try:
                decoded = self._decode(sample, self.fields)
            except UnsafeSampleError:
                raise  # a shard that tries to run code stops the run
            except SampleError:
                decoded = None  # an entry failed: decode again per task, to skip it only for the tasks that read it
            for name, task in zip(self.names, self.tasks):
                try:
                    own = decoded if decoded is not None else self._decode(sample, task.fields or None)
                    # Each task draws from the same seeded state: tasks with one pipeline get the same crop of the image.
                    with sample_context((self.seed, epoch, sample["__shard__"], sample["__key__"]), train=self.train,
                                        predict=self.predict):
                        produced = list(task.prepare(own, self.tokenizer))
                    for example in produced:
                        example["key"] = sample["__key__"]  # (what mmlit predict names each prediction by)
                    examples[name].extend(produced)
                except UnsafeSampleError:
                    raise
                except SampleError as err:
                    faults[name].append({"url": sample["__url__"], "key": sample["__key__"], "error": str(err)})
                except Exception as err:
                    raise SampleError(f"{sample_location(sample)}: task '{name}' failed to prepare it: "
                                      f"{err!r}") from err
        reports = {name: {"samples": len(raw), "faults": faults[name], "keys": keys, "padded": 0, "epoch": epoch}
                   for name in examples}
        return examples, reports

    def _collated(self, examples: dict[str, list]) -> dict:
        return _share_equal({name: task.collate(examples[name]) for name, task in zip(self.names, self.tasks)
                             if examples[name]})

    def _reader_epoch(self, epoch: int, reader: int, readers: int, batches: int, skip: int) -> Iterator[tuple]:
        pieces = self.reading.pieces(epoch, reader, readers)
        sizes = _batch_sizes(sum(stop - start for _, start, stop in pieces), batches, self.batch_size)
        source = self.reading.ordered(pieces, epoch, reader, sum(sizes[:skip]))
        chunks = (list(itertools.islice(source, size)) for size in sizes[skip:])
        ahead: collections.deque = collections.deque()  # chunks read ahead to find a stand-in batch
        last: dict = {}  # each task's last usable batch of this epoch: the stand-in for a batch with no usable sample
        before = skip - 1  # a resumed stream's batch before its first, read again only if a stand-in is needed
        for i in range(skip, batches):
            raw = ahead.popleft() if ahead else next(chunks)
            examples, reports = self._prepare(raw, epoch)
            last.update(self._collated(examples))
            missing = [name for name in examples if name not in last]
            if missing and before >= 0:  # what the uninterrupted stream had as its stand-in (so it is bit-identical)
                again = itertools.islice(self.reading.ordered(pieces, epoch, reader, sum(sizes[:before])), sizes[before])
                last = {**self._collated(self._prepare(list(again), epoch)[0]), **last}
                missing, before = [name for name in missing if name not in last], -1
            for chunk in chunks if missing else ():  # no usable batch yet in this epoch: the next usable one stands in
                ahead.append(chunk)
                later = self._collated(self._prepare(chunk, epoch)[0])
                last.update({name: later[name] for name in missing if name in later})
                if not (missing := [name for name in missing if name not in last]):
                    break
            if missing:
                raise SampleError(f"task '{missing[0]}': no sample of reader {reader}'s share of epoch {epoch} could be "
                                  f"used: {reports[missing[0]]['faults'][:3]}")
            # Every rank must take a batch of each task in every step: a batch with no usable sample repeats one.
            for name in reports:
                reports[name]["padded"] = int(not examples[name])
            yield {name: last[name] for name in reports}, reports

    def _evaluation(self, reader: int, readers: int) -> Iterator[tuple]:
        source = self.reading.ordered(self.reading.pieces(0, reader, readers), 0, reader, 0)
        while raw := list(itertools.islice(source, self.batch_size)):
            examples, reports = self._prepare(raw, 0)
            # A batch with no usable sample is None: evaluation skips it, the report still counts what was lost.
            batches = self._collated(examples)
            yield {name: batches.get(name) for name in self.names}, reports

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


class TaskStream(SourceStream):
    """The stream of one task, as ``(task_name, batch, report)``."""

    def __init__(self, task: TaskData, index: ShardIndex, tokenizer: Tokenizer, **kwargs):
        super().__init__([task], index, tokenizer, **kwargs)

    @property
    def task(self) -> TaskData:
        return self.tasks[0]

    def __iter__(self) -> Iterator[tuple]:
        name = self.names[0]
        for batches, reports in super().__iter__():
            yield name, batches[name], reports[name]


class Mixture:
    """Training steps: in each, the sampler's tasks each give one batch (``{task_name: batch}``).

    ``loaders`` are keyed by source; ``groups`` names the tasks of each (default: one task per loader, named as its
    key). An epoch is ``steps_per_epoch`` steps; the streams run on across epochs. ``step`` is the index of the next
    step and ``start`` the batch each task's stream starts at (both non-zero after a resume).
    """

    def __init__(self, loaders: dict, sampler: TaskSampler, steps_per_epoch: int, faults: FaultLog, *,
                 groups: dict[str, list[str]] | None = None, step: int = 0, start: dict[str, int] | None = None):
        self.loaders, self.sampler, self.steps_per_epoch, self.faults = loaders, sampler, steps_per_epoch, faults
        self.groups = groups or {name: [name] for name in loaders}
        self.tasks = [name for names in self.groups.values() for name in names]
        self.step, self.first_step = step, step
        self.start = {name: (start or {}).get(name, 0) for name in self.tasks}
        self.pulled = dict.fromkeys(self.tasks, 0)
        self.recent: dict[int, dict[str, list[str]]] = {}  # step -> sample keys per task, for the last steps
        self._iterators: dict | None = None

    def __len__(self) -> int:
        return self.steps_per_epoch

    def position(self, step: int) -> dict[str, int]:
        """The batch each task's stream is at after ``step`` steps (from the schedule, not from what was pulled)."""
        drawn = self.sampler.counts(step, begin=self.first_step)
        return {name: self.start[name] + drawn[name] for name in self.tasks}

    def __iter__(self) -> Iterator[dict]:
        if self._iterators is None:
            for group, loader in self.loaders.items():
                # read by the workers when they start; the tasks of a source are at the same batch
                loader.dataset.start_batch = self.start[self.groups[group][0]]
            self._iterators = {group: iter(loader) for group, loader in self.loaders.items()}
        end = (self.step // self.steps_per_epoch + 1) * self.steps_per_epoch
        while self.step < end:
            pulled, wanted = {}, self.sampler.tasks(self.step)
            for group, names in self.groups.items():
                if set(wanted).intersection(names):
                    batches, reports = next(self._iterators[group])  # a SourceStream's item
                    pulled.update({name: (batches[name], reports[name]) for name in names})
            step, keys = {}, {}
            for name in wanted:  # in the sampler's order (the objective sees the tasks in it)
                batch, report = pulled[name]
                self.faults.add(name, "train", report)
                self.pulled[name] += 1
                step[name], keys[name] = batch, report["keys"]
            self.recent[self.step] = keys
            self.recent.pop(self.step - 16, None)
            self.step += 1
            yield step


class Sequential:
    """Evaluation: every source's loader in turn, as one iterable, so Lightning sees one dataloader
    (and reports each metric once) while each batch still says which tasks it belongs to."""

    def __init__(self, loaders: list, faults: FaultLog, split: str):
        self.loaders, self.faults, self.split = loaders, faults, split

    def __iter__(self) -> Iterator[dict]:
        for batches, reports in itertools.chain.from_iterable(self.loaders):  # SourceStream items
            for name, report in reports.items():
                self.faults.add(name, self.split, report)
            if batch := {name: b for name, b in batches.items() if b is not None}:
                yield batch
