"""Streams over a source's shards, and the mixture that turns them into training steps.

A ``SourceStream`` is the ``IterableDataset`` of one source (shards with known sample counts) and the tasks that
read it (their data sides, ``TaskData``, which pickle to the workers as they are): each sample is read and decoded
once (only the entries the tasks declare in ``fields``), and every task prepares its own examples from it. A
``TaskStream`` is the stream of one task. What a rank reads is planned from the index alone (``mmlit/data/reading.py``):

* **training**: batch ``k`` of a rank is its share of global batch ``k`` of the epoch order (``Plan``), read by
  sample. The order depends on the seed and the epoch only, so every rank yields the same number of batches, every
  sample of an epoch is read once, and a stream resumes at any position (``start``: epoch and samples consumed)
  reading nothing before it, on any number of ranks and workers. A loader's workers take the rank's batches in
  turn (worker ``w`` of ``W`` makes batches ``w, w + W, ...``), so the loader yields them in order whatever ``W``.
* **evaluation**: every sample once, each reader (rank x worker) a contiguous slice in shard order.

A sample that cannot be used is skipped and reported with its batch; a training batch with no usable sample for a
task repeats the nearest usable batch of the epoch (every rank must take one). ``StepStream`` serves a rank's whole
task mixture from one pool of workers: worker ``w`` makes the steps ``w, w + W, ...``, each with the batch of every
source the step's tasks read; ``EvalStream`` serves every source of an evaluation from one pool.
"""

from __future__ import annotations

import functools
import itertools
from typing import TYPE_CHECKING, Any, Iterator, Literal, Mapping, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from mmlit.data.collate import Padded
from mmlit.data.decode import SampleError, UnsafeSampleError, decode_sample, sample_location
from mmlit.data.device_images import EncodedImages
from mmlit.data.index import ShardIndex
from mmlit.data.reading import Plan, Position, Reading
from mmlit.data.sources import Source, TarSource
from mmlit.data.task_data import TaskData, data_side
from mmlit.data.transforms import random_state_kept, sample_context

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from mmlit.data.faults import FaultLog
    from mmlit.data.mixing import TaskSampler

__all__ = ["EvalStream", "Mixture", "Sequential", "SourceStream", "StepStream", "TaskStream"]

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
        start: where training starts: (epoch, samples of that epoch every rank together consumed before), what
            ``plan.advance`` gives (a resumed run).
        start_batch: batches of this rank's plan to skip after ``start``.
        predict: the stream feeds ``mmlit predict``: tasks take samples without labels (``predicting()``).
    """

    def __init__(self, tasks: Mapping[str, TaskData] | Sequence[TaskData], index: ShardIndex, tokenizer: Tokenizer, *,
                 batch_size: int, train: bool, samples_per_epoch: int | None = None, seed: int = 0,
                 shuffle_buffer: int = 1000, rank: int = 0, world_size: int = 1, source: Source | None = None,
                 max_image_pixels: int | None = None, decode_images: Literal["worker", "device"] = "worker",
                 start: Position = (0, 0), start_batch: int = 0, predict: bool = False,
                 modalities: Mapping[str, Any] | None = None):
        super().__init__()
        named = {name: data_side(t) for name, t in tasks.items()} if isinstance(tasks, Mapping) else \
            {data_side(t).name: data_side(t) for t in tasks}
        self.names, self.tasks, self.index, self.tokenizer = list(named), list(named.values()), index, tokenizer
        self.batch_size, self.train, self.samples_per_epoch = batch_size, train, samples_per_epoch
        self.seed, self.shuffle_buffer, self.source = seed, shuffle_buffer, source or TarSource()
        self.rank, self.world_size, self.start, self.start_batch = rank, world_size, tuple(start), start_batch
        self.predict = predict
        self.max_image_pixels, self.decode_images, self.modalities = max_image_pixels, decode_images, modalities
        fields = [task.fields for task in self.tasks]
        self.fields = None if not all(fields) else tuple(dict.fromkeys(f for fs in fields for f in fs))

    @functools.cached_property
    def reading(self) -> Reading:
        return Reading(self.index, self.source, self.seed, self.train, self.shuffle_buffer, self.samples_per_epoch)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("reading", None)  # (its caches stay in the process that made them)
        return state

    @property
    def epoch_samples(self) -> int:
        return self.index.total if self.samples_per_epoch is None else self.samples_per_epoch

    @property
    def plan(self) -> Plan:
        """This rank's training batches after ``start``."""
        return Plan(self.epoch_samples, self.rank, self.world_size, self.batch_size, self.start)

    @property
    def batches_per_epoch(self) -> int:
        """Training batches of this rank in one whole epoch (whatever the number of workers)."""
        return self.plan.batches_per_epoch

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

    def _read(self, epoch: int, span: tuple[int, int]) -> tuple[dict[str, list], dict[str, dict]]:
        return self._prepare(self.reading.samples(epoch, range(*span)), epoch)

    def batch(self, k: int) -> tuple[dict, dict]:
        """Training batch ``k`` of this rank after ``start_batch`` batches from ``start``: ``({task: batch},
        {task: report})``."""
        plan, k = self.plan, self.start_batch + k
        epoch, lo, hi = plan.locate(k)
        examples, reports = self._read(epoch, (lo, hi))
        batches = self._collated(examples)
        missing = [name for name in self.names if name not in batches]
        for span in plan.neighbours(k) if missing else ():  # every rank must take a batch of each task in each step
            later = self._collated(self._read(epoch, span)[0])
            batches.update({name: later[name] for name in missing if name in later})
            if not (missing := [name for name in missing if name not in batches]):
                break
        if missing:
            raise SampleError(f"task '{missing[0]}': no sample of rank {self.rank}'s share of epoch {epoch} could be "
                              f"used: {reports[missing[0]]['faults'][:3]}")
        for name in reports:
            reports[name]["padded"] = int(not examples[name])
        return {name: batches[name] for name in self.names}, reports

    def _evaluation(self, reader: int, readers: int) -> Iterator[tuple]:
        source = itertools.chain.from_iterable(map(self.reading.read, self.reading.pieces(reader, readers)))
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
        for k in itertools.count(worker, workers):  # the loader asks its workers in turn, from worker 0
            yield self.batch(k)


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


class StepStream(IterableDataset):
    """A rank's training steps from one pool of workers, for every source: ``(step, {source: (batches, reports)})``
    with the batch of each source that the step's tasks (``sampler.tasks(step)``) read.

    Worker ``w`` of ``W`` makes steps ``step + w, step + w + W, ...``; each source's batch in a step is the next one
    of its tasks' streams, counted from the schedule (a pure function of the step), so it does not matter which
    worker makes it. ``streams`` and ``groups`` are keyed by source; ``groups`` names the tasks that read each.
    """

    def __init__(self, streams: dict[str, SourceStream], groups: dict[str, list[str]], sampler: TaskSampler,
                 step: int = 0):
        super().__init__()
        self.streams, self.groups, self.sampler, self.step = streams, groups, sampler, step
        self.names = [name for names in groups.values() for name in names]

    def __iter__(self) -> Iterator[tuple[int, dict]]:
        worker, workers = _slot()
        taken = self.sampler.counts(self.step + worker, begin=self.step)  # batches of each task before this step
        for step in itertools.count(self.step + worker, workers):
            wanted = set(self.sampler.tasks(step))
            yield step, {group: self.streams[group].batch(taken[names[0]])
                         for group, names in self.groups.items() if wanted.intersection(names)}
            for name, n in self.sampler.counts(step + workers, begin=step).items():
                taken[name] += n


class EvalStream(IterableDataset):
    """Every source of an evaluation from one pool of workers: each worker reads its slice of each source in turn
    (``SourceStream`` items)."""

    def __init__(self, streams: list[SourceStream]):
        super().__init__()
        self.streams = streams
        self.names = [name for stream in streams for name in stream.names]

    def __iter__(self) -> Iterator[tuple]:
        worker, workers = _slot()
        for stream in self.streams:
            yield from stream._evaluation(stream.rank * workers + worker, stream.world_size * workers)


class Mixture:
    """Training steps: in each, the sampler's tasks each give one batch (``{task_name: batch}``), from one loader
    of a ``StepStream``.

    ``groups`` names the tasks of each source. An epoch is ``steps_per_epoch`` steps; the streams run on across
    epochs. ``step`` is the index of the next step (non-zero after a resume), where the loader's stream starts.
    """

    def __init__(self, loader, sampler: TaskSampler, steps_per_epoch: int, faults: FaultLog, *,
                 groups: dict[str, list[str]], step: int = 0):
        self.loader, self.sampler, self.steps_per_epoch, self.faults = loader, sampler, steps_per_epoch, faults
        self.groups = groups
        self.tasks = [name for names in self.groups.values() for name in names]
        self.step, self.first_step = step, step
        self.pulled = dict.fromkeys(self.tasks, 0)
        self.recent: dict[int, dict[str, list[str]]] = {}  # step -> sample keys per task, for the last steps
        self._iterator: Iterator | None = None

    def __len__(self) -> int:
        return self.steps_per_epoch

    def taken(self, step: int) -> dict[str, int]:
        """The batches each task's stream gave since the start of this run, after ``step`` steps (from the
        schedule, not from what was prefetched)."""
        return self.sampler.counts(step, begin=self.first_step)

    def __iter__(self) -> Iterator[dict]:
        if self._iterator is None:
            self._iterator = iter(self.loader)
        end = (self.step // self.steps_per_epoch + 1) * self.steps_per_epoch
        while self.step < end:
            made, sources = next(self._iterator)
            if made != self.step:
                raise RuntimeError(f"data: the loader gave step {made} where step {self.step} was due")
            pulled = {name: (batches[name], reports[name]) for group, (batches, reports) in sources.items()
                      for name in self.groups[group]}
            step, keys = {}, {}
            for name in self.sampler.tasks(self.step):  # in the sampler's order (the objective sees the tasks in it)
                batch, report = pulled[name]
                self.faults.add(name, "train", report)
                self.pulled[name] += 1
                step[name], keys[name] = batch, report["keys"]
            self.recent[self.step] = keys
            self.recent.pop(self.step - 16, None)
            self.step += 1
            yield step


class Sequential:
    """Evaluation: one loader of an ``EvalStream`` (every source in turn), so Lightning sees one dataloader (and
    reports each metric once) while each batch still says which tasks it belongs to."""

    def __init__(self, loader, faults: FaultLog, split: str):
        self.loader, self.faults, self.split = loader, faults, split

    def __iter__(self) -> Iterator[dict]:
        for batches, reports in self.loader:  # SourceStream items
            for name, report in reports.items():
                self.faults.add(name, self.split, report)
            if batch := {name: b for name, b in batches.items() if b is not None}:
                yield batch
