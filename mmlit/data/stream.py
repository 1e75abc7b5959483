"""Per-task streams over WebDataset shards, and the mixture that zips them into training steps.

A ``TaskStream`` reads tar shards with ``webdataset``'s tar iterator, splits them over DDP ranks
and DataLoader workers explicitly (rank and world size are passed in, never guessed inside a
worker), shuffles with seeds derived from ``(seed, rank, worker, pass)``, decodes with the safe
allow-list, lets the task turn samples into examples, and batches with the task's collate.

Training streams repeat over their shards (reshuffled every pass), so every rank can draw as
many batches as the epoch asks for; evaluation streams read every sample exactly once across
all ranks and workers.
"""

from __future__ import annotations

import glob
import os
import itertools
import random
from typing import TYPE_CHECKING, Iterator
from urllib.parse import urlparse

import braceexpand
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from mmlit.data.decode import SampleError, decode_sample, sample_location

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from mmlit.tasks.base import Task

__all__ = ["resolve_shards", "TaskStream", "Mixture", "Sequential"]


def resolve_shards(spec: str, key: str, *, allow_pipe: bool = False) -> list[str]:
    """Expand ``{000..009}`` braces and, for local paths, globs; fail naming ``key`` if nothing matches."""
    urls: list[str] = []
    for part in braceexpand.braceexpand(spec):
        scheme = urlparse(part).scheme
        if part.startswith("pipe:") and not allow_pipe:
            raise ValueError(f"{key}: '{part}' runs a shell command; set data.allow_pipe: true to allow it")
        if scheme and len(scheme) > 1:  # http://, s3://, pipe: ...; a one-letter scheme is a Windows drive
            urls.append(part)
            continue
        matches = sorted(glob.glob(part)) if glob.has_magic(part) else ([part] if os.path.isfile(part) else [])
        if not matches:
            raise FileNotFoundError(f"{key}: no shard matches '{part}' (from '{spec}')")
        urls.extend(matches)
    return urls


def _slot() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class TaskStream(IterableDataset):
    """Batches of one task, as ``{task_name: batch}``."""

    def __init__(self, task: Task, urls: list[str], tokenizer: Tokenizer, *, batch_size: int, train: bool,
                 seed: int = 0, shuffle_buffer: int = 1000, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.task, self.urls, self.tokenizer = task, urls, tokenizer
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.shuffle_buffer, self.rank, self.world_size = shuffle_buffer, rank, world_size

    def _shards(self, slot: int, slots: int, split_samples: bool) -> Iterator[dict]:
        """Each training pass reshuffles the shard list (same order on every rank) and deals it out,
        or gives every shard to every reader when samples are split instead."""
        for epoch in itertools.count() if self.train else [0]:
            urls = list(self.urls)
            if self.train:
                random.Random(self.seed * 100_003 + epoch).shuffle(urls)
            share = urls if split_samples else urls[slot::slots]
            yield from ({"url": url} for url in share)

    def _examples(self, samples: Iterator[dict], slot: int, slots: int, split_samples: bool) -> Iterator[dict]:
        for index, sample in enumerate(samples):
            if split_samples and index % slots != slot:
                continue
            try:
                yield from self.task.prepare(decode_sample(sample), self.tokenizer)
            except SampleError:
                raise
            except Exception as err:
                raise SampleError(f"{sample_location(sample)}: task '{self.task.name}' failed to prepare it: "
                                  f"{err!r}") from err

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _slot()
        slot, slots = self.rank * workers + worker, self.world_size * workers
        # Fewer shards than readers: every reader opens every shard and keeps its share of samples.
        split_samples = len(self.urls) < slots
        samples = wds.tarfile_samples(self._shards(slot, slots, split_samples))
        stream = self._examples(samples, slot, slots, split_samples)
        if self.train:
            stream = wds.shuffle(self.shuffle_buffer, rng=random.Random(self.seed * 1_000_003 + slot))(stream)
        stream = wds.batched(self.batch_size, collation_fn=self.task.collate, partial=not self.train)(stream)
        name = self.task.name
        yield from ({name: batch} for batch in stream)


class Mixture:
    """A training epoch of ``steps`` steps, each taking one batch from every task's loader.

    The loaders' iterators live across epochs (the streams repeat), so an epoch has the same
    number of steps on every rank whatever the shard sizes.
    """

    def __init__(self, loaders: dict, steps: int):
        self.loaders, self.steps = loaders, steps
        self._iterators: dict | None = None

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[dict]:
        if self._iterators is None:
            self._iterators = {name: iter(loader) for name, loader in self.loaders.items()}
        for _ in range(self.steps):
            step = {}
            for it in self._iterators.values():
                step.update(next(it))
            yield step


class Sequential:
    """Evaluation: every task's loader in turn, as one iterable, so Lightning sees one dataloader
    (and reports each metric once) while each batch still says which task it belongs to."""

    def __init__(self, loaders: list):
        self.loaders = loaders

    def __iter__(self) -> Iterator[dict]:
        return itertools.chain.from_iterable(self.loaders)
