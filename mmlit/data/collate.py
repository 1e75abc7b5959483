"""Batches of a task's examples: stacking tensors, padding sequences (written once here), flattening the items of
an image (its questions, its captions) over a batch."""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch
from torch.utils.data import get_worker_info

from mmlit.data.batch_memory import sendable, share_batch, shared_empty
from mmlit.data.device_images import EncodedImage, EncodedImages
from mmlit.text import PAD

__all__ = ["Padded", "batch_size_of", "collate_examples", "flatten_items", "pad", "pad_references", "stack_tensors"]


class Padded(NamedTuple):
    """A batch of sequences of different lengths along their last axis (spectrograms' frames): ``values`` (B, ..., T),
    zero after each row's length, and ``lengths`` (B,). Lightning moves it to the device as it moves a tuple."""

    values: torch.Tensor
    lengths: torch.Tensor

    @classmethod
    def of(cls, rows: Sequence[torch.Tensor]) -> Padded:
        lengths = torch.tensor([r.shape[-1] for r in rows])
        out = rows[0].new_zeros((len(rows), *rows[0].shape[:-1], int(lengths.max())))
        for i, row in enumerate(rows):
            out[i, ..., :row.shape[-1]] = row
        return cls(out, lengths)


def pad(rows: Sequence[Sequence], value: Any = PAD, dtype: torch.dtype = torch.long, left: bool = False,
        length: int | None = None) -> torch.Tensor:
    """Rows of numbers (token ids, answer ids, scores) -> (N, L) with ``value`` after each row, or before it
    (``left``: generation prompts, so that every row ends at the last column); L the longest row (or ``length``)."""
    length = max((len(r) for r in rows), default=0) if length is None else length
    out = torch.full((len(rows), length), value, dtype=dtype)
    for i, row in enumerate(rows):
        if len(row):
            values = torch.tensor(row, dtype=dtype)
            if left:
                out[i, length - len(row):] = values
            else:
                out[i, :len(row)] = values
    return out


def pad_references(references: list[list[list[int]]]) -> torch.Tensor:
    """Each image's reference token lists -> (B, R, T), PAD-filled (an all-PAD row: no reference)."""
    rows, length = max(map(len, references)), max(len(r) for refs in references for r in refs)
    return torch.stack([pad([*refs, *[[]] * (rows - len(refs))], length=length) for refs in references])


def stack_tensors(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack``, made for batches that go from a DataLoader worker to the training process.

    Images made as (C, H, W) views of (H, W, C) pixels (the image pipeline's output) are stacked as they lie and
    viewed as (B, C, H, W) in channels-last memory order: 64 images of 224x224 in 3.0 ms instead of 7.2 ms for the
    strided copy into (B, C, H, W) order; normalising and the encoders take either layout. In a worker, a large batch
    is stacked straight into one of the worker's shared buffers, which it reuses (``mmlit/data/batch_memory.py``):
    0.45 ms for those 64 images instead of 8.9 ms into a new shared-memory segment, which the DataLoader would
    otherwise copy them into (measured on the 2-core machine, one thread)."""
    first = tensors[0]
    if isinstance(first, EncodedImage):  # decoded on the training device (data.decode_images: device)
        return EncodedImages(tensors)
    images = first.dim() == 3 and not first.is_contiguous() and first.permute(1, 2, 0).is_contiguous()
    if images:
        tensors = [t.permute(1, 2, 0) for t in tensors]
        first = tensors[0]
    out = None
    if get_worker_info() is not None and first.numel() * first.element_size() * len(tensors) >= 1 << 16:
        out = shared_empty((len(tensors), *first.shape), first.dtype)
    batch = torch.stack(tensors, out=out)
    batch = batch.permute(0, 3, 1, 2) if images else batch
    return batch if out is None else sendable(batch)


def collate_examples(examples: list[dict]) -> dict[str, Any]:
    """Tensors are stacked, lists of token ids padded with ``PAD``, numbers and bools made tensors (in a worker, in its
    shared buffers: ``share_batch``)."""
    batch: dict[str, Any] = {}
    for key in examples[0]:
        values = [e[key] for e in examples]
        first = values[0]
        if isinstance(first, (torch.Tensor, EncodedImage)):
            batch[key] = stack_tensors(values)
        elif isinstance(first, list):
            batch[key] = pad(values)
        elif isinstance(first, (bool, int, float)):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return share_batch(batch)  # (in a worker: its tensors reach the training process through the worker's buffers)


def flatten_items(examples: list[dict], items: str, index: str = "image_index") -> list[dict]:
    """Each example's list ``items`` (of dicts: an image's questions, captions, sequences) over the whole batch, every
    item with the ``index`` of its example (``image_index``: the row of its image) and the sample ``key``, for
    ``collate_examples``."""
    return [{**item, index: i, "key": e.get("key")} for i, e in enumerate(examples) for item in e[items]]


def batch_size_of(batch: dict[str, Any]) -> int:
    """Rows of a collated batch: the length of its first tensor (images, for VQA's image-grouped batches)."""
    return next(len(v) for v in batch.values() if isinstance(v, torch.Tensor))
