"""What each reader of a source reads in an epoch, planned from the index's sample counts alone, and its raw
samples in epoch order.

A source's readers are the ``ranks x workers`` slots. In **epoch mode** the shard order is shuffled per epoch (the
same on every rank) and the samples in that order are cut into one contiguous slice per reader (sizes differ by at
most one); in **resampled mode** each reader draws shards with replacement (seeded by epoch and reader) until it has
its slice of ``samples_per_epoch``. Training samples are shuffled inside windows: a reader's slice, in shard order,
is cut at shard boundaries into windows of at least ``shuffle_buffer`` samples, and each window is permuted by a
generator seeded with (seed, epoch, reader, window), so a reader that resumes at any position reads only the window
that position is in.
"""

from __future__ import annotations

import random
from typing import Iterator

from mmlit.data.index import ShardIndex, StaleIndexError
from mmlit.data.shards import ShardError
from mmlit.data.sources import Source
from mmlit.seeds import random_generator

__all__ = ["Piece", "Reading", "rng"]

Piece = tuple[int, int, int]  # (shard, first sample, end sample) of the shard that a reader reads in one go


def rng(*parts) -> random.Random:
    """A generator seeded by ``parts`` (``mmlit.seeds``)."""
    return random_generator("reading", *parts)


def _slice(total: int, readers: int, reader: int) -> tuple[int, int]:
    return total * reader // readers, total * (reader + 1) // readers


def _windows(pieces: list[Piece], size: int) -> list[list[Piece]]:
    """Consecutive pieces in groups of at least ``size`` samples (the last may be smaller)."""
    windows: list[list[Piece]] = [[]]
    filled = 0
    for piece in pieces:
        if filled >= size:
            windows.append([])
            filled = 0
        windows[-1].append(piece)
        filled += piece[2] - piece[1]
    return windows


class Reading:
    """The reading of one source's shards.

    Args:
        index: the shards and their sample counts.
        source: how the shards are read.
        seed: the seed of the shard order, resampling and windows.
        train: training reads shuffle (shard order, windows); evaluation reads every sample once, in shard order.
        shuffle_buffer: the least samples of a window.
        samples_per_epoch: resampled mode with this many samples per epoch (all readers together); None: epoch mode.
    """

    def __init__(self, index: ShardIndex, source: Source, seed: int, train: bool, shuffle_buffer: int,
                 samples_per_epoch: int | None):
        self.index, self.source, self.seed, self.train = index, source, seed, train
        self.shuffle_buffer, self.samples_per_epoch = shuffle_buffer, samples_per_epoch

    # What one reader reads in one epoch: pieces of shards, in order (from the counts alone).
    def pieces(self, epoch: int, reader: int, readers: int) -> list[Piece]:
        if self.samples_per_epoch is not None and self.train:
            lo, hi = _slice(self.samples_per_epoch, readers, reader)
            draws, need, pieces = rng(self.seed, "resample", epoch, reader), hi - lo, []
            while need > 0:
                i = draws.randrange(len(self.index.urls))
                take = min(need, self.index.counts[i])
                pieces.append((i, 0, take))
                need -= take
            return pieces
        order = list(range(len(self.index.urls)))
        if self.train:
            rng(self.seed, "order", epoch).shuffle(order)
        lo, hi = _slice(self.index.total, readers, reader)
        position, pieces = 0, []
        for i in order:
            count = self.index.counts[i]
            start, stop = max(lo - position, 0), min(hi - position, count)
            position += count
            if start < stop:
                pieces.append((i, start, stop))
            if position >= hi:
                break
        return pieces

    def _read(self, piece: Piece) -> Iterator[dict]:
        """The raw samples of a piece, or placeholders for those lost to an unreadable shard."""
        i, start, stop = piece
        url, read = self.index.urls[i], 0
        try:
            self._check_size(i)
            for sample in self.source.read(url, start, stop):
                read += 1
                sample["__shard__"] = i  # (with the key, it seeds the sample's augmentation: keys may repeat per shard)
                yield sample
        except (ShardError, OSError) as err:  # (OSError: the store did not answer the size request)
            reason = err.reason if isinstance(err, ShardError) else f"{type(err).__name__}: {err}"
            for index in range(start + read, stop):
                yield {"__fault__": reason, "__url__": url, "__index__": index}
            return
        if read < stop - start:
            where = f"the index '{self.index.origin}'" if self.index.origin else "the scan at setup"
            raise StaleIndexError(f"{url}: holds {start + read} sample(s), {where} counted {self.index.counts[i]}: the "
                                  f"shard changed since it was counted; make the index again (`mmlit data index`)")

    def _check_size(self, i: int) -> None:
        expected = self.index.sizes[i] if self.index.sizes else -1
        if expected < 0:
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

    def ordered(self, pieces: list[Piece], epoch: int, reader: int, begin: int) -> Iterator[dict]:
        """The reader's raw samples in epoch order, from position ``begin`` on (reading only from the window of
        ``begin``)."""
        shuffle = self.train and self.shuffle_buffer > 1
        position = 0
        for w, window in enumerate(_windows(pieces, self.shuffle_buffer if shuffle else 1)):
            size = sum(stop - start for _, start, stop in window)
            position, first = position + size, position
            if position <= begin:
                continue
            if not shuffle:  # in shard order: start at the sample itself
                for i, start, stop in window:
                    yield from self._read((i, start + max(begin - first, 0), stop))
                continue
            raw = [sample for piece in window for sample in self._read(piece)]
            rng(self.seed, "window", epoch, reader, w).shuffle(raw)
            yield from raw[max(begin - first, 0):]

