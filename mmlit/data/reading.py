"""What a source's readers read: one rank's training batches, planned from the index's sample counts alone, read
by sample; and the contiguous slices of an evaluation.

**Training.** An epoch of a source is one sequence of samples, the same on every rank and worker, a pure function of
(seed, epoch): in **epoch mode** every shard once, in an order shuffled per epoch; in **resampled mode** shards drawn
with replacement until the sequence holds ``samples_per_epoch`` samples. The sequence is cut into **windows** of
``shuffle_buffer`` samples, and each window is permuted by a generator seeded with (seed, epoch, window): the
**epoch order**. Global batch ``j`` of an epoch is the next ``ranks x batch_size`` positions of that order, and each
rank takes its share of it (sizes differ by at most one). Nothing depends on the number of workers (the loader's
workers take a rank's batches in turn), and a run's position is (epoch, samples of the epoch consumed): a run resumed
on other ranks, workers or batch sizes continues the epoch from there, every sample once across the two parts.

A batch reads exactly its samples, by the byte offsets the index holds (``Source.read_spans``: a seek locally, range
requests remotely), so a reader holds one batch of raw samples whatever the shard and window sizes, and a resumed run
reads nothing before its position. A shard without offsets (a compressed tar) is read from its start for the samples
a batch wants of it (the samples it wants lie within one window, so the memory bound holds; the reads do not).

**Evaluation** reads every sample once, in shard order: the samples are cut into one contiguous slice per reader
(``ranks x workers``), read sequentially.
"""

from __future__ import annotations

import bisect
import copy
import math
import random
from collections import OrderedDict, defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator

import numpy as np

from mmlit.data.index import ShardIndex, StaleIndexError
from mmlit.data.shards import ShardError, _is_remote
from mmlit.data.sources import Source
from mmlit.seeds import random_generator, seed_of

__all__ = ["Piece", "Plan", "Reading", "rng"]

Piece = tuple[int, int, int]  # (shard, first sample, end sample) of the shard that a reader reads in one go
Position = tuple[int, int]  # (epoch, samples of the epoch consumed by every rank together)
_REMOTE_THREADS = 8  # concurrent range requests of one batch to a remote store (each is a round trip)


def rng(*parts) -> random.Random:
    """A generator seeded by ``parts`` (``mmlit.seeds``)."""
    return random_generator("reading", *parts)


def _slice(total: int, readers: int, reader: int) -> tuple[int, int]:
    return total * reader // readers, total * (reader + 1) // readers


def _spans(indices: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted sample indices as runs of consecutive ones, ``[(start, stop), ...]``."""
    spans: list[list[int]] = []
    for i in sorted(set(indices)):
        if spans and spans[-1][1] == i:
            spans[-1][1] += 1
        else:
            spans.append([i, i + 1])
    return [(a, b) for a, b in spans]


class Plan:
    """One rank's training batches of a source: batch ``k`` after the position ``start``.

    The epoch ``start`` is in continues from its ``start[1]``-th sample of the epoch order in global batches of
    ``ranks x batch_size`` samples; later epochs start at 0. ``locate(k)`` gives the epoch and positions of batch
    ``k``; ``advance(k)`` the position after ``k`` batches (what a checkpoint saves).
    """

    def __init__(self, epoch_samples: int, rank: int, world_size: int, batch_size: int, start: Position = (0, 0)):
        if not 0 <= start[1] <= epoch_samples:
            raise ValueError(f"the position {start} lies outside an epoch of {epoch_samples} samples")
        self.samples, self.rank, self.ranks, self.batch_size = epoch_samples, rank, world_size, batch_size
        self.start = (int(start[0]), int(start[1]))
        self.step = world_size * batch_size  # samples of one global batch

    @property
    def batches_per_epoch(self) -> int:
        """Batches per rank in a whole epoch."""
        return math.ceil(self.samples / self.step)

    @property
    def first_batches(self) -> int:
        """Batches per rank left in the epoch the plan starts in."""
        return math.ceil((self.samples - self.start[1]) / self.step)

    def _epoch(self, k: int) -> tuple[int, int, int]:
        """(epoch, global batch of the plan in that epoch, first position of that epoch's grid) of batch ``k``."""
        if k < self.first_batches:
            return self.start[0], k, self.start[1]
        later, j = divmod(k - self.first_batches, self.batches_per_epoch)
        return self.start[0] + 1 + later, j, 0

    def _share(self, base: int, j: int) -> tuple[int, int]:
        """This rank's positions of global batch ``j`` of a grid that starts at ``base`` (clipped to the epoch)."""
        lo, hi = max(base + j * self.step, 0), min(base + (j + 1) * self.step, self.samples)
        if hi <= lo:
            return lo, lo
        a, b = _slice(hi - lo, self.ranks, self.rank)
        return lo + a, lo + b

    def locate(self, k: int) -> tuple[int, int, int]:
        """(epoch, first position, end position) of batch ``k`` in its epoch's order."""
        epoch, j, base = self._epoch(k)
        return (epoch, *self._share(base, j))

    def neighbours(self, k: int) -> Iterator[tuple[int, int]]:
        """The positions of the batches around ``k`` in its epoch: the earlier ones, nearest first (also those
        before the plan's start), then the later ones: where a batch with no usable sample finds its stand-in."""
        epoch, j, base = self._epoch(k)
        for i in range(j - 1, -math.ceil(base / self.step) - 1, -1):
            yield self._share(base, i)
        for i in range(j + 1, math.ceil((self.samples - base) / self.step)):
            yield self._share(base, i)

    def advance(self, k: int) -> Position:
        """The position after ``k`` batches of every rank."""
        epoch, j, base = self._epoch(k)
        return epoch, base + j * self.step


class Reading:
    """The reading of one source's shards.

    Args:
        index: the shards, their sample counts and byte offsets.
        source: how the shards are read.
        seed: the seed of the shard order, resampling and windows.
        train: training reads shuffle (shard order, windows); evaluation reads every sample once, in shard order.
        shuffle_buffer: the samples of a window.
        samples_per_epoch: resampled mode with this many samples per epoch; None: epoch mode.
    """

    def __init__(self, index: ShardIndex, source: Source, seed: int, train: bool, shuffle_buffer: int,
                 samples_per_epoch: int | None):
        self.index, self.source, self.seed, self.train = index, source, seed, train
        self.shuffle_buffer, self.samples_per_epoch = shuffle_buffer, samples_per_epoch
        self._checked: set[int] = set()
        self._windows: OrderedDict = OrderedDict()
        self._sequences: OrderedDict = OrderedDict()

    @property
    def epoch_samples(self) -> int:
        return self.index.total if self.samples_per_epoch is None or not self.train else self.samples_per_epoch

    # Training: the epoch order, read by sample.
    def sequence(self, epoch: int) -> tuple[list[int], list[int]]:
        """The shards of an epoch's sequence, in order, and the end position of each in the sequence."""
        if epoch not in self._sequences:
            self._sequences[epoch] = self._sequence(epoch)
            if len(self._sequences) > 2:  # (two epochs meet at a boundary)
                self._sequences.popitem(last=False)
        return self._sequences[epoch]

    def _sequence(self, epoch: int) -> tuple[list[int], list[int]]:
        if self.samples_per_epoch is not None and self.train:
            draws, shards, ends, total = rng(self.seed, "resample", epoch), [], [], 0
            while total < self.samples_per_epoch:
                shards.append(draws.randrange(len(self.index.urls)))
                total = min(total + self.index.counts[shards[-1]], self.samples_per_epoch)
                ends.append(total)
            return shards, ends
        shards = list(range(len(self.index.urls)))
        if self.train:
            rng(self.seed, "order", epoch).shuffle(shards)
        return shards, np.cumsum([self.index.counts[i] for i in shards]).tolist()

    def _window(self, epoch: int, w: int, size: int) -> np.ndarray:
        key = (epoch, w)
        if key not in self._windows:
            self._windows[key] = np.random.default_rng(seed_of("reading", self.seed, "window", epoch, w)).permutation(size)
            if len(self._windows) > 4:
                self._windows.popitem(last=False)
        return self._windows[key]

    def order(self, epoch: int, positions: Iterable[int]) -> list[int]:
        """The places in the epoch's sequence of the samples at ``positions`` of its order."""
        size, total = self.shuffle_buffer, self.epoch_samples
        if not self.train or size <= 1:
            return list(positions)
        places = []
        for p in positions:
            w = p // size
            first = w * size
            places.append(first + int(self._window(epoch, w, min(size, total - first))[p - first]))
        return places

    def samples(self, epoch: int, positions: Iterable[int]) -> list[dict]:
        """The raw samples at ``positions`` of the epoch's order, in that order (placeholders for those lost to an
        unreadable shard)."""
        shards, ends = self.sequence(epoch)
        wanted = []  # (shard, sample index) per position
        for place in self.order(epoch, positions):
            slot = bisect.bisect_right(ends, place)
            wanted.append((shards[slot], place - (ends[slot - 1] if slot else 0)))
        per_shard: dict[int, set[int]] = defaultdict(set)
        for i, n in wanted:
            per_shard[i].add(n)
        read = self._read_shards(per_shard)
        return [dict(read[item]) for item in wanted]  # (a copy: a resampled batch may hold a sample twice)

    def _read_shards(self, per_shard: dict[int, set[int]]) -> dict[tuple[int, int], dict]:
        remote = [i for i in per_shard if _is_remote(self.index.urls[i])]
        jobs = [(i, spans) for i in per_shard for spans in self._jobs(i, per_shard[i], i in remote)]
        if len(remote) and len(jobs) > 1:
            sources = [copy.copy(self.source) for _ in jobs]  # one each: a source's byte count is not thread-safe
            for source in sources:
                source.bytes_read = 0
            with ThreadPoolExecutor(min(_REMOTE_THREADS, len(jobs))) as pool:
                results = list(pool.map(lambda job, source: self._read_spans(*job, source=source), jobs, sources))
            self.source.bytes_read += sum(source.bytes_read for source in sources)
        else:
            results = [self._read_spans(*job) for job in jobs]
        return {key: sample for result in results for key, sample in result.items()}

    def _jobs(self, i: int, indices: set[int], remote: bool) -> list[list[tuple[int, int]]]:
        """The reads of a shard's wanted samples: its runs of consecutive samples (one request each, concurrent for
        a remote shard); a shard without offsets is read once, from the first wanted sample to the last."""
        if self.index.sample_offsets(i) is None:
            return [[(min(indices), max(indices) + 1)]]
        spans = _spans(indices)
        return [[span] for span in spans] if remote else [spans]

    def _read_spans(self, i: int, spans: list[tuple[int, int]], source: Source | None = None) -> dict[tuple[int, int], dict]:
        url, got, source = self.index.urls[i], {}, source or self.source
        try:
            self._check_size(i)
            samples = source.read_spans(url, spans, self.index.sample_offsets(i))
            for n, sample in zip((n for a, b in spans for n in range(a, b)), samples):
                sample["__shard__"] = i  # (with the key, it seeds the sample's augmentation: keys may repeat per shard)
                got[(i, n)] = sample
        except (ShardError, OSError) as err:  # (OSError: the store did not answer)
            reason = err.reason if isinstance(err, ShardError) else f"{type(err).__name__}: {err}"
            for n in (n for a, b in spans for n in range(a, b) if (i, n) not in got):
                got[(i, n)] = {"__fault__": reason, "__url__": url, "__index__": n}
            return got
        if len(got) < sum(b - a for a, b in spans):
            self._stale(i, max(n for _, n in got) + 1 if got else spans[0][0])
        return got

    # Evaluation: contiguous slices, read sequentially.
    def pieces(self, reader: int, readers: int) -> list[Piece]:
        """What one evaluation reader reads: pieces of shards, in shard order."""
        lo, hi = _slice(self.index.total, readers, reader)
        position, pieces = 0, []
        for i, count in enumerate(self.index.counts):
            start, stop = max(lo - position, 0), min(hi - position, count)
            position += count
            if start < stop:
                pieces.append((i, start, stop))
            if position >= hi:
                break
        return pieces

    def read(self, piece: Piece) -> Iterator[dict]:
        """The raw samples of a piece, or placeholders for those lost to an unreadable shard."""
        i, start, stop = piece
        url, read = self.index.urls[i], 0
        try:
            self._check_size(i)
            for sample in self.source.read(url, start, stop):
                read += 1
                sample["__shard__"] = i
                yield sample
        except (ShardError, OSError) as err:
            reason = err.reason if isinstance(err, ShardError) else f"{type(err).__name__}: {err}"
            for index in range(start + read, stop):
                yield {"__fault__": reason, "__url__": url, "__index__": index}
            return
        if read < stop - start:
            self._stale(i, start + read)

    def _stale(self, i: int, held: int) -> None:
        where = f"the index '{self.index.origin}'" if self.index.origin else "the scan at setup"
        raise StaleIndexError(f"{self.index.urls[i]}: holds {held} sample(s), {where} counted {self.index.counts[i]}: "
                              f"the shard changed since it was counted; make the index again (`mmlit data index`)")

    def _check_size(self, i: int) -> None:
        """The shard's size against the index's, once per shard and process."""
        expected = self.index.sizes[i] if self.index.sizes else -1
        if expected < 0 or i in self._checked:
            return
        url = self.index.urls[i]
        try:
            size = self.source.size(url)
        except FileNotFoundError:
            raise StaleIndexError(f"{url}: listed in the index '{self.index.origin}' but missing; make the index again "
                                  f"(`mmlit data index`) or restore the shard") from None
        if size != expected:
            raise StaleIndexError(f"{url}: {size} bytes, the index '{self.index.origin}' says {expected}: the shard changed "
                                  f"since the index was made; make it again (`mmlit data index`)")
        self._checked.add(i)
