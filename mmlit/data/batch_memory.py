"""Shared memory that a DataLoader worker writes its batches' tensors into, and reuses once the training process has
let go of them.

torch sends a tensor from a worker by moving its storage into a new shared-memory segment and handing the segment's
file descriptor over (``torch.multiprocessing``'s ``file_descriptor`` strategy), for every tensor of every batch: the
kernel zeroes and maps the segment's pages one fault at a time as the worker writes them (a batch of 64 images of
224x224, 9.6 MB: 8.9 ms, against 0.45 ms into memory written before), and each hand-over of a descriptor is a socket
connection with an authentication round trip (0.3 ms of the worker and 0.3 ms of the training process per tensor,
however small). Measured on the 2-core development machine, a worker that decodes and crops JPEGs spent 7.5-8.6 ms of
a 130 ms batch making it and 1.5-1.9 ms in the threads that send it; with these buffers, 1.7 and 0.7 ms (per worker,
85-88% of a plain PIL loop before, 87-90% after: docs/benchmarks.md).

So a worker keeps its buffers (``memfd_create``: anonymous, freed with the last mapping of it) and writes a batch into
one that both processes have let go of: the worker's tensors over it are gone, and the training process has released
as many batches sent in it as the worker sent. The training process counts its releases in the buffer's first bytes
(a finalizer on the memory its tensors were made over runs when the last of them is gone: the batch was moved to the
device, pinned, or dropped), and maps each buffer once: only its first batch carries the file descriptor. A batch the
training process keeps keeps its buffer; the worker then takes another (up to ``_BUFFERS``, then torch's own way).

``stack_tensors`` stacks a batch's images straight into a buffer; ``share_batch`` copies a batch's other tensors into
buffers (``collate_examples`` calls it). They travel as ``_Sent``, a tensor subclass whose pickling the DataLoader's
queue uses; the training process gets plain tensors. Linux only (``os.memfd_create``); elsewhere tensors go torch's
way.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
import threading
import weakref
from multiprocessing.reduction import DupFd, ForkingPickler
from typing import Any, Sequence

import torch
from torch.utils.data import get_worker_info

__all__ = ["sendable", "share_batch", "shared_empty"]

_HEADER = 64  # bytes before the data: the training process's count of released batches (uint64), then alignment
_BUFFERS = 128  # buffers per worker at most: about 6 per buffer a batch takes are in use at once (4 batches ahead,
# the one in the training step, the one being written)
_SMALL = 1 << 16  # bytes: tensors under this share one buffer per batch (``share_batch``)


class _Buffer:
    """One buffer of a worker: its memory, and what was sent in it."""

    def __init__(self, index: int, capacity: int):
        self.index, self.capacity = index, capacity
        self.fd: int | None = os.memfd_create(f"mmlit-batch-{index}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, _HEADER + capacity)  # pages are allocated as they are written
            self.memory = mmap.mmap(self.fd, _HEADER + capacity)
        except OSError:
            os.close(self.fd)
            raise
        self.sent, self.address = 0, 0
        self._view: weakref.ref = lambda: None  # the memory the worker's tensors of the current batch were made over

    def free(self) -> bool:
        return self._view() is None and struct.unpack_from("Q", self.memory)[0] == self.sent

    def take(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        view = memoryview(self.memory)
        self._view = weakref.ref(view)  # dies with the last tensor over it (the tensor holds a reference)
        tensor = torch.frombuffer(view, dtype=dtype, count=math.prod(shape), offset=_HEADER).view(*shape)
        self.address = tensor.untyped_storage().data_ptr()
        return tensor


class _Pool:
    """A worker's buffers."""

    def __init__(self):
        self.key = (os.getpid(), os.urandom(8))  # a worker process's buffers, whatever pid comes later
        self.buffers: list[_Buffer] = []

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor | None:
        nbytes = math.prod(shape) * dtype.itemsize
        # (not a buffer far larger than asked: a later large batch would need a new one)
        free = [b for b in self.buffers if nbytes <= b.capacity <= 2 * nbytes + _SMALL and b.free()]
        if free:
            return min(free, key=lambda b: b.capacity).take(shape, dtype)
        if len(self.buffers) >= _BUFFERS:
            return None
        # A quarter more than asked, so that a slightly larger batch fits later (pages never written cost nothing).
        capacity = -(-nbytes * 5 // 4 // mmap.PAGESIZE) * mmap.PAGESIZE
        try:
            self.buffers.append(_Buffer(len(self.buffers), capacity))
        except OSError:  # out of file descriptors or memory: torch's way, which fails with its own message if it must
            return None
        return self.buffers[-1].take(shape, dtype)

    def owner(self, tensor: torch.Tensor) -> _Buffer | None:
        address = tensor.untyped_storage().data_ptr()
        return next((b for b in self.buffers if b.address == address and b._view() is not None), None)


_POOL: _Pool | None = None


def _pool() -> _Pool:
    global _POOL
    if _POOL is None or _POOL.key[0] != os.getpid():  # (a process forked from a worker starts its own)
        _POOL = _Pool()
    return _POOL


def shared_empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in shared memory, for a DataLoader worker to write a batch into: one of the worker's
    buffers that is free again where there is one (hand the result to ``sendable``), else a new segment."""
    if hasattr(os, "memfd_create"):
        tensor = _pool().empty(shape, dtype)
        if tensor is not None:
            return tensor
    return torch.empty(shape, dtype=dtype).share_memory_()


def sendable(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (written into ``shared_empty``'s memory, or a view of it) marked to reach the training process
    through its buffer; any other tensor as it is."""
    buffer = _pool().owner(tensor) if _POOL is not None else None
    if buffer is None:
        return tensor
    sent = tensor.as_subclass(_Sent)
    sent._mmlit_buffer = buffer
    return sent


def share_batch(batch: Any) -> Any:
    """In a DataLoader worker: ``batch`` (dicts, lists and tuples of tensors) with its tensors copied into the worker's
    buffers, the small ones (labels, token ids, lengths: under 64 KiB) all into one and each larger one into its own.
    torch sends every other tensor in a segment of its own with a file-descriptor hand-over, however small: 0.3 ms of
    the worker and 0.3 ms of the training process per tensor (measured on the 2-core machine), more than a small
    batch's decoding. Tensors in a buffer already (``stack_tensors``' batches) stay, and a tensor met twice stays one.
    Dicts and lists are changed in place. Outside a worker, or where buffers cannot be had, ``batch`` as it is."""
    if get_worker_info() is None or not hasattr(os, "memfd_create"):
        return batch
    tensors: dict[int, torch.Tensor] = {}
    _collect(batch, tensors)
    small = [t for t in tensors.values() if t.nbytes < _SMALL]
    places = [(-(-t.nbytes // 64) * 64) for t in small]  # each small tensor 64-byte aligned in the shared buffer
    moved: dict[int, torch.Tensor] = {}
    memory = _pool().empty((sum(places),), torch.uint8) if small else None
    if memory is not None:
        offset = 0
        for tensor, size in zip(small, places):
            moved[id(tensor)] = _copied(memory[offset:offset + tensor.nbytes], tensor)
            offset += size
    for tensor in (t for t in tensors.values() if t.nbytes >= _SMALL):
        memory = _pool().empty((tensor.nbytes,), torch.uint8)
        if memory is not None:
            moved[id(tensor)] = _copied(memory, tensor)
    return _replaced(batch, moved) if moved else batch


def _collect(value: Any, tensors: dict[int, torch.Tensor]) -> None:
    if type(value) is torch.Tensor:  # (not _Sent: in a buffer already)
        if value.device.type == "cpu" and value.numel() and not value.requires_grad:
            tensors.setdefault(id(value), value)
    elif isinstance(value, dict):
        for item in value.values():
            _collect(item, tensors)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _collect(item, tensors)


def _copied(memory: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    out = memory.view(tensor.dtype).view(tensor.shape)
    out.copy_(tensor)
    return sendable(out)


def _replaced(value: Any, moved: dict[int, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return moved.get(id(value), value)
    if isinstance(value, dict):
        for key, item in value.items():
            value[key] = _replaced(item, moved)
    elif isinstance(value, list):
        value[:] = [_replaced(item, moved) for item in value]
    elif isinstance(value, tuple):
        items = [_replaced(item, moved) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)  # (named tuples: Padded)
    return value


class _Sent(torch.Tensor):
    """A worker's batch tensor that pickles as its buffer's place (see ``_reduce``). Operations on it give plain
    tensors."""

    # (torch's switch for subclasses whose operations should not keep the subclass; Lightning's and torchao's tensor
    # subclasses use it too. tests/data/test_batch_memory.py fails if it stops giving plain tensors.)
    __torch_function__ = torch._C._disabled_torch_function_impl


def _reduce(tensor: _Sent):
    """Pickled by the DataLoader's queue, in the worker: the buffer's place, with its file descriptor the first time."""
    plain, buffer = tensor.as_subclass(torch.Tensor), getattr(tensor, "_mmlit_buffer", None)
    if buffer is None or plain.untyped_storage().data_ptr() != buffer.address:
        return _itself, (plain,)  # torch's way: its storage moved (a plain view of it was pickled first, shared anew)
    buffer.sent += 1  # before the worker lets go of the batch: the buffer is not free until the release
    fd = None
    if buffer.fd is not None:  # the buffer's first batch: the training process maps it (DupFd holds a duplicate)
        fd = DupFd(buffer.fd)
        os.close(buffer.fd)
        buffer.fd = None
    count = plain.untyped_storage().nbytes() // plain.element_size()
    return _rebuild, (_pool().key, buffer.index, fd, buffer.capacity, plain.dtype, count, tuple(plain.shape),
                      plain.stride(), plain.storage_offset())


ForkingPickler.register(_Sent, _reduce)


def _itself(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


# In the training process: each worker buffer's mapping, by (worker key, buffer index).
_MAPPINGS: dict[tuple, mmap.mmap] = {}
# Batches are unpickled and released by any thread (the pin-memory thread too); re-entrant, as a release can run
# inside _rebuild (the garbage collector freeing an older batch).
_LOCK = threading.RLock()


def _rebuild(key: tuple, index: int, fd, capacity: int, dtype: torch.dtype, count: int, shape: tuple, stride: tuple,
             offset: int) -> torch.Tensor:
    """The batch tensor in the training process, over the buffer's memory; its release is counted when the last
    tensor over that memory is gone."""
    with _LOCK:
        if fd is not None:
            fd = fd.detach()
            try:
                memory = mmap.mmap(fd, _HEADER + capacity)
            finally:
                os.close(fd)
            _forget_ended_workers()
            _MAPPINGS[(key, index)] = memory
        memory = _MAPPINGS.get((key, index))
    if memory is None:
        raise RuntimeError(f"a batch from DataLoader worker {key[0]} came in its buffer {index}, which this process "
                           f"never received: its first batch went to another process")
    view = memoryview(memory)
    tensor = torch.frombuffer(view, dtype=dtype, count=count, offset=_HEADER).as_strided(shape, stride, offset)
    weakref.finalize(view, _release, memory).atexit = False
    return tensor


def _release(memory: mmap.mmap) -> None:
    with _LOCK:
        struct.pack_into("Q", memory, 0, struct.unpack_from("Q", memory)[0] + 1)


def _forget_ended_workers() -> None:
    """Drop the mappings of workers that have ended (their batches still alive keep theirs)."""
    for key in {key for key, _ in _MAPPINGS}:
        try:
            os.kill(key[0], 0)
        except ProcessLookupError:
            for place in [place for place in _MAPPINGS if place[0] == key]:
                del _MAPPINGS[place]
        except PermissionError:
            pass
