"""A worker's batch tensors reach the training process through shared buffers that the worker reuses once the training
process has let go of them: every batch arrives whole, a batch the training process keeps is never written over, and
the training process gets plain tensors."""

from __future__ import annotations

import pickle

import torch
from torch.utils.data import IterableDataset

from mmlit.data import batch_memory
from mmlit.data.collate import Padded, collate_examples, stack_tensors
from mmlit.data.workers import task_loader

_BATCHES, _ROWS = 40, 8


def _images(i: int) -> list[torch.Tensor]:
    """(3, 32, 32) views of (32, 32, 3) pixels as the image pipeline makes them; image j of batch i is all i + j."""
    return [torch.full((32, 32, 3), (i + j) % 256, dtype=torch.uint8).permute(2, 0, 1) for j in range(_ROWS)]


def _expected(i: int) -> torch.Tensor:
    return torch.tensor([(i + j) % 256 for j in range(_ROWS)], dtype=torch.uint8).view(_ROWS, 1, 1, 1)


class _Images(IterableDataset):
    """Batches of images stacked as a task's collate stacks them; every 5th also holds a plain view of its images,
    pickled before them (torch then moves their storage into a segment of its own)."""

    def __iter__(self):
        for i in range(_BATCHES):
            images = stack_tensors(_images(i))
            batch = {"first": images[0]} if i % 5 == 0 else {}
            pool = batch_memory._POOL
            yield {**batch, "image": images, "i": i, "buffers": len(pool.buffers) if pool else 0}


def test_batches_arrive_whole_in_reused_buffers_and_kept_ones_are_not_written_over():
    kept, seen = [], 0
    for batch in task_loader(_Images(), workers=1):
        i = batch["i"]
        assert type(batch["image"]) is torch.Tensor and batch["image"].shape == (_ROWS, 3, 32, 32)
        assert torch.equal(batch["image"], _expected(i).expand(_ROWS, 3, 32, 32)), f"batch {i}"
        if "first" in batch:
            assert torch.equal(batch["first"], batch["image"][0])
        if i % 10 == 0:
            kept.append(batch)  # held by the training process: its buffer must not be reused
        seen += 1
    assert seen == _BATCHES
    for batch in kept:
        assert torch.equal(batch["image"], _expected(batch["i"]).expand(_ROWS, 3, 32, 32)), f"kept batch {batch['i']}"
    # 4 batches ahead, the one in hand, the one being written, and the 4 kept: far fewer buffers than batches.
    assert batch["buffers"] <= 12


class _Examples(IterableDataset):
    """Batches as tasks collate them: labels, padded token ids, flags, a padded sequence, and a large tensor that no
    stack made."""

    def __iter__(self):
        for i in range(_BATCHES):
            examples = [{"label": i + j, "ids": list(range(j + 1)), "flag": j % 2 == 0} for j in range(_ROWS)]
            batch = collate_examples(examples)
            batch["audio"] = batch_memory.share_batch(Padded.of([torch.full((2, 5 + j), float(i)) for j in range(3)]))
            batch["large"] = batch_memory.share_batch([torch.full((1 << 15,), i, dtype=torch.int32)])
            yield batch


def test_a_batchs_small_and_unstacked_tensors_arrive_whole():
    batches = list(task_loader(_Examples(), workers=1))
    assert len(batches) == _BATCHES
    for i, batch in enumerate(batches):  # all kept: none was written over
        assert torch.equal(batch["label"], torch.arange(i, i + _ROWS)) and batch["label"].dtype == torch.long
        assert batch["ids"].shape == (_ROWS, _ROWS) and torch.equal(batch["ids"][-1], torch.arange(_ROWS))
        assert torch.equal(batch["flag"], torch.tensor([j % 2 == 0 for j in range(_ROWS)]))
        assert isinstance(batch["audio"], Padded) and torch.equal(batch["audio"].lengths, torch.tensor([5, 6, 7]))
        assert (batch["audio"].values[:, :, :5] == i).all() and batch["audio"].values[0, 0, 5:].eq(0).all()
        assert torch.equal(batch["large"][0], torch.full((1 << 15,), i, dtype=torch.int32))
        assert all(type(t) is torch.Tensor for t in (batch["label"], batch["ids"], *batch["audio"], batch["large"][0]))


def test_operations_on_a_sent_tensor_give_plain_tensors():
    """(``_Sent`` turns torch's subclass propagation off with ``torch._C._disabled_torch_function_impl``.)"""
    sent = torch.zeros(2, 3).as_subclass(batch_memory._Sent)
    assert all(type(t) is torch.Tensor for t in (sent + 1, sent.permute(1, 0), sent[0], torch.stack([sent, sent])))


def test_outside_a_worker_batches_are_plain_tensors_in_ordinary_memory():
    images = stack_tensors(_images(3))
    batch = collate_examples([{"label": 1, "ids": [1, 2]}, {"label": 2, "ids": [3]}])
    for tensor in (images, batch["label"], batch["ids"]):
        assert type(tensor) is torch.Tensor and not tensor.is_shared()
    assert torch.equal(pickle.loads(pickle.dumps(images)), images)
